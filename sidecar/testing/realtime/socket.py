"""One Realtime WebSocket connection (a Phoenix transport process) and its channels.

Part of the test server in `sidecar.testing.realtime.server`: frames of a socket are handled one
at a time by a per-socket task, and channel pushes are queued behind them, like the Phoenix
transport process and its mailbox. Join checks, token expiry and refresh, and client broadcasts
live here; fan-out, storage, limits and faults live on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog
from aiohttp import WSMsgType, web

from sidecar.testing.realtime import wire
from sidecar.testing.realtime.jwt import TokenFailure

if TYPE_CHECKING:
    from sidecar.testing.realtime.server import RealtimeServer

__all__ = [
    "Channel",
    "Frame",
    "JoinError",
    "Outgoing",
    "RealtimeSocket",
    "StoredMessage",
    "flex_bool",
    "payload_size",
]

log = structlog.get_logger(component="realtime_server")

REPLAY_HARD_LIMIT = 25
REPLAY_DEFAULT_LIMIT = 25
_UNIX_MS_MIN = -62_135_596_800_000  # DateTime.from_unix(_, :millisecond) range
_UNIX_MS_MAX = 253_402_300_799_999
READ_DENIED = "You do not have permissions to read from this Channel topic: {}"
READ_REVOKED = "You no longer have permission to read from this Channel topic: {}"
DB_DOWN = "Realtime was unable to connect to the project database"
RATE_LIMITED = "Too many messages per second"


class Frame:
    """One WebSocket message as sent or received; `data` is the parsed JSON of a text frame."""

    __slots__ = ("_parsed", "at", "raw")

    def __init__(self, raw: str | bytes, at: float) -> None:
        self.raw = raw
        self.at = at
        self._parsed: Any = ...

    @property
    def data(self) -> Any:
        """Parsed JSON (None for binary or invalid JSON)."""
        if self._parsed is ...:
            try:
                self._parsed = json.loads(self.raw) if isinstance(self.raw, str) else None
            except ValueError:
                self._parsed = None
        return self._parsed

    def __repr__(self) -> str:
        text = self.raw if isinstance(self.raw, str) else f"<{len(self.raw)} bytes>"
        return f"Frame({text[:200]!r})"


@dataclass(slots=True)
class StoredMessage:
    """A row of `realtime.messages` (what `realtime.send` stores and replay reads)."""

    id: str
    topic: str
    event: str
    payload: dict[str, Any] | None
    binary_payload: bytes | None
    private: bool
    inserted_at: datetime
    inserted_ms: int
    extension: str = "broadcast"
    seq: int = 0


@dataclass(eq=False, slots=True)
class Channel:
    """One joined channel instance on one socket (a RealtimeChannel process)."""

    sock: RealtimeSocket
    topic: str  # "realtime:<sub>"
    sub_topic: str
    join_ref: Any
    private: bool
    ack: bool
    self_broadcast: bool
    presence_enabled: bool
    token: str
    claims: dict[str, Any]
    read: bool = True
    presence_read: bool = False
    write: bool | None = None  # evaluated lazily on the first broadcast push, per token
    replayed_ids: set[str] = field(default_factory=set)
    live: bool = True
    joined_at: float = 0.0
    _timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def _cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A broadcast on its way to subscribers.

    kind "json": a Phoenix Broadcast whose payload is relayed verbatim (V1 client pushes, REST
    batch). kind "user": a UserBroadcast (realtime.send, REST single, V2 binary pushes), turned
    into `{"event","payload","type",["meta"]}` for V1 and a binary kind-4 frame for V2.
    """

    kind: Literal["json", "user"]
    payload: Any  # json: the frame payload; user: the user payload (JSON value or bytes)
    event: str = ""
    binary: bool = False
    meta: dict[str, Any] | None = None
    msg_id: str | None = None


class JoinError(Exception):
    """A join refused with `reason` (raised and caught inside the join handler only)."""

    def __init__(self, reason: str, *, disconnect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.disconnect = disconnect


def flex_bool(value: Any) -> bool:
    """Realtime's FlexibleBoolean: true/false or "true"/"false" in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.lower() == "true"
    return False


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def payload_size(payload: Any) -> int:
    if isinstance(payload, wire.UserBroadcastPush):
        return len(payload.data)
    if isinstance(payload, bytes | bytearray):
        return len(payload)
    return len(wire.dumps(payload).encode())


class RealtimeSocket:
    """One accepted WebSocket connection (a Phoenix transport process) and its channels.

    Large (about 640 lines) because it follows Realtime's channel process message by message
    (join checks, access_token refresh, heartbeats, relay) so that realtime-py and
    realtime-js meet the same answers as on Supabase (tests/testing/test_realtime_server.py).
    """

    def __init__(
        self,
        server: RealtimeServer,
        request: web.Request,
        ws: web.WebSocketResponse,
        *,
        vsn: str,
        vsn_major: int,
        tenant_token: str,
        claims: dict[str, Any],
        sock_id: int,
    ) -> None:
        self.server = server
        self.id = sock_id
        self.ws = ws
        self.vsn = vsn
        self.vsn_major = vsn_major
        self.path = request.path
        self.query = dict(request.query)
        self.tenant_token = tenant_token  # the JWT the socket connected with
        self.claims = claims
        self.channels: dict[str, Channel] = {}
        self.frames_in: list[Frame] = []
        self.frames_out: list[Frame] = []
        self.had_channels = False
        self.counted_user = False
        self.closed = False
        self.close_code: int | None = None
        self.aborted = False
        self.connected_at = time.time()
        self._transport = request.transport
        self._mailbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stalled = False
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._dead = asyncio.Event()

    def __repr__(self) -> str:
        return f"RealtimeSocket(id={self.id}, vsn={self.vsn}, channels={list(self.channels)})"

    # ---- transport -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the socket ends; a second task handles them in order."""
        actor = asyncio.create_task(self._actor(), name=f"realtime-socket-{self.id}")
        try:
            await self._read_loop()
        finally:
            actor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await actor
            self._finish()

    async def _read_loop(self) -> None:
        ws = self.ws
        while not ws.closed and not self._dead.is_set():
            if self._stalled:
                await self._wait_unstalled()
                continue
            try:
                msg = await ws.receive(timeout=self.server.knobs.idle_timeout or None)
            except TimeoutError:
                if self.stalled:  # stalled while waiting: a stalled server has no idle timer
                    continue
                log.info("realtime_server.idle_timeout", socket=self.id)
                self.close_code = 1000
                await ws.close(code=1000)
                break
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG):
                self._mailbox.put_nowait(("in", msg))
                continue
            if msg.type is WSMsgType.ERROR:
                # aiohttp closed with the error's code (1009 for an oversized frame) but then
                # records 1006 when the peer resets; keep the code that was sent.
                self.close_code = getattr(msg.data, "code", None) or ws.close_code
                log.info(
                    "realtime_server.socket_error",
                    socket=self.id,
                    error=str(msg.data),
                    close_code=self.close_code,
                )
            break
        if self.close_code is None:
            self.close_code = ws.close_code

    async def _wait_unstalled(self) -> None:
        waiters = {
            asyncio.ensure_future(self._unstalled.wait()),
            asyncio.ensure_future(self._dead.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _actor(self) -> None:
        while True:
            kind, item = await self._mailbox.get()
            while self._stalled and not self._dead.is_set():
                await self._wait_unstalled()
            if self._dead.is_set():
                continue
            try:
                if kind == "in":
                    await self._handle_inbound(item)
                elif kind == "send":
                    await self._write(item)
                else:
                    await item()
            except ConnectionError:
                pass  # the peer went away while we were writing
            except Exception:  # a test server logs its own bugs and keeps serving
                log.exception("realtime_server.handler_failed", socket=self.id, kind=kind)

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._dead.set()
        for ch in list(self.channels.values()):
            self._drop_channel(ch)
        self.server._socket_closed(self)

    async def _write(self, data: str | bytes) -> None:
        if self.ws.closed or self._dead.is_set():
            return
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)
        self.frames_out.append(Frame(data, time.time()))
        self.server.counters.frames_out += 1
        self.server._changed()

    def _enqueue(self, data: str | bytes) -> None:
        if not self.closed:
            self._mailbox.put_nowait(("send", data))

    def _post(self, fn: Callable[[], Awaitable[None]]) -> None:
        if not self.closed:
            self._mailbox.put_nowait(("call", fn))

    def _post_sync(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()

        self._post(run)

    def abort(self) -> None:
        """Drop TCP without a close frame (the client sees 1006)."""
        if self.closed:
            return
        self.aborted = True
        if self.close_code is None:
            self.close_code = 1006
        if self._transport is not None:
            self._transport.abort()
        self._dead.set()

    async def close(self, code: int = 1000) -> None:
        """Send a close frame with `code` and end the socket."""
        if self.ws.closed:
            return
        self.close_code = code
        await self.ws.close(code=code)

    def stall(self) -> None:
        """Stop reading, answering pings and writing until `unstall()`."""
        self._stalled = True
        self._unstalled.clear()

    def unstall(self) -> None:
        """Resume after `stall()`."""
        self._stalled = False
        self._unstalled.set()

    @property
    def stalled(self) -> bool:
        """True while stalled."""
        return self._stalled

    # ---- encoding ------------------------------------------------------------------------------

    def _frame(
        self, topic: Any, event: str, payload: Any, *, ref: Any = None, join_ref: Any = None
    ) -> str:
        return wire.encode(self.vsn_major, topic, event, payload, ref=ref, join_ref=join_ref)

    def _reply(
        self, topic: Any, ref: Any, status: str, response: Any, *, join_ref: Any = None
    ) -> str:
        return self._frame(
            topic, "phx_reply", {"status": status, "response": response}, ref=ref, join_ref=join_ref
        )

    def _push(self, ch: Channel, event: str, payload: Any) -> str:
        """A channel push (system, replay, presence_state): V2 carries the join_ref."""
        return self._frame(ch.topic, event, payload, join_ref=ch.join_ref)

    def _close_frame(self, ch: Channel) -> str:
        return self._frame(ch.topic, "phx_close", {}, ref=ch.join_ref, join_ref=ch.join_ref)

    def _encode_broadcast(self, ch: Channel, out: Outgoing) -> str | bytes | None:
        if out.kind == "json":
            if self.vsn_major == 2 and not isinstance(out.payload, dict):
                return None
            return self._frame(ch.topic, "broadcast", out.payload)
        if self.vsn_major == 2:
            data = out.payload if out.binary else wire.dumps(out.payload).encode()
            return wire.encode_user_broadcast(
                ch.topic, out.event, data, json_encoded=not out.binary, metadata=out.meta
            )
        if out.binary:
            return None  # V1 sockets cannot represent binary payloads
        payload: dict[str, Any] = {"event": out.event, "payload": out.payload, "type": "broadcast"}
        if out.meta:
            payload["meta"] = out.meta
        return self._frame(ch.topic, "broadcast", payload)

    # ---- inbound -------------------------------------------------------------------------------

    async def _handle_inbound(self, msg: Any) -> None:
        if msg.type is WSMsgType.PING:
            self.server.counters.pings_in += 1
            await self.ws.pong(msg.data)
            return
        if msg.type is WSMsgType.PONG:
            return
        raw: str | bytes = msg.data
        self.frames_in.append(Frame(raw, time.time()))
        self.server.counters.frames_in += 1
        self.server._changed()
        try:
            frame = wire.decode(raw, self.vsn_major)
        except wire.MalformedFrame as exc:
            self.server.counters.malformed += 1
            log.warning("realtime_server.malformed_frame", socket=self.id, error=str(exc))
            return
        topic, event = frame.topic, frame.event
        if topic == "phoenix" and event == "heartbeat":
            await self._write(self._reply("phoenix", frame.ref, "ok", {}))
            return
        ch = self.channels.get(topic) if isinstance(topic, str) else None
        if event == "phx_join":
            await self._join(frame, ch)
            return
        if ch is None:
            if event == "phx_leave":
                await self._write(self._reply(topic, frame.ref, "ok", {}, join_ref=frame.join_ref))
            else:
                await self._write(
                    self._reply(topic, frame.ref, "error", {"reason": "unmatched topic"})
                )
            return
        if frame.join_ref is not None and ch.join_ref is not None and frame.join_ref != ch.join_ref:
            log.info("realtime_server.stale_frame", socket=self.id, topic=topic, event=event)
            return
        if event == "phx_leave":
            self._drop_channel(ch)
            self._enqueue(self._reply(ch.topic, frame.ref, "ok", {}, join_ref=ch.join_ref))
            self._enqueue(self._close_frame(ch))
        elif event == "access_token":
            self._refresh(ch, frame.payload)
        elif event == "broadcast":
            self._client_broadcast(ch, frame)
        elif event == "presence":
            self.server._events.add(1)
            self._enqueue(self._reply(ch.topic, frame.ref, "ok", {}, join_ref=ch.join_ref))
        else:
            self.server._events.add(1)
            log.info("realtime_server.unexpected_event", socket=self.id, topic=topic, event=event)

    # ---- join ----------------------------------------------------------------------------------

    async def _join(self, frame: wire.Inbound, old: Channel | None) -> None:
        srv = self.server
        k = srv.knobs
        topic = frame.topic
        if old is not None:
            # Phoenix stops the old instance and queues its phx_close before the new join runs,
            # so the client sees: new reply, then phx_close with the *old* join_ref.
            self._drop_channel(old)
            self._enqueue(self._close_frame(old))
        if not isinstance(topic, str) or not topic.startswith("realtime:"):
            await self._write(self._reply(topic, frame.ref, "error", {"reason": "unmatched topic"}))
            return
        delay = srv._next_join_delay()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            ch, pg, replay_rows, ready_opt_in = self._check_join(frame)
        except JoinError as exc:
            srv.counters.joins_error += 1
            log.info("realtime_server.join_refused", socket=self.id, topic=topic, reason=exc.reason)
            if k.channel_error_backoff > 0:
                await asyncio.sleep(k.channel_error_backoff)
            await self._write(
                self._reply(
                    topic, frame.ref, "error", {"reason": exc.reason}, join_ref=frame.join_ref
                )
            )
            if exc.disconnect:
                self._post(lambda: self.close(1001))
            srv._changed()
            return
        self.channels[topic] = ch
        self.had_channels = True
        self.counted_user = True
        srv._subscribe(ch)
        srv.counters.joins_ok += 1
        await self._write(
            self._reply(topic, frame.ref, "ok", {"postgres_changes": pg}, join_ref=frame.join_ref)
        )
        log.info(
            "realtime_server.joined",
            socket=self.id,
            topic=topic,
            private=ch.private,
            join_ref=ch.join_ref,
            replayed=len(replay_rows),
        )
        for row in replay_rows:
            data = self._encode_replay(ch, row)
            if data is not None:
                self._enqueue(data)
        if ready_opt_in:
            deadline = asyncio.get_running_loop().time() + k.replication_ready_timeout
            self._check_replication(ch, deadline)
        if ch.presence_enabled:
            self._enqueue(self._push(ch, "presence_state", {}))
        srv._changed()

    def _check_join(
        self, frame: wire.Inbound
    ) -> tuple[Channel, list[dict[str, Any]], list[StoredMessage], bool]:
        """Run RealtimeChannel.join/3's checks in order; raises JoinError with the reason."""
        srv = self.server
        k = srv.knobs
        topic: str = frame.topic
        if topic == "realtime:":
            raise JoinError("TopicNameRequired: You must provide a topic name")
        sub = topic[len("realtime:") :]
        params = frame.payload
        if not isinstance(params, dict):
            raise JoinError("Unknown Error on Channel")
        config = params.get("config")
        config = config if isinstance(config, dict) else {}
        broadcast = config.get("broadcast")
        broadcast = broadcast if isinstance(broadcast, dict) else {}
        presence = config.get("presence")
        presence = presence if isinstance(presence, dict) else {}
        private = flex_bool(config.get("private"))
        presence_enabled = flex_bool(presence.get("enabled")) or k.presence_enabled
        token = self._choose_token(params)

        if k.restarting:
            raise JoinError("RealtimeRestarting: Realtime is restarting, please standby")
        if k.suspended:
            raise JoinError("RealtimeDisabledForTenant: Realtime disabled for this tenant")
        if k.private_only and not private:
            raise JoinError("PrivateOnly: This project only allows private channels")
        if (
            k.max_concurrent_users is not None
            and not self.counted_user
            and srv._users() >= k.max_concurrent_users
        ):
            raise JoinError("ConnectionRateLimitReached: Too many connected users")
        if k.join_rate_limited or srv._joins_triggered():
            raise JoinError(
                "ClientJoinRateLimitReached: Too many joins per second", disconnect=True
            )
        srv._joins.add(1)
        if len(self.channels) >= k.max_channels_per_client:
            raise JoinError("ChannelRateLimitReached: Too many channels")
        checked = srv.check_channel_token(token)
        if isinstance(checked, TokenFailure):
            raise JoinError(checked.join_reason())
        claims, diff = checked
        if k.db_unreachable:
            raise JoinError(f"UnableToConnectToProject: {DB_DOWN}")

        read, presence_read = True, False
        if private:
            if k.db_down:
                raise JoinError(DB_DOWN)
            if k.missing_partition:
                raise JoinError(
                    "MissingPartition: Realtime was unable to find the expected messages partition"
                )
            pol = srv._evaluate(claims, sub, "read")
            if pol is None:
                raise JoinError(f"Unauthorized: {READ_DENIED.format(sub)}")
            read = pol.read
            presence_read = presence_enabled and (
                pol.read if pol.presence_read is None else pol.presence_read
            )
            if not (read or presence_read):
                raise JoinError(f"Unauthorized: {READ_DENIED.format(sub)}")

        replay_rows: list[StoredMessage] = []
        if "replay" in broadcast:
            if private and not read:
                raise JoinError(f"Unauthorized: {READ_DENIED.format(sub)}")
            if not private:
                raise JoinError("UnableToReplayMessages: Replay is not allowed for public channels")
            replay = broadcast["replay"]
            if isinstance(replay, dict):
                since: Any = replay.get("since")
                limit: Any = replay.get("limit")
                if limit is None or limit is False:  # `replay_params["limit"] || 25`
                    limit = REPLAY_DEFAULT_LIMIT
                if not (is_int(since) and is_int(limit) and _UNIX_MS_MIN <= since <= _UNIX_MS_MAX):
                    raise JoinError("UnableToReplayMessages: Replay params are not valid")
                if k.replay_fails:
                    raise JoinError(
                        "UnableToReplayMessages: Realtime was unable to replay messages"
                    )
                replay_rows = srv._replay_rows(sub, since, max(min(limit, REPLAY_HARD_LIMIT), 1))
        if k.unknown_error:
            raise JoinError("Unknown Error on Channel")

        pg_in = config.get("postgres_changes")
        pg: list[dict[str, Any]] = []
        if isinstance(pg_in, list):
            for entry in pg_in:
                if isinstance(entry, dict):
                    pg.append({**entry, "id": zlib.crc32(wire.dumps(entry).encode())})
        ch = Channel(
            sock=self,
            topic=topic,
            sub_topic=sub,
            join_ref=frame.join_ref,
            private=private,
            ack=flex_bool(broadcast.get("ack")),
            self_broadcast=flex_bool(broadcast.get("self")),
            presence_enabled=presence_enabled,
            token=token,
            claims=claims,
            read=read,
            presence_read=presence_read,
            replayed_ids={r.id for r in replay_rows},
            joined_at=time.time(),
        )
        self._arm_expiry(ch, diff)
        ready_opt_in = bool(broadcast.get("replication_ready") not in (None, False))
        return ch, pg, replay_rows, ready_opt_in

    def _choose_token(self, params: Mapping[str, Any]) -> str:
        """RealtimeChannel.assign_access_token/2, including its user_token precedence."""
        first = params.get("access_token")
        if first is None or first is False:
            first = params.get("user_token")
        if isinstance(first, str) and first.startswith("sb_"):
            return self.tenant_token
        user_token = params.get("user_token")
        if isinstance(user_token, str):
            return user_token
        access_token = params.get("access_token")
        if isinstance(access_token, str):
            return access_token
        return self.tenant_token

    def _encode_replay(self, ch: Channel, row: StoredMessage) -> str | bytes | None:
        meta = {"replayed": True, "id": row.id}
        if row.binary_payload is not None:
            if self.vsn_major == 1:
                return None
            return wire.encode_user_broadcast(
                ch.topic, row.event, row.binary_payload, json_encoded=False, metadata=meta
            )
        payload = {"payload": row.payload, "event": row.event, "type": "broadcast", "meta": meta}
        return self._push(ch, "broadcast", payload)

    def _check_replication(self, ch: Channel, deadline: float) -> None:
        if not ch.live:
            return
        loop = asyncio.get_running_loop()
        if self.server.replication_up:
            self._system(ch, "Replication connection established", "ok")
            return
        if loop.time() >= deadline:
            self.shutdown_channel(ch, "Replication connection was not established in time")
            return
        ch._timers.append(
            loop.call_later(0.5, self._post_sync, lambda: self._check_replication(ch, deadline))
        )

    # ---- channel lifecycle -----------------------------------------------------------------------

    def _arm_expiry(self, ch: Channel, seconds_left: int) -> None:
        ch._cancel_timers()
        delay = min(self.server.knobs.confirm_token_interval, float(seconds_left))
        loop = asyncio.get_running_loop()
        ch._timers.append(loop.call_later(delay, self._post_sync, lambda: self._confirm(ch)))

    def _confirm(self, ch: Channel) -> None:
        """RealtimeChannel.handle_info(:confirm_token): re-validate, close on failure."""
        if not ch.live:
            return
        self._revalidate(ch)

    def _revalidate(self, ch: Channel) -> dict[str, Any] | None:
        """Check the channel's token again: close the channel if it fails, else keep the new
        claims and re-arm the expiry check. The claims, or None when the channel was closed."""
        checked = self.server.check_channel_token(ch.token)
        if isinstance(checked, TokenFailure):
            self.shutdown_channel(ch, checked.refresh_message())
            return None
        ch.claims, seconds_left = checked
        self._arm_expiry(ch, seconds_left)
        return ch.claims

    def _drop_channel(self, ch: Channel) -> None:
        """Forget the channel at once (unsubscribe); frames already queued still go out."""
        ch.live = False
        ch._cancel_timers()
        if self.channels.get(ch.topic) is ch:
            del self.channels[ch.topic]
        self.server._unsubscribe(ch)
        self.server._changed()

    def shutdown_channel(self, ch: Channel, message: str) -> None:
        """A system error with `message`, then phx_close (RealtimeChannel.shutdown_response)."""
        if not ch.live:
            return
        log.info(
            "realtime_server.channel_shutdown", socket=self.id, topic=ch.topic, message=message
        )
        self._drop_channel(ch)
        self._system(ch, message, "error")
        self._enqueue(self._close_frame(ch))

    def _system(self, ch: Channel, message: str, status: str) -> None:
        """Queue one of Realtime's `system` extension notices for the channel."""
        payload = {
            "channel": ch.sub_topic,
            "extension": "system",
            "message": message,
            "status": status,
        }
        self._enqueue(self._push(ch, "system", payload))

    def crash_channel(self, ch: Channel) -> None:
        """The channel process dies: phx_error with the join_ref, and the channel is gone."""
        if not ch.live:
            return
        self._drop_channel(ch)
        self._enqueue(self._frame(ch.topic, "phx_error", {}, ref=ch.join_ref, join_ref=ch.join_ref))

    def _refresh(self, ch: Channel, payload: Any) -> None:
        """RealtimeChannel.handle_in("access_token"): no reply on success."""
        if not isinstance(payload, dict) or "access_token" not in payload:
            return
        new = payload["access_token"]
        if not isinstance(new, str) or new.startswith("sb_") or new == ch.token:
            return
        srv = self.server
        srv.counters.refreshes += 1
        prev_read, prev_presence = ch.read, ch.presence_read
        ch.token = new
        ch.write = None
        claims = self._revalidate(ch)
        if claims is None:
            return
        if ch.private:
            if srv.knobs.db_down or srv.knobs.missing_partition:
                self.shutdown_channel(ch, DB_DOWN)
                return
            pol = srv._evaluate(claims, ch.sub_topic, "read")
            if pol is None:
                self.shutdown_channel(ch, READ_DENIED.format(ch.sub_topic))
                return
            read = pol.read
            presence_read = ch.presence_enabled and (
                pol.read if pol.presence_read is None else pol.presence_read
            )
            if not (read or presence_read):
                self.shutdown_channel(ch, READ_DENIED.format(ch.sub_topic))
                return
            if (prev_read and not read) or (prev_presence and not presence_read):
                self.shutdown_channel(ch, READ_REVOKED.format(ch.sub_topic))
                return
            ch.read, ch.presence_read = read, presence_read
        log.info("realtime_server.token_refreshed", socket=self.id, topic=ch.topic)
        srv._changed()

    def _client_broadcast(self, ch: Channel, frame: wire.Inbound) -> None:
        """BroadcastHandler.handle/3: write policy (cached), size limit, relay, ack."""
        srv = self.server
        k = srv.knobs
        payload = frame.payload
        srv.counters.client_broadcasts += 1
        if ch.private:
            if k.db_down:
                return
            if ch.write is None:
                pol = srv._evaluate(ch.claims, ch.sub_topic, "write")
                if pol is None:
                    return  # RlsPolicyError: logged, nothing cached, no reply
                ch.write = pol.write
            if not ch.write:
                return  # RLS denials are silent, even with ack
        srv._events.add(1)
        too_big = payload_size(payload) > k.max_payload_kb * 1000 + 500
        if not too_big:
            if isinstance(payload, wire.UserBroadcastPush):
                out = self._user_push_outgoing(payload)
            else:
                out = Outgoing("json", payload)
            if out is not None:
                srv._fanout(
                    ch.private, ch.sub_topic, out, exclude=None if ch.self_broadcast else ch
                )
        if ch.ack:
            if too_big:
                response: Any = (
                    "payload_size_exceeded"
                    if k.payload_size_reply == "string"
                    else {"error": "payload_size_exceeded"}
                )
                self._enqueue(
                    self._reply(ch.topic, frame.ref, "error", response, join_ref=ch.join_ref)
                )
            else:
                self._enqueue(self._reply(ch.topic, frame.ref, "ok", {}, join_ref=ch.join_ref))

    @staticmethod
    def _user_push_outgoing(push: wire.UserBroadcastPush) -> Outgoing | None:
        if push.encoding == "binary":
            return Outgoing("user", push.data, event=push.event, binary=True)
        try:
            value = json.loads(push.data)
        except ValueError:
            return None
        return Outgoing("user", value, event=push.event)
