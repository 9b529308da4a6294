"""Supervised subscription to the project's private Realtime channel (realtime-py 2.34.1).

realtime-py alone does not survive a long-running session (`tests/live/test_subscription.py`
shows each case against `sidecar/testing/realtime/`):
it gives up reconnecting silently, a server `phx_close` removes the channel for good, a raising
callback turns the client into a zombie, and a stalled TCP connection goes unnoticed for 40 s.
`Subscription` owns one client at a time and rebuilds it (close the old one, new client, new
channel, replay since the last time the channel was known live, minus a margin) whenever a
structural health check or its own WebSocket ping says the channel is dead, with exponential
backoff and jitter, for as long as the sidecar runs. Callbacks only enqueue; messages are deduped
on `meta.id` across replays. The scoped JWT is delivered with `set_auth` before every join and
again whenever the TokenSource rotates it; a join refused for authorisation reasons with no newer
token for `auth_fail_window` seconds ends `run()` with RealtimeAuthError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.config import RealtimeSettings
from sidecar.errors import RealtimeAuthError, SidecarError
from sidecar.live import _realtime_py as rtpy
from sidecar.live.tokens import TokenSource
from sidecar.metrics import Metrics
from sidecar.redact import redact
from sidecar.retry import backoff_delay

__all__ = [
    "AUTH_ERROR_CODES",
    "OnMessage",
    "Subscription",
    "SubscriptionStatus",
    "SubscriptionTuning",
]

log = structlog.get_logger(component="subscription")

OnMessage = Callable[[str, dict[str, Any], dict[str, Any] | None], None]
OnLost = Callable[[str], None]
TOO_BIG = 1009  # the close code websockets uses for a frame over its max_size (1 MiB)

# Join/system errors that mean "this token will not do" (the reasons the real server sends,
# reproduced by sidecar/testing/realtime/socket.py).
AUTH_ERROR_CODES = (
    "Unauthorized",
    "InvalidJWTToken",
    "MalformedJWT",
    "JwtSignatureError",
    "JwtSignerError",
)
_AUTH_MESSAGES = (
    "Token has expired",
    "You do not have permissions to read",
    "You no longer have permission to read",
    "The token provided is not a valid JWT",
    "Failed to validate JWT signature",
)
_REPLAY_LIMIT = 25  # the server's hard limit


@dataclass(frozen=True, slots=True)
class SubscriptionTuning:
    """Timing knobs; defaults derive from RealtimeSettings.heartbeat_window where unset.

    check_interval: how often the supervisor evaluates health (no frame is sent for that).
    ping_interval: at most one WebSocket ping of ours per this many seconds
      (RealtimeSettings.ping_interval, SIDECAR_PING_INTERVAL, when unset).
    ping_timeout: a ping unanswered this long means the connection is stalled: rebuild.
    unhealthy_grace: how long realtime-py may try to recover by itself (reconnect, rejoin)
      before the supervisor rebuilds the client.
    stable_after: a client joined this long resets the rebuild backoff.
    auth_fail_window: authorisation refusals with no newer token for this long are fatal.
    replay_margin: seconds subtracted from the last-known-live time for replay `since`.
    initial_lookback: replay window of the very first join when no since was set.
    join_timeout: realtime-py's push/join timeout (whole seconds).
    connect_timeout: bound on one WebSocket handshake.
    close_timeout: bound on closing an old client.
    dedupe_size: how many meta ids are remembered for dedupe.
    send_queue: how many sends are kept while the channel is not joined.
    """

    check_interval: float | None = None
    ping_interval: float | None = None
    ping_timeout: float | None = None
    unhealthy_grace: float | None = None
    stable_after: float = 10.0
    auth_fail_window: float = 120.0
    replay_margin: float = 10.0
    initial_lookback: float = 300.0
    join_timeout: int = 10
    connect_timeout: float = 10.0
    close_timeout: float = 1.0
    dedupe_size: int = 10_000
    send_queue: int = 256


def _is_auth_reason(reason: str) -> bool:
    return reason.startswith(AUTH_ERROR_CODES) or any(m in reason for m in _AUTH_MESSAGES)


def _reason_of(err: BaseException | None) -> str:
    """The server's one-line reason from a realtime-py subscribe-callback error."""
    if err is None:
        return ""
    text = str(err)
    try:
        doc = json.loads(text)
    except ValueError:
        return f"{type(err).__name__}: {text}"[:300]
    if isinstance(doc, dict):
        for key in ("reason", "message"):
            if isinstance(doc.get(key), str):
                return str(doc[key])[:300]
    return text[:300]


@dataclass(frozen=True, slots=True)
class SubscriptionStatus:
    """What the subscription reports (Subscription.status())."""

    joined: bool
    rebuilds: int
    rejoins: int
    last_received_at: float | None
    last_live_at: float | None
    last_error: str | None
    token_expires_at: float | None


class _Build:
    """One client + channel generation; callbacks from older generations are ignored."""

    __slots__ = (
        "channel",
        "client",
        "closed",
        "forced",
        "gen",
        "joined_at",
        "ping",
        "pinged_at",
        "replay",
        "since",
        "started_at",
    )

    def __init__(
        self,
        gen: int,
        client: AsyncRealtimeClient,
        channel: AsyncRealtimeChannel,
        replay: dict[str, int] | None,
    ) -> None:
        self.gen = gen
        self.client = client
        self.channel = channel
        self.replay = replay
        self.started_at = time.monotonic()
        self.joined_at: float | None = None
        self.closed = False
        self.ping: tuple[asyncio.Future[float], float, float] | None = None  # fut, sent, wall
        self.pinged_at = float("-inf")  # monotonic time of our last ping
        self.since = 0  # the replay start this build's join asked for
        self.forced = False  # built by rejoin(since_ms)


class Subscription:
    """Supervises realtime-py on `settings.topic`; hands (event, payload, meta) to on_message.

    Large (about 600 lines) because rebuilding a client, judging its health and computing the
    replay start after each loss are one supervision loop over one generation of client;
    every touch of realtime-py's internals is in `live/_realtime_py.py`.

    Args:
        settings: REALTIME_URL, REALTIME_APIKEY (anon/publishable key), topic, heartbeat_window,
            rebuild backoffs.
        metrics: `connected` gauge and `reconnects` counter are kept current.
        on_message: called synchronously, from realtime-py's listener, once per distinct
            `meta.id`; must only enqueue. Exceptions are logged and swallowed.
        tokens: where the scoped JWT comes from. When None one is built from settings and its
            file watcher runs inside `run()`; when given, the caller runs `tokens.run()`.
        replay_since_ms: the snapshot's created_at: the first join replays from
            `tuning.replay_margin` before it, since replay compares with a row's inserted_at,
            its transaction's start, and a write that started before the snapshot was read
            but committed after it is not in the snapshot (tests/e2e/test_pg.py).
        tuning: timing knobs (tests make them small).
    """

    def __init__(
        self,
        settings: RealtimeSettings,
        metrics: Metrics,
        on_message: OnMessage,
        *,
        tokens: TokenSource | None = None,
        replay_since_ms: int | None = None,
        tuning: SubscriptionTuning | None = None,
        on_lost: OnLost | None = None,
    ) -> None:
        settings.check_channel()
        self.settings = settings
        self.metrics = metrics
        self.on_message = on_message
        self.on_lost = on_lost
        self.oversize = 0  # messages realtime-py could not take (over 1 MiB)
        # Replay never starts before this (ms): a message realtime-py cannot take would be
        # replayed on every rejoin, each one closing the socket again.
        self._replay_floor: int | None = None
        self._too_big_at: float | None = None  # unix time of the last such close
        self._own_tokens = tokens is None
        self.tokens = tokens if tokens is not None else TokenSource.from_settings(settings)
        t = tuning or SubscriptionTuning()
        window = settings.heartbeat_window
        self.tuning = t
        self._check_interval = t.check_interval if t.check_interval is not None else window / 4
        self._ping_timeout = t.ping_timeout if t.ping_timeout is not None else window / 2
        self._ping_interval = (
            t.ping_interval if t.ping_interval is not None else settings.ping_interval
        )
        self._grace = t.unhealthy_grace if t.unhealthy_grace is not None else window / 2
        self.topic = settings.topic
        self.joined = asyncio.Event()
        self.last_received_at: float | None = None  # unix time of the last broadcast
        self.last_live_at: float | None = None  # unix time the channel was last known live
        self.last_error: str | None = None
        self.rebuilds = 0
        self.rejoins = 0
        self.duplicates = 0
        self._since_ms = None if replay_since_ms is None else self._margin_before(replay_since_ms)
        self._joined_before = False
        self._build: _Build | None = None
        self._gen = 0
        self._wake = asyncio.Event()
        self._rebuild_reason: str | None = None
        self._rebuild_now = False
        self._rebuild_requested = False
        self._force_since = False
        # Replay start of the first join (or of a forced rejoin): everything inserted since
        # then has been delivered, live or by replay.
        self._covered_from: int | None = None
        self._auth_fail_since: float | None = None
        self._auth_fail_reason = ""
        self._auth_fail_token = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._pending: deque[tuple[str, dict[str, Any]]] = deque()
        self._flushing = False  # a _flush_pending task is running
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False
        self._warned_rotation = 0

    # -- public API --

    @property
    def is_joined(self) -> bool:
        """True while the current channel is joined."""
        return self.joined.is_set()

    async def wait_joined(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the channel is joined (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout):
            await self.joined.wait()

    def set_replay_since(self, ms: int, *, rejoin: bool = False) -> None:
        """Replay from the snapshot time `ms` (unix epoch milliseconds, minus the replay
        margin as in __init__) on the next join.

        With rejoin=True and a current join that asked for a later start (or none), the channel
        is rebuilt now so the server replays from there.
        """
        ms = self._margin_before(ms)
        if rejoin and self._covered_from is not None and self._covered_from > ms:
            self.rejoin(ms)
            return
        self._since_ms = ms
        self._refresh_replay(self._build)

    def rejoin(self, since_ms: int) -> None:
        """Rebuild the channel now, asking for replay from exactly `since_ms` (fills seq gaps)."""
        self._since_ms = int(since_ms)
        self._force_since = True
        self.request_rebuild("rejoin requested", urgent=True)

    def request_rebuild(self, reason: str, *, urgent: bool = False) -> None:
        """Ask the supervisor to replace the client: at once when urgent, else after the
        current backoff (a server that closes the channel on every join must not spin us)."""
        if self._rebuild_reason is None:
            self._rebuild_reason = reason
        self._rebuild_requested = True
        self._rebuild_now = self._rebuild_now or urgent
        self._wake.set()

    async def send(self, event: str, payload: dict[str, Any]) -> None:
        """Broadcast on the channel; while not joined the message is queued (bounded) and sent
        after the next join, the oldest being dropped (and logged) when the queue is full."""
        b = self._build
        # Only with nothing queued: messages queued before the join are flushed by a task that
        # may not have run yet, and a direct send would overtake them.
        if b is not None and self.is_joined and not b.closed and not self._pending:
            try:
                await b.channel.send_broadcast(event, payload)
            except Exception as exc:  # noqa: BLE001 - the socket died under us: queue it
                log.warning("subscription.send_failed", event_name=event, error=type(exc).__name__)
            else:
                log.debug("subscription.sent", event_name=event)
                return
        if len(self._pending) >= self.tuning.send_queue:
            dropped, _ = self._pending.popleft()
            log.warning("subscription.send_dropped", event_name=dropped, queued=len(self._pending))
        self._pending.append((event, payload))
        log.info("subscription.send_queued", event_name=event, queued=len(self._pending))
        if self.is_joined and not self._flushing:
            self._spawn(self._flush_pending())

    def status(self) -> SubscriptionStatus:
        """A snapshot of the subscription's state (sidecar/wiring.py reads `joined`)."""
        return SubscriptionStatus(
            joined=self.is_joined,
            rebuilds=self.rebuilds,
            rejoins=self.rejoins,
            last_received_at=self.last_received_at,
            last_live_at=self.last_live_at,
            last_error=self.last_error,
            token_expires_at=self.tokens.expires_at,
        )

    async def run(self) -> None:
        """Subscribe and keep the subscription alive until cancelled.

        Raises:
            RealtimeAuthError: the token is refused for good (one-line reason).
            ConfigError: the token file now holds a service_role token.
        """
        helpers = [asyncio.create_task(self._follow_tokens(), name="subscription-tokens")]
        if self._own_tokens:
            helpers.append(asyncio.create_task(self.tokens.run(), name="subscription-token-file"))
        supervisor = asyncio.create_task(self._supervise(), name="subscription-supervisor")
        try:
            waiting: set[asyncio.Task[None]] = {supervisor, *helpers}
            while supervisor in waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raise RealtimeAuthError / ConfigError
        finally:
            self._stopped = True
            for task in [supervisor, *helpers, *self._tasks]:
                task.cancel()
            for task in [supervisor, *helpers, *self._tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._teardown("stopped")
            self._set_joined(False)

    # -- supervision --

    async def _supervise(self) -> None:
        attempt = 0  # rebuilds since the last stable build
        first = True
        while True:
            if not first and not self._rebuild_now:
                attempt += 1
                delay = backoff_delay(
                    attempt,
                    self.settings.rebuild_backoff_initial,
                    self.settings.rebuild_backoff_max,
                    floor=0.5,
                )
                log.info(
                    "subscription.rebuild_scheduled",
                    wait_for=round(delay, 3),
                    reason=self._rebuild_reason,
                )
                await self._sleep_or_wake(delay)
            first = False
            self._rebuild_now = False
            self._rebuild_requested = False
            self._rebuild_reason = None
            self._check_auth_deadline()
            try:
                await self._start_build()
            except SidecarError:
                raise  # ConfigError from the token file: not a connection problem
            except Exception as exc:  # noqa: BLE001
                # Whatever the handshake or join raised, the answer is the same: back off, retry.
                reason = self._connect_failure(exc)
                self.last_error = reason
                log.warning("subscription.connect_failed", reason=reason)
                await self._teardown("connect_failed")
                self._check_auth_deadline()
                continue
            stable, reason = await self._monitor()
            if stable:
                attempt = 0
            await self._teardown(reason)
            self.rebuilds += 1

    async def _sleep_or_wake(self, delay: float) -> None:
        """Sleep for the backoff, cut short only by an urgent rebuild request."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                while not self._rebuild_now:
                    self._wake.clear()
                    await self._wake.wait()

    async def _monitor(self) -> tuple[bool, str]:
        """Watch the current build until it must be replaced; (was it stable, why replaced)."""
        b = self._build
        assert b is not None
        unhealthy_since: float | None = None
        while True:
            self._wake.clear()
            if self._rebuild_requested:
                break
            verdict, why = self._health(b)
            now = time.monotonic()
            if verdict == "ok":
                unhealthy_since = None
                self._refresh_replay(b)
            elif verdict == "dead":
                self._rebuild_reason = why
                log.warning("subscription.dead", reason=why, gen=b.gen)
                break
            else:
                if unhealthy_since is None:
                    unhealthy_since = now
                    log.info("subscription.degraded", reason=why, gen=b.gen)
                elif now - unhealthy_since > self._grace:
                    self._rebuild_reason = f"{why} for {round(now - unhealthy_since, 1)}s"
                    log.warning("subscription.unhealthy", reason=self._rebuild_reason, gen=b.gen)
                    break
            self._check_auth_deadline()
            self._check_rotation()
            if verdict == "ok" and now - b.pinged_at >= self._ping_interval:
                await self._ping(b)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await self._wake.wait()
        stable = (
            b.joined_at is not None and time.monotonic() - b.joined_at >= self.tuning.stable_after
        )
        return stable, self._rebuild_reason or "unhealthy"

    def _health(self, b: _Build) -> tuple[str, str]:
        """('ok'|'degraded'|'dead', why) from realtime-py 2.34.1's private attributes."""
        c, ch = b.client, b.channel
        listener = rtpy.listen_task(c)
        if listener is not None and listener.done():
            # realtime-py gave up reconnecting, or a callback killed it (zombie): nobody will
            # ever deliver on this client again.
            exc = None if listener.cancelled() else listener.exception()
            return "dead", "listener task ended" + (f": {type(exc).__name__}" if exc else "")
        if c.channels.get(ch.topic) is not ch:
            return "dead", "channel removed"
        if b.ping is not None:
            fut, sent, sent_wall = b.ping
            if fut.done():
                b.ping = None
                answered = not fut.cancelled() and fut.exception() is None
                if answered and ch.is_joined and b.joined_at is not None and sent >= b.joined_at:
                    # Joined before the ping and the server answered it: everything it sent
                    # before then has reached us. Replay `since` may move up to here.
                    self.last_live_at = max(self.last_live_at or 0.0, sent_wall)
            elif time.monotonic() - sent > self._ping_timeout:
                return "dead", "ping unanswered"
        if not c.is_connected or listener is None:
            return "degraded", "not connected"
        heartbeat = rtpy.heartbeat_task(c)
        if heartbeat is not None and heartbeat.done():
            # Ends on a clean server close while the listener reconnects: give it the grace.
            return "degraded", "heartbeat task ended"
        if not ch.is_joined:
            return "degraded", f"channel {ch.state.value}"
        return "ok", ""

    async def _ping(self, b: _Build) -> None:
        """Send our own WebSocket ping (realtime-py ignores heartbeat replies).

        Its answer is read by the next health check: waking the monitor on the pong would
        send the next ping at once, a loop bounded only by the round trip.
        """
        ws = rtpy.websocket(b.client)
        if ws is None or b.ping is not None:
            return
        sent, sent_wall = time.monotonic(), time.time()
        b.pinged_at = sent
        try:
            async with asyncio.timeout(self._ping_timeout):
                waiter = await ws.ping()
        except TimeoutError:
            overdue = time.monotonic() - self._ping_timeout  # the next check rebuilds
            b.ping = (asyncio.get_running_loop().create_future(), overdue, time.time())
            return
        except Exception as exc:  # noqa: BLE001 - a closed socket; the health check sees it
            log.debug("subscription.ping_failed", error=type(exc).__name__)
            return
        fut = asyncio.ensure_future(waiter)  # websockets already returns a Future
        fut.add_done_callback(self._retrieve)
        b.ping = (fut, sent, sent_wall)

    @staticmethod
    def _retrieve(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            fut.exception()

    def _check_auth_deadline(self) -> None:
        if self._auth_fail_since is None:
            return
        if self.tokens.version != self._auth_fail_token:
            # A newer token arrived since the refusals started: it gets its own window.
            self._auth_fail_since = None
            return
        waited = time.monotonic() - self._auth_fail_since
        if waited > self.tuning.auth_fail_window:
            raise RealtimeAuthError(
                f"Realtime refused the token for {round(waited)}s with no newer token: "
                f"{redact(self._auth_fail_reason)}"
            )

    def _check_rotation(self) -> None:
        refresh = self.tokens.refresh_at
        if refresh is None or time.time() < refresh:
            return
        if self._warned_rotation != self.tokens.version:
            self._warned_rotation = self.tokens.version
            exp = self.tokens.expires_at
            log.warning(
                "subscription.token_not_rotated",
                token=self.tokens.fingerprint,
                expires_in=None if exp is None else round(exp - time.time(), 1),
            )

    def _note_auth_failure(self, reason: str) -> None:
        if self._auth_fail_since is None or self._auth_fail_token != self.tokens.version:
            self._auth_fail_since = time.monotonic()
            self._auth_fail_token = self.tokens.version
        self._auth_fail_reason = reason

    def _connect_failure(self, exc: BaseException) -> str:
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace")[:200] if exc.response.body else ""
            reason = f"HTTP {status} {body}".strip()
            if status in (401, 403):
                self._note_auth_failure(reason)
            return reason
        return f"{type(exc).__name__}: {exc}"[:300]

    # -- building and tearing down clients --

    def _refresh_replay(self, b: _Build | None) -> None:
        # realtime-py resends the stored join payload on its own rejoins; it holds a reference
        # to this dict, so moving `since` forward here keeps automatic rejoins' replay short.
        since = self._compute_since()
        if b is not None and b.replay is not None and since is not None:
            b.replay["since"] = since

    def _compute_since(self) -> int | None:
        candidates = []
        if self.last_live_at is not None:
            candidates.append(int((self.last_live_at - self.tuning.replay_margin) * 1000))
        if self._since_ms is not None:
            if self._force_since:
                return self._floored(self._since_ms)
            candidates.append(self._since_ms)
        return self._floored(max(candidates)) if candidates else self._replay_floor

    def _margin_before(self, ms: int) -> int:
        return int(ms) - int(self.tuning.replay_margin * 1000)

    def _floored(self, since: int) -> int:
        return since if self._replay_floor is None else max(since, self._replay_floor)

    async def _start_build(self) -> None:
        self.tokens.reload()  # in case the watch missed a rotation
        self._gen += 1
        gen = self._gen
        since = self._compute_since()
        if since is None:
            since = int((time.time() - self.tuning.initial_lookback) * 1000)
        forced, self._force_since = self._force_since, False
        replay: dict[str, int] = {"since": since, "limit": _REPLAY_LIMIT}
        client = AsyncRealtimeClient(
            str(self.settings.url),
            token=str(self.settings.apikey),
            auto_reconnect=True,
            max_retries=1,
            initial_backoff=max(self.settings.rebuild_backoff_initial, 0.01),
            timeout=self.tuning.join_timeout,
        )
        params: dict[str, Any] = {
            "config": {
                "broadcast": {"ack": False, "self": False, "replay": replay},
                "presence": {"key": "", "enabled": False},
                "private": True,
            }
        }
        channel = client.channel(self.topic, params)  # type: ignore[arg-type]
        channel.on_broadcast("*", self._on_broadcast_cb(gen))
        b = _Build(gen, client, channel, replay)
        b.since, b.forced = since, forced
        self._build = b
        # The scoped JWT goes in the join payload; the URL apikey stays the anon key.
        await client.set_auth(self.tokens.current)
        log.info(
            "subscription.connecting",
            gen=gen,
            topic=self.topic,
            replay_since=since,
            token=self.tokens.fingerprint,
        )
        async with asyncio.timeout(self.tuning.connect_timeout):
            await client.connect()
        # From now on realtime-py reconnects by itself; the supervisor decides when to give up.
        client.max_retries = 1_000_000
        await channel.subscribe(self._on_state_cb(gen))

    async def _teardown(self, reason: str) -> None:
        b, self._build = self._build, None
        self._set_joined(False)
        if b is None or b.closed:
            return
        b.closed = True
        c = b.client
        for ch in list(c.channels.values()):
            rtpy.drop_pushes(ch)
        ws = rtpy.websocket(c)
        if ws is not None:
            ws.close_timeout = self.tuning.close_timeout
        try:
            async with asyncio.timeout(self.tuning.close_timeout + 0.5):
                await c.close()
        except TimeoutError:
            pass
        except Exception as exc:  # noqa: BLE001 - closing a broken client may raise anything
            log.debug("subscription.close_failed", error=type(exc).__name__)
        if ws is not None and not ws.transport.is_closing():
            ws.transport.abort()
        rtpy.abandon(c)
        if b.ping is not None:
            b.ping[0].cancel()
        log.info("subscription.closed", gen=b.gen, reason=reason)

    # -- realtime-py callbacks: never raise, never block --

    def _on_broadcast_cb(self, gen: int) -> Callable[[Mapping[str, Any]], None]:
        def on_broadcast(message: Mapping[str, Any]) -> None:
            try:
                if self._build is None or self._build.gen != gen:
                    return
                now = time.time()
                self.last_received_at = now
                self.last_live_at = now
                meta = message.get("meta")
                meta = dict(meta) if isinstance(meta, Mapping) else None
                mid = meta.get("id") if meta else None
                if isinstance(mid, str):
                    if mid in self._seen:
                        self._seen.move_to_end(mid)
                        self.duplicates += 1
                        return
                    self._seen[mid] = None
                    if len(self._seen) > self.tuning.dedupe_size:
                        self._seen.popitem(last=False)
                payload = message.get("payload")
                self.on_message(
                    str(message.get("event", "")),
                    payload if isinstance(payload, dict) else {},
                    meta,
                )
            except Exception:  # a raising callback would kill realtime-py's listener
                log.exception("subscription.callback_failed")

        return on_broadcast

    def _on_state_cb(self, gen: int) -> Callable[[RealtimeSubscribeStates, Exception | None], None]:
        def on_state(state: RealtimeSubscribeStates, err: Exception | None) -> None:
            try:
                if self._build is None or self._build.gen != gen or self._stopped:
                    return
                self._on_state(self._build, state, err)
            except Exception:  # see on_broadcast
                log.exception("subscription.callback_failed")

        return on_state

    def _on_state(self, b: _Build, state: RealtimeSubscribeStates, err: Exception | None) -> None:
        reason = _reason_of(err)
        if state == RealtimeSubscribeStates.SUBSCRIBED:
            b.joined_at = time.monotonic()
            if self._covered_from is None or b.forced:
                self._covered_from = min(b.since, self._covered_from or b.since)
            self._auth_fail_since = None
            self.last_error = None
            if self._joined_before:
                self.rejoins += 1
                self.metrics.reconnects.inc()
            self._joined_before = True
            self._set_joined(True)
            log.info("subscription.joined", gen=b.gen, rejoins=self.rejoins)
            if self._pending:
                self._spawn(self._flush_pending())
            return
        self._set_joined(False)
        self.last_error = f"{state.value}: {reason}" if reason else state.value
        if _closed_too_big(err):
            self._message_too_big(b)
            return
        if state == RealtimeSubscribeStates.CLOSED:
            log.warning("subscription.channel_closed", gen=b.gen)
            self.request_rebuild("channel closed")
            return
        if reason and _is_auth_reason(reason):
            self._note_auth_failure(reason)
            log.warning(
                "subscription.auth_refused", gen=b.gen, reason=reason, token=self.tokens.fingerprint
            )
        else:
            log.warning("subscription.channel_error", gen=b.gen, state=state.value, reason=reason)
        self._wake.set()

    def _message_too_big(self, b: _Build) -> None:
        """A message over 1 MiB closed the socket: realtime-py cannot take it, and if it is
        stored for replay every rejoin replays it and closes the socket again (measured before this
        fix: reconnect, rejoin, replay, close, about 70 times a second).

        The first such close only reports the loss (on_lost: the engine recovers what follows
        its last seq from the database); the message may not be replayable at all. A second
        one soon after means the rejoin replayed it: replay then starts after the first close
        (in the join payload realtime-py resends by itself too), so it costs one more
        reconnect, never a loop. What that skips is part of what the engine recovers.
        """
        now = time.time()
        self.oversize += 1
        first = self._too_big_at is None or now - self._too_big_at > self._grace * 2 + 5
        if first:
            self._too_big_at = now
            log.warning("subscription.message_too_big", gen=b.gen, count=self.oversize)
            if self.on_lost is not None:
                self.on_lost("message_too_big")
        else:
            assert self._too_big_at is not None
            floor = int(self._too_big_at * 1000) + 1
            self._replay_floor = max(self._replay_floor or 0, floor)
            if b.replay is not None:
                b.replay["since"] = max(b.replay["since"], floor)
            log.warning(
                "subscription.message_too_big_replayed",
                gen=b.gen,
                replay_from=floor,
                count=self.oversize,
            )
        self._wake.set()

    def _set_joined(self, joined: bool) -> None:
        if joined:
            self.joined.set()
        else:
            self.joined.clear()
        self.metrics.connected.set(1 if joined else 0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_pending(self) -> None:
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._pending and self.is_joined and self._build is not None:
                event, payload = self._pending.popleft()
                try:
                    await self._build.channel.send_broadcast(event, payload)
                except Exception as exc:  # noqa: BLE001 - requeue; the next join retries
                    self._pending.appendleft((event, payload))
                    log.warning(
                        "subscription.send_failed", event_name=event, error=type(exc).__name__
                    )
                    return
                log.info("subscription.sent_queued", event_name=event)
        finally:
            self._flushing = False

    async def _follow_tokens(self) -> None:
        """Deliver every rotated token to the live client (set_auth) or rebuild with it."""
        version = self.tokens.version
        while True:
            token = await self.tokens.changed(version)
            version = self.tokens.version
            b = self._build
            if b is None or b.closed:
                continue
            try:
                await b.client.set_auth(token)
            except Exception as exc:  # noqa: BLE001 - a dead socket; rebuild with the new token
                log.warning("subscription.set_auth_failed", error=type(exc).__name__)
                self.request_rebuild("set_auth failed", urgent=True)
                continue
            log.info(
                "subscription.token_updated", token=self.tokens.fingerprint, joined=self.is_joined
            )
            if not self.is_joined:
                # An errored join retries on realtime-py's slow timer: rebuild with it now.
                self.request_rebuild("token rotated while not joined", urgent=True)


def _closed_too_big(err: BaseException | None) -> bool:
    """Whether a subscribe-callback error is the socket closed for a too large message."""
    if not isinstance(err, ConnectionClosed):
        return False
    return any(f is not None and f.code == TOO_BIG for f in (err.sent, err.rcvd))
