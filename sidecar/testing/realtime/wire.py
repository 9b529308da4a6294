"""Phoenix Channels wire format as Supabase Realtime speaks it: V1 JSON objects and V2 arrays.

V1 (`vsn=1.0.0`, realtime-py): every frame is a text frame with one JSON object. Inbound frames
must carry `topic`, `event`, `payload` and `ref` (`join_ref` is optional); outbound frames carry
exactly `topic`, `event`, `payload` and `ref`, never `join_ref` (Phoenix V1 JSONSerializer).

V2 (`vsn=2.0.0`, realtime-js' default): text frames are `[join_ref, ref, topic, event, payload]`;
binary frames are Realtime's V2Serializer kinds: 0 push, 3 user broadcast push (client → server),
4 user broadcast (server → client; how `realtime.send` rows reach V2 sockets).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Inbound",
    "MalformedFrame",
    "UserBroadcastPush",
    "decode",
    "dumps",
    "encode",
    "encode_user_broadcast",
]

KIND_PUSH = 0
KIND_USER_BROADCAST_PUSH = 3
KIND_USER_BROADCAST = 4


class MalformedFrame(ValueError):
    """An inbound frame that the real server logs as MalformedWebSocketMessage and ignores."""


@dataclass(frozen=True, slots=True)
class UserBroadcastPush:
    """A V2 binary broadcast push (kind 3): the user event and its raw payload bytes."""

    event: str
    encoding: Literal["json", "binary"]
    data: bytes
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Inbound:
    """One decoded client frame; `payload` is a JSON value, bytes (kind 0) or a UserBroadcastPush."""

    topic: Any
    event: Any
    payload: Any
    ref: Any
    join_ref: Any


def dumps(value: Any) -> str:
    """Compact JSON, unicode kept as is (like Jason)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def decode(data: str | bytes, vsn: int) -> Inbound:
    """Decode one client frame for protocol major `vsn` (1 or 2); raises MalformedFrame."""
    if vsn == 2 and isinstance(data, bytes):
        return _decode_binary(data)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"invalid JSON: {exc}") from None
    if vsn == 2:
        if not isinstance(value, list) or len(value) < 5:
            raise MalformedFrame("expected V2 array")
        join_ref, ref, topic, event, payload = value[:5]
        return Inbound(topic, event, payload, ref, join_ref)
    if not isinstance(value, dict):
        raise MalformedFrame("V1 JSON Serializer expected a map")
    missing = [k for k in ("topic", "event", "payload", "ref") if k not in value]
    if missing:
        raise MalformedFrame(f"missing keys {missing}")
    return Inbound(
        value["topic"], value["event"], value["payload"], value["ref"], value.get("join_ref")
    )


def _decode_binary(data: bytes) -> Inbound:
    if not data:
        raise MalformedFrame("empty binary frame")
    kind = data[0]
    try:
        if kind == KIND_PUSH:
            jr, tp, ev = struct.unpack_from("!BBB", data, 1)
            offset = 4
            join_ref, offset = _take(data, offset, jr)
            topic, offset = _take(data, offset, tp)
            event, offset = _take(data, offset, ev)
            return Inbound(topic, event, data[offset:], None, join_ref or None)
        if kind == KIND_USER_BROADCAST_PUSH:
            jr, rf, tp, ue, md, enc = struct.unpack_from("!BBBBBB", data, 1)
            offset = 7
            join_ref, offset = _take(data, offset, jr)
            ref, offset = _take(data, offset, rf)
            topic, offset = _take(data, offset, tp)
            user_event, offset = _take(data, offset, ue)
            meta_raw, offset = _take(data, offset, md)
            metadata = json.loads(meta_raw) if meta_raw else {}
            push = UserBroadcastPush(
                user_event,
                "binary" if enc == 0 else "json",
                data[offset:],
                metadata if isinstance(metadata, dict) else {},
            )
            return Inbound(topic, "broadcast", push, ref or None, join_ref or None)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"bad binary frame: {exc}") from None
    raise MalformedFrame(f"unknown binary kind {kind}")


def _take(data: bytes, offset: int, size: int) -> tuple[str, int]:
    end = offset + size
    if end > len(data):
        raise ValueError("truncated")
    return data[offset:end].decode("utf-8"), end


def encode(
    vsn: int, topic: Any, event: str, payload: Any, *, ref: Any = None, join_ref: Any = None
) -> str:
    """One server frame: V1 `{"topic","event","payload","ref"}` or V2 `[join_ref, ref, ...]`."""
    if vsn == 2:
        return dumps([join_ref, ref, topic, event, payload])
    return dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})


def encode_user_broadcast(
    topic: str, event: str, payload: bytes, *, json_encoded: bool, metadata: dict[str, Any] | None
) -> bytes:
    """A V2 binary user broadcast (kind 4), as RealtimeWeb.Socket.V2Serializer.fastlane!/1."""
    t = topic.encode()
    e = event.encode()
    m = dumps(metadata).encode() if metadata else b""
    if max(len(t), len(e), len(m)) > 255:
        raise ValueError("topic, event and metadata must each fit in 255 bytes")
    header = struct.pack(
        "!BBBBB", KIND_USER_BROADCAST, len(t), len(e), len(m), 1 if json_encoded else 0
    )
    return header + t + e + m + payload
