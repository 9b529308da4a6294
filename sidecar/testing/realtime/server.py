"""A local Supabase Realtime for tests and the demo: Phoenix V1 (and V2) over aiohttp, with faults.

Faithful to supabase/realtime 2.129.8 for what a realtime-py 2.34.1 client on a private broadcast
channel can observe (see shared/reference/realtime-protocol.md §8): the handshake and its HTTP
error bodies, heartbeats, the join checks with their exact `reason` strings and the 5 s error
backoff, RLS emulated by a policy function, replay, duplicate joins, token expiry and refresh,
client broadcasts, `realtime.send` and the REST broadcast API, the per-tenant rate limits, and
every server-side fault of §8.8. Frames of one socket are handled one at a time, like the Phoenix
transport process: a slow join holds the socket, and channel pushes queue behind it.

Use it as `async with RealtimeServer() as rt:` (127.0.0.1, port 0) and point the client at
`rt.url`, or run `python -m sidecar.testing.realtime.server` and drive it over `/_admin/*`:
POST /_admin/send {topic, event, payload, private?, id?} → {"id"}; POST /_admin/fault
{"kind": <fault method name>, ...its keyword arguments}; POST /_admin/token {role, exp_in, sub,
claims} → {"token"}; POST /_admin/knobs {field: value}; POST /_admin/policy {read, write,
topics: {sub_topic: {read, write}}}; GET /_admin/state.

Auth modes (`knobs.auth_mode`): "gateway" (default) puts Kong in front, so the URL apikey must be
one of the configured keys (`anon_key`, `publishable_key`, `service_role_key`, `secret_key`) and
Kong's 401 bodies come back immediately; "jwt" is Realtime alone: any JWT signed with the secret
that has `role` and `exp`, refused with Realtime's `{"error": ...}` after connect_error_backoff.

Protocol versions: V1 (`vsn=1.0.0`, realtime-py) and V2 (`vsn=2.0.0`, realtime-js' default):
array text frames, binary user broadcasts (kind 3 in, kind 4 out), binary payloads for V2 only.

Not modelled: presence tracking (`presence` pushes are acknowledged, `presence_state` is empty,
no `presence_diff`), postgres_changes (bindings are echoed with ids, nothing is streamed), JWKS
and asymmetric JWTs (only HS256/384/512), the REST batch-size rate limit, and Realtime's
`persist` broadcast option.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import structlog
from aiohttp import web

from sidecar.testing._server import run_standalone, until_terminated
from sidecar.testing.realtime import wire
from sidecar.testing.realtime.jwt import TokenFailure, confirm_exp, mint, verify
from sidecar.testing.realtime.socket import (
    RATE_LIMITED,
    Channel,
    Frame,
    Outgoing,
    RealtimeSocket,
    StoredMessage,
    flex_bool,
    payload_size,
)

__all__ = [
    "Channel",
    "Counters",
    "Frame",
    "Knobs",
    "Policy",
    "PolicyFn",
    "RealtimeServer",
    "RealtimeSocket",
    "StoredMessage",
    "allow_all",
    "main",
]

log = structlog.get_logger(component="realtime_server")

WS_PATHS = ("/realtime/v1/websocket", "/socket/websocket")
_HANDSHAKE_ERRORS = {
    401: "Token has expired",
    403: "Realtime was disabled for this tenant",
    404: "Tenant not found",
    429: "Too many connected users",
}
_HANDSHAKE_DEFAULT_ERROR = "Error connecting to Realtime"


@dataclass(frozen=True, slots=True)
class Policy:
    """What RLS on `realtime.messages` would allow for one JWT and topic (extension broadcast).

    `presence_read` only matters when presence is enabled on the channel; None means "as read".
    """

    read: bool = True
    write: bool = True
    presence_read: bool | None = None


PolicyFn = Callable[[Mapping[str, Any], str], "Policy | Mapping[str, bool]"]


def allow_all(_claims: Mapping[str, Any], _topic: str) -> Policy:
    """The default policy: every JWT may read and write every topic."""
    return Policy(read=True, write=True)


@dataclass(slots=True)
class Knobs:
    """Server behaviour; tests may change any field at any time (read on every use).

    Defaults are the real server's (self-hosted defaults, or hosted where it differs and matters).
    """

    # Handshake (§1, §8.1)
    auth_mode: Literal["gateway", "jwt"] = "gateway"  # gateway: apikey must be a configured key
    connect_error_backoff: float = 2.0  # CONNECT_ERROR_BACKOFF_MS
    idle_timeout: float | None = 60.0  # Phoenix/cowboy websocket timeout; close 1000
    max_frame_size: int = 5_000_000  # inbound; larger → close 1009
    suspended: bool = False  # tenant suspended: handshake 403, joins RealtimeDisabledForTenant
    jwt_claim_validators: dict[str, Any] = field(default_factory=dict)  # JWT_CLAIM_VALIDATORS
    # Joins (§2, §8.4)
    channel_error_backoff: float = 5.0  # CHANNEL_ERROR_BACKOFF_MS, before every join error
    join_delay_s: float = 0.0  # hold every join (and the socket) this long before answering
    private_only: bool = False
    max_channels_per_client: int = 100
    max_concurrent_users: int | None = None  # hosted Free 200, Pro 500
    max_joins_per_second: float | None = None  # hosted Free 100, Pro 500
    join_rate_limited: bool = False  # force ClientJoinRateLimitReached (+ close 1001)
    restarting: bool = False  # RealtimeRestarting
    db_down: bool = False  # private joins/refreshes: "Realtime was unable to connect to ..."
    db_unreachable: bool = False  # every join: UnableToConnectToProject
    missing_partition: bool = False  # realtime.send drops; private joins MissingPartition
    replay_fails: bool = False  # UnableToReplayMessages: Realtime was unable to replay messages
    unknown_error: bool = False  # "Unknown Error on Channel"
    policy_raises: bool = False  # RLS policy raises → Unauthorized (RlsPolicyError)
    presence_enabled: bool = False  # tenant-level presence_enabled
    confirm_token_interval: float = 300.0  # re-validate the channel token at least this often
    replication_ready_timeout: float = 60.0
    # Broadcast (§4, §8.6, §8.9)
    max_payload_kb: int = 3000  # hosted Free 256, Pro 3000
    payload_size_reply: Literal["string", "object"] = "string"  # ack reply shape when too big
    max_events_per_second: float | None = None  # hosted Free 100, Pro 500; avg over 60 s
    rate_limited: bool = False  # force the events-per-second limit to "triggered"
    replication_up: bool | None = None  # None: up once any client has connected
    retention_s: float = 72 * 3600.0
    # Tracker (§1.6)
    zero_channel_sweep: float = 600.0  # NO_CHANNEL_TIMEOUT_IN_MS

    @classmethod
    def plan(cls, name: Literal["free", "pro"], **overrides: Any) -> Knobs:
        """Knobs with the hosted plan's limits (D-LIMITS), plus `overrides`."""
        limits: dict[str, Any] = {
            "free": {
                "max_payload_kb": 256,
                "max_events_per_second": 100.0,
                "max_joins_per_second": 100.0,
                "max_channels_per_client": 100,
                "max_concurrent_users": 200,
            },
            "pro": {
                "max_payload_kb": 3000,
                "max_events_per_second": 500.0,
                "max_joins_per_second": 500.0,
                "max_channels_per_client": 100,
                "max_concurrent_users": 500,
            },
        }[name]
        return cls(**{**limits, **overrides})

    def to_json(self) -> dict[str, Any]:
        """All knobs as a JSON-able dict."""
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Counters:
    """What happened so far, for test assertions."""

    handshakes: int = 0  # WebSocket upgrade requests seen
    accepted: int = 0
    refused: int = 0
    disconnects: int = 0
    frames_in: int = 0
    frames_out: int = 0
    malformed: int = 0
    joins_ok: int = 0
    joins_error: int = 0
    refreshes: int = 0  # access_token pushes that changed the token
    client_broadcasts: int = 0
    delivered: int = 0  # broadcast copies handed to sockets (rate-counted)
    rest_requests: int = 0


@dataclass(slots=True)
class _Refusal:
    status: int
    body: bytes
    content_type: str | None
    until: float | None
    backoff: bool


class _RateCounter:
    """Events in a sliding window, read as a per-second average (RateCounter's 12 x 5 s)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, n: int = 1) -> None:
        self._events.append((time.monotonic(), n))
        self._total += n

    def rate(self) -> float:
        cutoff = time.monotonic() - self.window
        while self._events and self._events[0][0] < cutoff:
            self._total -= self._events.popleft()[1]
        return self._total / self.window


def _wire_topic(topic: str) -> str:
    return topic if topic.startswith("realtime:") else f"realtime:{topic}"


def _vsn_major(vsn: str) -> int | None:
    """1 or 2 when `vsn` matches `~> 1.0.0` or `~> 2.0.0` (Phoenix negotiate_serializer)."""
    core, _, _build = vsn.partition("+")
    if "-" in core:
        return None  # pre-releases do not match a plain requirement
    bits = core.split(".")
    if len(bits) != 3 or not all(b.isdigit() and (b == "0" or not b.startswith("0")) for b in bits):
        return None
    major, minor = int(bits[0]), int(bits[1])
    if minor == 0 and major in (1, 2):
        return major
    return None


class RealtimeServer:
    """A Supabase Realtime stand-in on 127.0.0.1 (port 0 by default); see the module docstring.

    Keys: `anon_key` (an anon JWT, or the `anon_key` given), `service_role_key`,
    `publishable_key` and `secret_key` (opaque `sb_…` keys the gateway maps to JWTs).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        jwt_secret: str | None = None,
        anon_key: str | None = None,
        knobs: Knobs | None = None,
        policy: PolicyFn | None = None,
        admin: bool = True,
    ) -> None:
        self.host = host
        self._port = port
        self.jwt_secret = jwt_secret or secrets.token_urlsafe(32)
        self.knobs = knobs or Knobs()
        self.policy: PolicyFn = policy or allow_all
        self.admin = admin
        now = int(time.time())
        ten_years = 10 * 365 * 86400
        anon_jwt = mint(
            self.jwt_secret, {"iss": "supabase", "role": "anon", "iat": now, "exp": now + ten_years}
        )
        service_jwt = mint(
            self.jwt_secret,
            {"iss": "supabase", "role": "service_role", "iat": now, "exp": now + ten_years},
        )
        self.anon_key = anon_key or anon_jwt
        self.service_role_key = service_jwt
        self.publishable_key = "sb_publishable_" + secrets.token_urlsafe(16)
        self.secret_key = "sb_secret_" + secrets.token_urlsafe(16)
        anon_target = self.anon_key if self.anon_key.count(".") == 2 else anon_jwt
        # Kong key-auth consumers and the JWT its request-transformer hands to Realtime.
        self.gateway_keys: dict[str, str] = {
            self.anon_key: anon_target,
            self.publishable_key: anon_jwt,
            self.service_role_key: service_jwt,
            self.secret_key: service_jwt,
        }
        self.counters = Counters()
        self.sockets: list[RealtimeSocket] = []
        self.messages: list[StoredMessage] = []
        self.policy_calls: list[tuple[str, str]] = []  # (purpose, sub-topic) per evaluation
        self._subs: dict[tuple[bool, str], list[Channel]] = {}
        self._events = _RateCounter(60.0)
        self._joins = _RateCounter(1.0)
        self._join_delays: deque[float] = deque()
        self._refusal: _Refusal | None = None
        self._seq = 0
        self._next_sock_id = 0
        self._change = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start listening (idempotent)."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in WS_PATHS:
            app.router.add_get(path, self._handle_ws)
        for prefix in ("/realtime/v1/api", "/api"):
            app.router.add_post(f"{prefix}/broadcast", self._handle_rest_batch)
            app.router.add_post(
                f"{prefix}/broadcast/{{topic}}/events/{{event}}", self._handle_rest_single
            )
        if self.admin:
            app.router.add_post("/_admin/send", self._admin_send)
            app.router.add_post("/_admin/fault", self._admin_fault)
            app.router.add_post("/_admin/token", self._admin_token)
            app.router.add_post("/_admin/knobs", self._admin_knobs)
            app.router.add_post("/_admin/policy", self._admin_policy)
            app.router.add_get("/_admin/state", self._admin_state)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._restart_sweeper()
        log.info("realtime_server.started", url=self.url)

    async def stop(self) -> None:
        """Drop every socket and stop listening (idempotent)."""
        if self._runner is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for sock in self.open_sockets:
            sock.abort()
        runner, self._runner = self._runner, None
        await runner.cleanup()
        log.info("realtime_server.stopped")

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        return self._port

    @property
    def base_url(self) -> str:
        """`http://HOST:PORT`."""
        return f"http://{self.host}:{self._port}"

    @property
    def url(self) -> str:
        """What a Supabase client is given: `http://HOST:PORT/realtime/v1`."""
        return f"{self.base_url}/realtime/v1"

    @property
    def ws_url(self) -> str:
        """`ws://HOST:PORT/realtime/v1/websocket` (add `?apikey=…&vsn=1.0.0`)."""
        return f"ws://{self.host}:{self._port}/realtime/v1/websocket"

    @property
    def replication_up(self) -> bool:
        """Whether realtime.send rows are streamed live (knob, or auto once a client connected)."""
        if self.knobs.replication_up is not None:
            return self.knobs.replication_up
        return self.counters.accepted > 0

    def make_token(
        self,
        *,
        role: str | None = "authenticated",
        exp_in: float | None = 3600,
        sub: str | None = "00000000-0000-4000-8000-000000000001",
        alg: str = "HS256",
        secret: str | None = None,
        **claims: Any,
    ) -> str:
        """An HS256 JWT signed with the project secret; a claim given as None is left out."""
        now = time.time()
        body: dict[str, Any] = {
            "iss": "supabase",
            "iat": int(now),
            "role": role,
            "sub": sub,
            "exp": int(now + exp_in) if exp_in is not None else None,
            **claims,
        }
        return mint(
            secret or self.jwt_secret, {k: v for k, v in body.items() if v is not None}, alg=alg
        )

    # ---- introspection ---------------------------------------------------------------------------

    @property
    def open_sockets(self) -> list[RealtimeSocket]:
        """Sockets still connected."""
        return [s for s in self.sockets if not s.closed]

    def channels(self, topic: str | None = None) -> list[Channel]:
        """Live channels, optionally only those for `topic` (sub-topic or `realtime:` form)."""
        out: list[Channel] = []
        for sock in self.open_sockets:
            for ch in sock.channels.values():
                if topic is None or ch.topic == _wire_topic(topic):
                    out.append(ch)
        return out

    def joined(self, topic: str) -> bool:
        """True when some socket has `topic` joined."""
        return bool(self.channels(topic))

    def joined_topics(self) -> set[str]:
        """Sub-topics (without `realtime:`) joined on any open socket."""
        return {ch.sub_topic for ch in self.channels()}

    def frames_out(self, event: str | None = None, topic: str | None = None) -> list[Any]:
        """Parsed text frames sent to clients (V1 dicts or V2 lists), optionally filtered."""
        out = []
        for sock in self.sockets:
            for f in sock.frames_out:
                d = f.data
                if d is None:
                    continue
                ev, tp = (d.get("event"), d.get("topic")) if isinstance(d, dict) else (d[3], d[2])
                if (event is None or ev == event) and (topic is None or tp == _wire_topic(topic)):
                    out.append(d)
        return out

    def frames_in(self, event: str | None = None, topic: str | None = None) -> list[Any]:
        """Parsed text frames received from clients, optionally filtered."""
        out = []
        for sock in self.sockets:
            for f in sock.frames_in:
                d = f.data
                if isinstance(d, dict):
                    ev, tp = d.get("event"), d.get("topic")
                elif isinstance(d, list) and len(d) >= 5:
                    ev, tp = d[3], d[2]
                else:
                    continue
                if (event is None or ev == event) and (topic is None or tp == _wire_topic(topic)):
                    out.append(d)
        return out

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109 - test helper API
        """Wait until `predicate()` is true (re-checked on every server event); TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._change.clear()
                waiter = asyncio.ensure_future(self._change.wait())
                try:
                    # Some conditions depend on time only (a client-side timer): poll too.
                    await asyncio.wait({waiter}, timeout=0.05)
                finally:
                    waiter.cancel()

    async def wait_joined(self, topic: str, timeout: float = 5.0) -> Channel:  # noqa: ASYNC109 - test helper API
        """Wait until `topic` is joined on some socket; the newest such channel."""
        await self.wait_until(lambda: self.joined(topic), timeout)
        return max(self.channels(topic), key=lambda c: c.joined_at)

    async def wait_connected(self, count: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - test helper API
        """Wait until at least `count` handshakes were accepted in total."""
        await self.wait_until(lambda: self.counters.accepted >= count, timeout)

    def _changed(self) -> None:
        self._change.set()

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot for `/_admin/state` and debugging."""
        return {
            "url": self.url,
            "replication_up": self.replication_up,
            "rate_limited": self._events_triggered(),
            "counters": dataclasses.asdict(self.counters),
            "knobs": self.knobs.to_json(),
            "joined_topics": sorted(self.joined_topics()),
            "messages": len(self.messages),
            "sockets": [
                {
                    "id": s.id,
                    "vsn": s.vsn,
                    "path": s.path,
                    "closed": s.closed,
                    "close_code": s.close_code,
                    "stalled": s.stalled,
                    "frames_in": len(s.frames_in),
                    "frames_out": len(s.frames_out),
                    "channels": [
                        {
                            "topic": c.topic,
                            "join_ref": c.join_ref,
                            "private": c.private,
                            "exp": c.claims.get("exp"),
                        }
                        for c in s.channels.values()
                    ],
                }
                for s in self.sockets
            ],
        }

    # ---- internals shared with sockets -----------------------------------------------------------

    def _socket_closed(self, sock: RealtimeSocket) -> None:
        self.counters.disconnects += 1
        log.info("realtime_server.disconnected", socket=sock.id, close_code=sock.close_code)
        self._changed()

    def _subscribe(self, ch: Channel) -> None:
        self._subs.setdefault((ch.private, ch.sub_topic), []).append(ch)

    def _unsubscribe(self, ch: Channel) -> None:
        subs = self._subs.get((ch.private, ch.sub_topic))
        if subs and ch in subs:
            subs.remove(ch)

    def _users(self) -> int:
        return sum(1 for s in self.open_sockets if s.counted_user)

    def _joins_triggered(self) -> bool:
        limit = self.knobs.max_joins_per_second
        return limit is not None and self._joins.rate() > limit

    def _events_triggered(self) -> bool:
        limit = self.knobs.max_events_per_second
        return self.knobs.rate_limited or (limit is not None and self._events.rate() > limit)

    def _next_join_delay(self) -> float:
        if self._join_delays:
            return self._join_delays.popleft()
        return self.knobs.join_delay_s

    def _evaluate(self, claims: Mapping[str, Any], sub: str, purpose: str) -> Policy | None:
        """Run the policy function like an RLS check; None when the policy "raises"."""
        self.policy_calls.append((purpose, sub))
        if self.knobs.policy_raises:
            log.info("realtime_server.rls_policy_error", topic=sub, purpose=purpose)
            return None
        if claims.get("role") == "service_role":
            return Policy(read=True, write=True, presence_read=True)  # BYPASSRLS
        try:
            result = self.policy(claims, sub)
        except Exception as exc:  # noqa: BLE001 - a raising policy is the RLS error case
            log.info(
                "realtime_server.rls_policy_error", topic=sub, purpose=purpose, error=repr(exc)
            )
            return None
        if isinstance(result, Policy):
            return result
        return Policy(
            read=bool(result.get("read", False)),
            write=bool(result.get("write", False)),
            presence_read=result.get("presence_read"),
        )

    def _too_big(self, payload: Any) -> bool:
        return payload_size(payload) > self.knobs.max_payload_kb * 1000 + 500

    def _fanout(
        self, private: bool, sub: str, out: Outgoing, *, exclude: Channel | None = None
    ) -> int:
        """Deliver to every subscriber of (private, sub) like MessageDispatcher.dispatch/3."""
        delivered = 0
        for ch in list(self._subs.get((private, sub), ())):
            if ch is exclude or not ch.live:
                continue
            if not ch.read:
                continue  # joined through presence read only: broadcasts are filtered out
            if out.msg_id is not None and out.msg_id in ch.replayed_ids:
                continue
            self._events.add(1)
            self.counters.delivered += 1
            delivered += 1
            data = ch.sock._encode_broadcast(ch, out)
            if data is not None:
                ch.sock._enqueue(data)
            if self._events_triggered():
                ch.sock.shutdown_channel(ch, RATE_LIMITED)
        self._changed()
        return delivered

    def _replay_rows(self, sub: str, since: int, limit: int) -> list[StoredMessage]:
        horizon = (time.time() + 60) * 1000
        rows = [
            m
            for m in self.messages
            if m.topic == sub
            and m.private
            and m.extension == "broadcast"
            and since <= m.inserted_ms < horizon
        ]
        rows.sort(key=lambda m: (m.inserted_ms, m.seq), reverse=True)
        return list(reversed(rows[:limit]))

    def _store(
        self,
        topic: str,
        event: str,
        payload: dict[str, Any] | None,
        binary: bytes | None,
        private: bool,
        row_id: str,
    ) -> StoredMessage:
        now = datetime.now(UTC)
        self._seq += 1
        row = StoredMessage(
            id=row_id,
            topic=topic,
            event=event,
            payload=payload,
            binary_payload=binary,
            private=private,
            inserted_at=now,
            inserted_ms=int(now.timestamp() * 1000),
            seq=self._seq,
        )
        cutoff = (now.timestamp() - self.knobs.retention_s) * 1000
        self.messages = [m for m in self.messages if m.inserted_ms >= cutoff]
        self.messages.append(row)
        return row

    # ---- injection API (§8.7) --------------------------------------------------------------------

    def send_db(
        self, topic: str, event: str, payload: Any, private: bool = True, id: str | None = None
    ) -> str | None:
        """Emulate `realtime.send(payload, event, topic, private)`; the row id, or None if refused.

        `topic` is the sub-topic (e.g. "project:abc"). A non-object payload and a missing
        partition only log a warning (the SQL function swallows the error). The row is stored
        for replay; it is delivered live with `meta.id` only while replication is up and the
        tenant is not rate limited.
        """
        if not isinstance(payload, dict):
            log.warning(
                "realtime_server.send_failed",
                code="WarnSendingBroadcastMessage",
                reason="payload must be a JSON object",
                topic=topic,
            )
            return None
        if self.knobs.missing_partition:
            log.warning(
                "realtime_server.send_failed",
                code="WarnSendingBroadcastMessage",
                reason="missing partition",
                topic=topic,
            )
            return None
        row_id = id or str(uuid.uuid4())
        body = dict(payload)
        if "id" not in body:
            body["id"] = row_id
        self._store(topic, event, body, None, private, row_id)
        self._changed()
        if not self.replication_up:
            log.info("realtime_server.send_stored_only", topic=topic, id=row_id)
            return row_id
        if self._events_triggered():
            log.info("realtime_server.send_dropped", reason="rate_limited", topic=topic)
            return row_id
        if self._too_big(body):
            log.warning(
                "realtime_server.send_dropped",
                code="UnableToBroadcastChanges",
                reason="payload_size_exceeded",
                topic=topic,
            )
            return row_id
        self._fanout(
            private, topic, Outgoing("user", body, event=event, meta={"id": row_id}, msg_id=row_id)
        )
        return row_id

    def send_binary(
        self, topic: str, event: str, data: bytes, private: bool = True, id: str | None = None
    ) -> str:
        """Emulate `realtime.send_binary`: stored; delivered to V2 sockets only, never to V1."""
        row_id = id or str(uuid.uuid4())
        self._store(topic, event, None, bytes(data), private, row_id)
        if self.replication_up and not self._events_triggered():
            self._fanout(
                private,
                topic,
                Outgoing(
                    "user",
                    bytes(data),
                    event=event,
                    binary=True,
                    meta={"id": row_id},
                    msg_id=row_id,
                ),
            )
        return row_id

    def _rest_claims(self, token: str | None) -> dict[str, Any] | TokenFailure | None:
        if token is None:
            return None
        return self.verify_token(token)

    def verify_token(self, token: str) -> dict[str, Any] | TokenFailure:
        """`verify()` with this server's secret and claim validators."""
        return verify(token, self.jwt_secret, validators=self.knobs.jwt_claim_validators)

    def check_channel_token(self, token: str) -> tuple[dict[str, Any], int] | TokenFailure:
        """What a channel checks at join and on every confirm: the token verifies and has not
        expired. The claims and the seconds left, or the first failure."""
        claims = self.verify_token(token)
        if isinstance(claims, TokenFailure):
            return claims
        left = confirm_exp(claims)
        return left if isinstance(left, TokenFailure) else (claims, left)

    def _may_write(self, claims: Mapping[str, Any] | None, topic: str) -> bool:
        if claims is None:
            return True
        pol = self._evaluate(claims, topic, "write")
        return pol is not None and pol.write

    def send_rest_batch(
        self, messages: Sequence[Any], *, token: str | None = None
    ) -> tuple[int, Any]:
        """`POST /api/broadcast`: (status, JSON body or None); token None = bypass auth and RLS."""
        self.counters.rest_requests += 1
        claims = self._rest_claims(token)
        if isinstance(claims, TokenFailure):
            return 401, {"message": "Unauthorized"}
        if self._events_triggered():
            return 429, {"message": "You have exceeded your rate limit"}
        if not isinstance(messages, list | tuple) or not messages:
            return 422, {"errors": {"messages": ["can't be blank"]}}
        errors: list[dict[str, list[str]]] = []
        for m in messages:
            err: dict[str, list[str]] = {}
            if not isinstance(m, Mapping):
                errors.append({"messages": ["is invalid"]})
                continue
            for key in ("topic", "event"):
                if not isinstance(m.get(key), str) or not m.get(key):
                    err[key] = ["can't be blank"]
            if not isinstance(m.get("payload"), dict):
                err["payload"] = ["can't be blank" if m.get("payload") is None else "is invalid"]
            elif self._too_big(m["payload"]):
                err["payload"] = ["Payload size exceeds tenant limit"]
            errors.append(err)
        if any(errors):
            return 422, {"errors": {"messages": errors}}
        for m in messages:
            private = flex_bool(m.get("private"))
            if private and not self._may_write(claims, m["topic"]):
                continue  # silently skipped; still 202
            body: dict[str, Any] = {
                "payload": m["payload"],
                "event": m["event"],
                "type": "broadcast",
            }
            msg_id = m.get("id")
            if msg_id is not None:
                body["meta"] = {"id": msg_id}
            self._fanout(
                private,
                m["topic"],
                Outgoing("json", body, event=m["event"], msg_id=msg_id if msg_id else None),
            )
        return 202, None

    def send_rest_single(
        self, topic: str, event: str, body: Any, private: bool = False, *, token: str | None = None
    ) -> tuple[int, Any]:
        """`POST /api/broadcast/:topic/events/:event`: (status, JSON body or None)."""
        self.counters.rest_requests += 1
        claims = self._rest_claims(token)
        if isinstance(claims, TokenFailure):
            return 401, {"message": "Unauthorized"}
        if self._events_triggered():
            return 429, {"message": "You have exceeded your rate limit"}
        binary = isinstance(body, bytes | bytearray)
        if not binary and not isinstance(body, dict):
            body = {"_json": body}
        if self._too_big(body):
            return 422, {"errors": {"payload": ["Payload size exceeds tenant limit"]}}
        if private and not self._may_write(claims, topic):
            return 403, {"message": "Unauthorized"}
        payload = bytes(body) if binary else body
        self._fanout(private, topic, Outgoing("user", payload, event=event, binary=binary))
        return 202, None

    # ---- faults (§8.8) ---------------------------------------------------------------------------

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
        """Force the tenant's events-per-second limit on or off (§4.2)."""
        self.knobs.rate_limited = triggered

    def delay_next_join(self, seconds: float) -> None:
        """Hold only the next join (and its socket) for `seconds` (queued, one per call)."""
        self._join_delays.append(seconds)

    def _restart_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="realtime-sweeper")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.knobs.zero_channel_sweep, 0.01))
            self.sweep_now()

    # ---- HTTP handlers ---------------------------------------------------------------------------

    async def _refuse(self, status: int, error: str, *, backoff: bool = True) -> web.Response:
        self.counters.refused += 1
        self._changed()
        if backoff and self.knobs.connect_error_backoff > 0:
            await asyncio.sleep(self.knobs.connect_error_backoff)
        return web.json_response({"error": error}, status=status, dumps=wire.dumps)

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        self.counters.handshakes += 1
        self._changed()
        k = self.knobs
        refusal = self._refusal
        if refusal is not None and refusal.until is not None and time.monotonic() >= refusal.until:
            self._refusal = refusal = None
        if refusal is not None:
            self.counters.refused += 1
            if refusal.backoff and k.connect_error_backoff > 0:
                await asyncio.sleep(k.connect_error_backoff)
            return web.Response(
                status=refusal.status, body=refusal.body, content_type=refusal.content_type
            )
        if k.auth_mode == "gateway":
            # Kong key-auth runs first; its request-transformer hands Realtime a JWT.
            key = request.headers.get("apikey") or request.query.get("apikey")
            if not key:
                self.counters.refused += 1
                return web.json_response({"message": "No API key found in request"}, status=401)
            token: str | None = self.gateway_keys.get(key)
            if token is None:
                self.counters.refused += 1
                return web.json_response(
                    {"message": "Invalid authentication credentials"}, status=401
                )
        else:
            token = request.headers.get("x-api-key") or request.query.get("apikey")
        vsn = request.query.get("vsn", "1.0.0")
        major = _vsn_major(vsn)
        if major is None:
            # Phoenix refuses before connect/3 runs: no backoff, empty body.
            self.counters.refused += 1
            log.info("realtime_server.bad_vsn", vsn=vsn)
            return web.Response(status=403, body=b"")
        if k.suspended:
            return await self._refuse(403, "Realtime was disabled for this tenant")
        if token is None:
            return await self._refuse(401, "API key is missing")
        claims = self.verify_token(token)
        if isinstance(claims, TokenFailure):
            status, error = claims.connect_error()
            log.info("realtime_server.handshake_refused", status=status, error=error)
            return await self._refuse(status, error)
        if k.max_concurrent_users is not None and self._users() >= k.max_concurrent_users:
            return await self._refuse(429, "Too many connected users")
        if self._joins_triggered():
            return await self._refuse(429, "Too many joins per second")
        ws = web.WebSocketResponse(
            autoping=False,
            autoclose=True,
            compress=False,
            # aiohttp refuses sizes >= max_msg_size; cowboy > max.
            max_msg_size=k.max_frame_size + 1,
            heartbeat=None,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="expected a WebSocket upgrade")
        await ws.prepare(request)
        self._next_sock_id += 1
        sock = RealtimeSocket(
            self,
            request,
            ws,
            vsn=vsn,
            vsn_major=major,
            tenant_token=token,
            claims=claims,
            sock_id=self._next_sock_id,
        )
        self.sockets.append(sock)
        self.counters.accepted += 1
        log.info("realtime_server.connected", socket=sock.id, vsn=vsn, path=request.path)
        self._changed()
        await sock.run()
        return ws

    def _rest_token(self, request: web.Request) -> str | web.Response:
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if self.knobs.auth_mode == "gateway":
            key = request.headers.get("apikey") or request.query.get("apikey")
            if not key:
                return web.json_response({"message": "No API key found in request"}, status=401)
            mapped = self.gateway_keys.get(key)
            if mapped is None:
                return web.json_response(
                    {"message": "Invalid authentication credentials"}, status=401
                )
            return bearer if bearer and not bearer.startswith("sb_") else mapped
        token = bearer or request.headers.get("apikey")
        if not token:
            return web.json_response({"message": "Unauthorized"}, status=401)
        return token

    @staticmethod
    def _rest_response(status: int, body: Any) -> web.Response:
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status, dumps=wire.dumps)

    async def _handle_rest_batch(self, request: web.Request) -> web.Response:
        token = self._rest_token(request)
        if isinstance(token, web.Response):
            return token
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"message": "Bad Request"}, status=400)
        messages = body.get("messages") if isinstance(body, dict) else None
        return self._rest_response(*self.send_rest_batch(messages or [], token=token))

    async def _handle_rest_single(self, request: web.Request) -> web.Response:
        token = self._rest_token(request)
        if isinstance(token, web.Response):
            return token
        topic = request.match_info["topic"]
        event = request.match_info["event"]
        private = flex_bool(request.query.get("private", "false"))
        ctype = request.content_type
        body: Any
        if ctype == "application/octet-stream":
            body = await request.read()
        elif ctype == "application/json":
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"message": "Bad Request"}, status=400)
        else:
            return web.Response(status=415)
        return self._rest_response(*self.send_rest_single(topic, event, body, private, token=token))

    # ---- admin API -------------------------------------------------------------------------------

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    async def _admin_send(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            topic, event = str(body["topic"]), str(body["event"])
        except KeyError as exc:
            raise web.HTTPBadRequest(text=f"missing {exc}") from None
        private = flex_bool(body.get("private", True))
        if "binary_b64" in body:
            row_id: str | None = self.send_binary(
                topic, event, base64.b64decode(body["binary_b64"]), private, id=body.get("id")
            )
        else:
            row_id = self.send_db(topic, event, body.get("payload"), private, id=body.get("id"))
        return web.json_response({"id": row_id})

    async def _admin_fault(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        kind = body.pop("kind", None)
        actions: dict[str, Callable[..., Any]] = {
            "crash": self.crash,
            "shutdown": self.shutdown,
            "expire_now": self.expire_now,
            "server_disconnect": self.server_disconnect,
            "close": self.close,
            "abort": self.abort,
            "refuse_connects": self.refuse_connects,
            "accept_connects": self.accept_connects,
            "stall": self.stall,
            "unstall": self.unstall,
            "oversize_frame": self.oversize_frame,
            "stale_close": self.stale_close,
            "zero_channel_sweep": self.zero_channel_sweep,
            "sweep_now": self.sweep_now,
            "rate_limit": self.rate_limit,
            "delay_next_join": self.delay_next_join,
        }
        action = actions.get(str(kind))
        if action is None:
            raise web.HTTPBadRequest(text=f"unknown fault kind {kind!r}; one of {sorted(actions)}")
        try:
            result = action(**body)
        except TypeError as exc:
            raise web.HTTPBadRequest(text=f"bad arguments for {kind}: {exc}") from None
        log.info("realtime_server.fault", kind=kind, args=body)
        return web.json_response({"ok": True, "result": result})

    async def _admin_token(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        claims = body.get("claims") or {}
        if not isinstance(claims, dict):
            raise web.HTTPBadRequest(text="claims must be an object")
        kwargs: dict[str, Any] = {**claims}
        for key in ("role", "exp_in", "sub"):
            if key in body:
                kwargs[key] = body[key]
        return web.json_response({"token": self.make_token(**kwargs)})

    async def _admin_knobs(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        names = {f.name for f in dataclasses.fields(Knobs)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown knobs {unknown}")
        for key, value in body.items():
            setattr(self.knobs, key, value)
        return web.json_response(self.knobs.to_json())

    async def _admin_policy(self, request: web.Request) -> web.Response:
        """{"read","write"} for every topic, plus optional per-sub-topic overrides in "topics"."""
        body = await self._json_body(request)
        default = Policy(read=bool(body.get("read", True)), write=bool(body.get("write", True)))
        per_topic = {
            str(t): Policy(read=bool(p.get("read", True)), write=bool(p.get("write", True)))
            for t, p in (body.get("topics") or {}).items()
        }

        def policy(_claims: Mapping[str, Any], topic: str) -> Policy:
            return per_topic.get(topic, default)

        self.policy = policy
        return web.json_response({"ok": True})

    async def _admin_state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state(), dumps=wire.dumps)


async def _serve_forever(args: argparse.Namespace) -> None:
    knobs = Knobs(
        auth_mode=args.auth_mode,
        channel_error_backoff=args.channel_error_backoff,
        connect_error_backoff=args.connect_error_backoff,
    )
    if args.plan:
        knobs = Knobs.plan(
            args.plan,
            auth_mode=args.auth_mode,
            channel_error_backoff=args.channel_error_backoff,
            connect_error_backoff=args.connect_error_backoff,
        )
    server = RealtimeServer(
        args.host, args.port, jwt_secret=args.jwt_secret, anon_key=args.anon_key, knobs=knobs
    )
    async with server:
        log.info(
            "realtime_server.listening", url=server.url, port=server.port, auth_mode=knobs.auth_mode
        )
        await until_terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Realtime server standalone until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(
        prog="python -m sidecar.testing.realtime.server",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4000)
    p.add_argument("--jwt-secret", default=None, help="HS256 project secret (random if absent)")
    p.add_argument(
        "--anon-key",
        default=None,
        help="the gateway's anon key (a JWT signed with --jwt-secret, or an sb_ key)",
    )
    p.add_argument("--auth-mode", choices=("gateway", "jwt"), default="gateway")
    p.add_argument("--plan", choices=("free", "pro"), default=None)
    p.add_argument("--channel-error-backoff", type=float, default=5.0)
    p.add_argument("--connect-error-backoff", type=float, default=2.0)
    args = p.parse_args(argv)
    if not math.isfinite(args.channel_error_backoff) or args.channel_error_backoff < 0:
        p.error("--channel-error-backoff must be >= 0")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    run_standalone(main)
