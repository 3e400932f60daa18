"""The event stream encoder, checked against botocore's own decoder: raw messages (prelude, headers,
CRCs), and whole InvokeWithResponseStream bodies parsed through botocore's Lambda model as boto3 does."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer
from botocore.parsers import EventStreamJSONParser
from lambdalet_gateway.eventstream import MAX_PAYLOAD, encode_message, invoke_complete, payload_chunk


def decode(data: bytes) -> list[Any]:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


def parse_invoke_stream(body: bytes) -> list[dict[str, Any]]:
    """What boto3's ``invoke_with_response_stream(...)["EventStream"]`` yields for this body."""
    model = botocore.session.get_session().get_service_model("lambda")
    output = model.operation_model("InvokeWithResponseStream").output_shape
    shape = output.members["EventStream"]

    class Raw:
        def __init__(self, data: bytes) -> None:
            self._io = io.BytesIO(data)

        def stream(self) -> Any:
            while piece := self._io.read(7):  # small reads: messages split across reads
                yield piece

    stream = EventStream(Raw(body), shape, EventStreamJSONParser(), "InvokeWithResponseStream")
    return list(stream)


def test_a_message_decodes_with_its_headers_and_payload() -> None:
    data = encode_message({":event-type": "PayloadChunk", "x-unicode": "héllo"}, b"\x00\x01payload")
    (message,) = decode(data)
    assert message.headers == {":event-type": "PayloadChunk", "x-unicode": "héllo"}
    assert message.payload == b"\x00\x01payload"
    assert message.prelude.total_length == len(data)


def test_a_corrupted_message_fails_botocores_checksum() -> None:
    data = bytearray(encode_message({":event-type": "PayloadChunk"}, b"abc"))
    data[-5] ^= 0xFF  # a payload byte
    with pytest.raises(ChecksumMismatch):
        decode(bytes(data))
    prelude = bytearray(encode_message({}, b"abc"))
    prelude[0:4] = struct.pack("!I", len(prelude) + 1)
    with pytest.raises(ChecksumMismatch):
        decode(bytes(prelude))


def test_chunks_then_complete_parse_as_boto3_shows_them() -> None:
    body = payload_chunk(b"one ") + payload_chunk(b"two ") + payload_chunk(b"\x00binary") + invoke_complete()
    events = parse_invoke_stream(body)
    assert events == [
        {"PayloadChunk": {"Payload": b"one "}},
        {"PayloadChunk": {"Payload": b"two "}},
        {"PayloadChunk": {"Payload": b"\x00binary"}},
        {"InvokeComplete": {}},
    ]


def test_complete_with_an_error_and_a_log() -> None:
    body = invoke_complete("Sandbox.Timedout", "Task timed out after 1.00 seconds", "U1RBUlQ=")
    (event,) = parse_invoke_stream(body)
    assert event == {
        "InvokeComplete": {
            "ErrorCode": "Sandbox.Timedout",
            "ErrorDetails": "Task timed out after 1.00 seconds",
            "LogResult": "U1RBUlQ=",
        }
    }
    (message,) = decode(body)
    assert message.headers[":content-type"] == "application/json"
    assert json.loads(message.payload) == event["InvokeComplete"]


def test_a_payload_over_the_decoders_limit_is_split() -> None:
    data = bytes(range(256)) * ((MAX_PAYLOAD + 1000) // 256)
    messages = decode(payload_chunk(data))
    assert len(messages) == 2
    assert b"".join(m.payload for m in messages) == data


def test_oversized_header_values_are_refused() -> None:
    with pytest.raises(ValueError, match="too long"):
        encode_message({"x": "v" * 70000}, b"")
