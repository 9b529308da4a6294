"""The broker of the test Realtime server: what every socket of one tenant shares.

Subscribers by (private, sub-topic), the `realtime.messages` store and its replay, fan-out with
the tenant's rate limits and payload cap, RLS emulated by a policy function, token checks, and
the database and REST injection paths (`send_db`, `send_binary`, `send_rest_*`). No HTTP here:
`server.py` owns the listener and the sockets; `socket.py` calls into this for joins and
broadcasts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from sidecar.testing.realtime.jwt import TokenFailure, confirm_exp, verify
from sidecar.testing.realtime.socket import (
    RATE_LIMITED,
    Channel,
    Outgoing,
    StoredMessage,
    flex_bool,
    payload_size,
)

__all__ = ["Broker", "Counters", "Knobs", "Policy", "PolicyFn", "ReplayFn", "allow_all"]

log = structlog.get_logger(component="realtime_server")


@dataclass(frozen=True, slots=True)
class Policy:
    """What RLS on `realtime.messages` would allow for one JWT and topic (extension broadcast).

    `presence_read` only matters when presence is enabled on the channel; None means "as read".
    """

    read: bool = True
    write: bool = True
    presence_read: bool | None = None


PolicyFn = Callable[[Mapping[str, Any], str], "Policy | Mapping[str, bool]"]


# (sub-topic, since ms, limit) -> the rows replay sends, oldest first; None: the in-memory store.
ReplayFn = Callable[[str, int, int], list[StoredMessage]]


def allow_all(_claims: Mapping[str, Any], _topic: str) -> Policy:
    """The default policy: every JWT may read and write every topic."""
    return Policy(read=True, write=True)


@dataclass(slots=True)
class Knobs:
    """Server behaviour; tests may change any field at any time (read on every use).

    Defaults are the real server's (self-hosted defaults, or hosted where it differs and matters).
    """

    # Handshake
    auth_mode: Literal["gateway", "jwt"] = "gateway"  # gateway: apikey must be a configured key
    connect_error_backoff: float = 2.0  # CONNECT_ERROR_BACKOFF_MS
    idle_timeout: float | None = 60.0  # Phoenix/cowboy websocket timeout; close 1000
    max_frame_size: int = 5_000_000  # inbound; larger → close 1009
    suspended: bool = False  # tenant suspended: handshake 403, joins RealtimeDisabledForTenant
    jwt_claim_validators: dict[str, Any] = field(default_factory=dict)  # JWT_CLAIM_VALIDATORS
    # Joins
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
    # Broadcast
    max_payload_kb: int = 3000  # hosted Free 256, Pro 3000
    payload_size_reply: Literal["string", "object"] = "string"  # ack reply shape when too big
    max_events_per_second: float | None = None  # hosted Free 100, Pro 500; avg over 60 s
    rate_limited: bool = False  # force the events-per-second limit to "triggered"
    replication_up: bool | None = None  # None: up once any client has connected
    retention_s: float = 72 * 3600.0
    # Tracker
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
    pings_in: int = 0  # WebSocket ping frames received (answered with a pong)
    malformed: int = 0
    joins_ok: int = 0
    joins_error: int = 0
    refreshes: int = 0  # access_token pushes that changed the token
    client_broadcasts: int = 0
    delivered: int = 0  # broadcast copies handed to sockets (rate-counted)
    rest_requests: int = 0


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


class Broker:
    """The tenant's shared state and the paths a message takes into it (see the module docstring).

    `knobs`, `policy` and `counters` may be read and replaced by tests at any time;
    `replay_source` answers replay from elsewhere (the database: realtime/database.py).
    """

    def __init__(self, jwt_secret: str, knobs: Knobs, policy: PolicyFn) -> None:
        self.jwt_secret = jwt_secret
        # The tenant's `jwt_jwks`: public keys that verify ES256/RS256 tokens by `kid`.
        self.jwt_jwks: Mapping[str, Any] | None = None
        self.knobs = knobs
        self.policy: PolicyFn = policy
        self.replay_source: ReplayFn | None = None
        self.counters = Counters()
        self.messages: list[StoredMessage] = []
        self.policy_calls: list[tuple[str, str]] = []  # (purpose, sub-topic) per evaluation
        self._subs: dict[tuple[bool, str], list[Channel]] = {}
        self._events = _RateCounter(60.0)
        self._joins = _RateCounter(1.0)
        self._join_delays: deque[float] = deque()
        self._seq = 0
        self._change = asyncio.Event()

    @property
    def replication_up(self) -> bool:
        """Whether realtime.send rows are streamed live (knob, or auto once a client connected)."""
        if self.knobs.replication_up is not None:
            return self.knobs.replication_up
        return self.counters.accepted > 0

    def _changed(self) -> None:
        self._change.set()

    # ---- subscribers, limits, RLS, store ----------------------------------------------------------

    def _subscribe(self, ch: Channel) -> None:
        self._subs.setdefault((ch.private, ch.sub_topic), []).append(ch)

    def _unsubscribe(self, ch: Channel) -> None:
        subs = self._subs.get((ch.private, ch.sub_topic))
        if subs and ch in subs:
            subs.remove(ch)

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
        if self.replay_source is not None:
            return self.replay_source(sub, since, limit)
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

    # ---- injection API --------------------------------------------------------------------

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

    def _rest_gate(self, token: str | None) -> tuple[dict[str, Any] | None, tuple[int, Any] | None]:
        """What every REST broadcast checks first: (the claims, or None when `token` is None
        and auth is bypassed; the (status, body) refusal, or None)."""
        self.counters.rest_requests += 1
        claims = None if token is None else self.verify_token(token)
        if isinstance(claims, TokenFailure):
            return None, (401, {"message": "Unauthorized"})
        if self._events_triggered():
            return claims, (429, {"message": "You have exceeded your rate limit"})
        return claims, None

    def verify_token(self, token: str) -> dict[str, Any] | TokenFailure:
        """`verify()` with this server's secret, JWKS and claim validators."""
        return verify(
            token, self.jwt_secret, jwks=self.jwt_jwks, validators=self.knobs.jwt_claim_validators
        )

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
        claims, refusal = self._rest_gate(token)
        if refusal is not None:
            return refusal
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
        claims, refusal = self._rest_gate(token)
        if refusal is not None:
            return refusal
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
