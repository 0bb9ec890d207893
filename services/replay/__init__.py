"""Replay of the shared-data formats and the synthetic session into optmon (docs/replay.md).

- :mod:`services.replay.sources` — ``Snapshot``, ``SourceError``, ``ErrorLog``, ``detect_format``, ``open_source``.
- :mod:`services.replay.synthetic` — ``synthetic_session``.
- :mod:`services.replay.publisher` — ``publish`` (Redis Streams ``optmon:ticks:<U>``), ``publish_grpc``,
  ``ReplayStats``.
- :mod:`services.replay.cli` — ``add_arguments`` / ``run``, the body of ``optmon replay``.
"""
