"""The AWS event stream encoding (``application/vnd.amazon.eventstream``), the server side.

``InvokeWithResponseStream`` answers with a sequence of event stream messages. Each message is:

- a prelude: total length and headers length (4-byte big-endian unsigned each) and the CRC32 of those
  8 bytes;
- headers: for each, a 1-byte name length, the name, a 1-byte value type (7 = string) and, for a
  string, a 2-byte length and the UTF-8 value;
- the payload;
- the CRC32 of everything before it.

Hand-written because the Python libraries only decode it: botocore's ``botocore.eventstream`` parses
messages for clients and has no encoder, and the AWS Common Runtime (``awscrt``, not a dependency here)
keeps its encoder inside its RPC client. Encoding is a few ``struct.pack`` calls and ``zlib.crc32``;
the unit tests check every message against botocore's own decoder. Pure: no I/O.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping

_STRING = 7
#: botocore refuses larger messages (``_MAX_PAYLOAD_LENGTH``, 24 MB); payload chunks are split below it.
MAX_PAYLOAD = 16 * 1024 * 1024


def _headers(headers: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name = name.encode("utf-8")
        raw_value = value.encode("utf-8")
        if len(raw_name) > 255:
            raise ValueError(f"event stream header name too long: {name[:40]!r}")
        if len(raw_value) > 0xFFFF:
            raise ValueError(f"event stream header {name!r} value too long")
        out += struct.pack("!B", len(raw_name)) + raw_name + struct.pack("!BH", _STRING, len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event stream message with string headers."""
    encoded = _headers(headers)
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack("!II", total, len(encoded))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


_CHUNK_HEADERS = {":event-type": "PayloadChunk", ":content-type": "application/octet-stream", ":message-type": "event"}
_COMPLETE_HEADERS = {":event-type": "InvokeComplete", ":content-type": "application/json", ":message-type": "event"}


def payload_chunk(data: bytes) -> bytes:
    """``PayloadChunk`` events carrying ``data`` (more than one when ``data`` is over :data:`MAX_PAYLOAD`)."""
    if len(data) <= MAX_PAYLOAD:
        return encode_message(_CHUNK_HEADERS, data)
    return b"".join(
        encode_message(_CHUNK_HEADERS, data[start : start + MAX_PAYLOAD]) for start in range(0, len(data), MAX_PAYLOAD)
    )


def invoke_complete(
    error_code: str | None = None, error_details: str | None = None, log_result: str | None = None
) -> bytes:
    """The final ``InvokeComplete`` event; members that are ``None`` are left out, as Lambda does."""
    members = {"ErrorCode": error_code, "ErrorDetails": error_details, "LogResult": log_result}
    body = json.dumps({key: value for key, value in members.items() if value is not None}).encode()
    return encode_message(_COMPLETE_HEADERS, body)
