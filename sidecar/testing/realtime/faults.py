"""The server-side faults of a real Realtime, as methods of the test server.

A mixin of `RealtimeServer` (tests call `rt.crash(topic)`, `rt.refuse_connects(401)`...; the
admin API calls the same by name). Each method acts on the open sockets through the socket's
own queue, so a fault lands between two frames, like a real server's.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.testing.realtime import wire
from sidecar.testing.realtime.socket import RATE_LIMITED

if TYPE_CHECKING:
    from sidecar.testing.realtime.broker import Knobs
    from sidecar.testing.realtime.socket import Channel, RealtimeSocket

__all__ = ["Faults"]

log = structlog.get_logger(component="realtime_server")

_HANDSHAKE_ERRORS = {
    401: "Token has expired",
    403: "Realtime was disabled for this tenant",
    404: "Tenant not found",
    429: "Too many connected users",
}
_HANDSHAKE_DEFAULT_ERROR = "Error connecting to Realtime"


@dataclass(slots=True)
class _Refusal:
    status: int
    body: bytes
    content_type: str | None
    until: float | None
    backoff: bool


class Faults:
    """Fault injection on every open socket or channel; mixed into `RealtimeServer`, which
    provides what is declared here."""

    knobs: Knobs
    _refusal: _Refusal | None
    _join_delays: deque[float]

    @property
    def open_sockets(self) -> list[RealtimeSocket]:
        """Sockets still connected."""
        raise NotImplementedError

    def channels(self, topic: str | None = None) -> list[Channel]:
        """Live channels, optionally only those for `topic`."""
        raise NotImplementedError

    def _restart_sweeper(self) -> None:
        raise NotImplementedError

    def crash(self, topic: str) -> int:
        """The channel process crashes: `phx_error` (ref = join_ref); the client rejoins ~1 s."""
        chans = self.channels(topic)
        for ch in chans:
            ch.sock._post_sync(functools.partial(ch.sock.crash_channel, ch))
        return len(chans)

    def shutdown(self, topic: str, message: str = RATE_LIMITED) -> int:
        """A system error with `message`, then `phx_close`; the channel is gone, the socket stays."""
        chans = self.channels(topic)
        for ch in chans:
            ch.sock._post_sync(functools.partial(ch.sock.shutdown_channel, ch, message))
        return len(chans)

    def expire_now(self, topic: str) -> int:
        """As if the token's expiry timer fired past `exp`: `Token has expired N seconds ago`."""
        chans = self.channels(topic)
        for ch in chans:
            ago = max(0, int(time.time()) - int(ch.claims.get("exp", 0)))
            ch.sock._post_sync(
                functools.partial(
                    ch.sock.shutdown_channel, ch, f"Token has expired {ago} seconds ago"
                )
            )
        return len(chans)

    def server_disconnect(self) -> int:
        """`Server requested disconnect` (no `channel` key) on every channel, then close 1012."""
        socks = self.open_sockets
        for sock in socks:
            for ch in sock.channels.values():
                sock._enqueue(
                    sock._frame(
                        ch.topic,
                        "system",
                        {
                            "extension": "system",
                            "status": "ok",
                            "message": "Server requested disconnect",
                        },
                    )
                )
            sock._post(functools.partial(sock.close, 1012))
        return len(socks)

    def close(self, code: int = 1000) -> int:
        """Close every socket with `code` (1000, 1001, 1012, ...) after what is already queued."""
        socks = self.open_sockets
        for sock in socks:
            sock._post(functools.partial(sock.close, code))
        return len(socks)

    def abort(self) -> int:
        """Drop every socket's TCP connection without a close frame (clients see 1006)."""
        socks = self.open_sockets
        for sock in socks:
            sock.abort()
        return len(socks)

    def refuse_connects(
        self,
        status: int = 401,
        body: Any = None,
        seconds: float | None = None,
        *,
        backoff: bool = True,
    ) -> None:
        """Answer handshakes with `status` and `body` (dict → JSON, str/bytes as is).

        Lasts `seconds` (None: until `accept_connects()`). The default body is Realtime's own
        `{"error": ...}` for that status. With `backoff`, each refusal first sleeps
        `knobs.connect_error_backoff`, like the real server.
        """
        if body is None:
            body = {"error": _HANDSHAKE_ERRORS.get(status, _HANDSHAKE_DEFAULT_ERROR)}
        content_type: str | None = None
        if isinstance(body, Mapping):
            raw = wire.dumps(dict(body)).encode()
            content_type = "application/json"
        elif isinstance(body, str):
            raw = body.encode()
        else:
            raw = bytes(body)
        until = None if seconds is None else time.monotonic() + seconds
        self._refusal = _Refusal(status, raw, content_type, until, backoff)
        log.info("realtime_server.refusing_connects", status=status, seconds=seconds)

    def accept_connects(self) -> None:
        """End `refuse_connects()`."""
        self._refusal = None

    def stall(self, seconds: float | None = None) -> None:
        """Every open socket stops reading, answering pings and writing (for `seconds`)."""
        for sock in self.open_sockets:
            sock.stall()
        if seconds is not None:
            handle = asyncio.get_running_loop().call_later(seconds, self.unstall)
            del handle

    def unstall(self) -> None:
        """Resume every stalled socket."""
        for sock in self.open_sockets:
            sock.unstall()

    def oversize_frame(self, size: int = 1_100_000) -> int:
        """Send every open socket one text frame of about `size` bytes (> 1 MiB kills realtime-py).

        It is a broadcast on the socket's first channel, or a heartbeat-style reply without one.
        """
        socks = self.open_sockets
        for sock in socks:
            chans = list(sock.channels.values())
            if chans:
                ch = chans[0]
                template = sock._frame(
                    ch.topic,
                    "broadcast",
                    {"type": "broadcast", "event": "oversize", "payload": {"pad": ""}},
                )
                pad = "x" * max(0, size - len(template.encode()))
                data = sock._frame(
                    ch.topic,
                    "broadcast",
                    {"type": "broadcast", "event": "oversize", "payload": {"pad": pad}},
                )
            else:
                template = sock._reply("phoenix", None, "ok", {"pad": ""})
                pad = "x" * max(0, size - len(template.encode()))
                data = sock._reply("phoenix", None, "ok", {"pad": pad})
            sock._enqueue(data)
        return len(socks)

    def stale_close(self, topic: str, ref: Any = "0") -> int:
        """Send `phx_close` with an arbitrary (old) ref; the server keeps the channel."""
        chans = self.channels(topic)
        for ch in chans:
            ch.sock._enqueue(ch.sock._frame(ch.topic, "phx_close", {}, ref=ref, join_ref=ref))
        return len(chans)

    def send_raw(self, frame: str | bytes | Mapping[str, Any], *, topic: str | None = None) -> int:
        """Write an arbitrary frame to every open socket (or those that joined `topic`)."""
        data: str | bytes = wire.dumps(dict(frame)) if isinstance(frame, Mapping) else frame
        socks = [c.sock for c in self.channels(topic)] if topic is not None else self.open_sockets
        for sock in socks:
            sock._enqueue(data)
        return len(socks)

    def zero_channel_sweep(self, interval: float) -> None:
        """Sweep every `interval` s: drop TCP of sockets that had channels and now have none."""
        self.knobs.zero_channel_sweep = interval
        self._restart_sweeper()

    def sweep_now(self) -> int:
        """Run one zero-channel sweep now; how many sockets were dropped."""
        victims = [s for s in self.open_sockets if s.had_channels and not s.channels]
        for sock in victims:
            log.info("realtime_server.zero_channel_sweep", socket=sock.id)
            sock.abort()
        return len(victims)

    def rate_limit(self, triggered: bool = True) -> None:
        """Force the tenant's events-per-second limit on or off."""
        self.knobs.rate_limited = triggered

    def delay_next_join(self, seconds: float) -> None:
        """Hold only the next join (and its socket) for `seconds` (queued, one per call)."""
        self._join_delays.append(seconds)
