"""Ingest inputs: the Redis Streams consumer (durable), the legacy pub/sub JSON subscriber (lossy) and the
:class:`~services.ingest.inputs.committer.Committer` that every input (and the gRPC servicer) hands its ticks to
for validation, commit, retry and back-pressure. See docs/ingest.md."""
