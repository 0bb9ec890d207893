"""The JSON the gateway serves for a view: proto3 JSON of the protobuf answer, wrapped in ``google.api.HttpBody``.

Printed with the options of the gateway's transcoder (gateway/envoy.yaml.tmpl ``print_options``): proto field names
(``atm_strike``), fields without presence printed at their zero value, enums as names (``TIMEFRAME_1M``), int64 as
strings (``"oi": "123456"``), Timestamps RFC 3339 UTC, no whitespace, UTF-8 (not ``\\u`` escapes). Parsed, it equals
what Envoy's transcoder prints for the same answer; as text, doubles with an integral value differ (Python
``24200.0``, Envoy ``24200``): the same JSON number.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

#: Content type of every JSON body.
CONTENT_TYPE = "application/json"


def to_json(msg: Message) -> bytes:
    """``msg`` as compact proto3 JSON bytes (UTF-8) with the gateway's print options (module doc)."""
    d = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()


def http_body(data: bytes, content_type: str = CONTENT_TYPE) -> bytes:
    """Serialized ``google.api.HttpBody`` carrying ``data`` (Envoy answers with ``data`` as the body and
    ``content_type`` as the Content-Type header)."""
    return httpbody_pb2.HttpBody(content_type=content_type, data=data).SerializeToString()  # type: ignore[no-any-return]


def json_renderer(response_cls: Any) -> Callable[[bytes], bytes]:
    """``render(pb) -> HttpBody bytes``: the serialized ``response_cls`` message ``pb`` as a JSON HttpBody. Raises
    ``google.protobuf.message.DecodeError`` for bytes that are not such a message (never for the service's own)."""

    def render(pb: bytes) -> bytes:
        return http_body(to_json(response_cls.FromString(pb)))

    return render
