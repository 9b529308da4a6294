"""Subscription against the real test RealtimeServer and real realtime-py 2.34.1: join, auth,
every server fault of sidecar/testing/realtime/faults.py, token rotation and expiry, fatal refusal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.config import RealtimeSettings
from sidecar.errors import ExitCode, RealtimeAuthError
from sidecar.live.subscription import Subscription, SubscriptionTuning
from sidecar.live.tokens import TokenSource, token_expiry
from sidecar.metrics import Metrics
from sidecar.redact import Secret
from sidecar.testing.realtime.server import Knobs, Policy, RealtimeServer

TOPIC = "project:p1"
TUNING = SubscriptionTuning(
    check_interval=0.1,
    ping_interval=0.2,
    ping_timeout=0.6,
    unhealthy_grace=1.5,
    stable_after=0.5,
    auth_fail_window=30.0,
    replay_margin=1.0,
    join_timeout=3,
    connect_timeout=3.0,
    close_timeout=0.2,
)


@pytest.fixture
async def rt() -> AsyncIterator[RealtimeServer]:
    """A RealtimeServer with the real server's error backoffs shrunk for tests."""
    knobs = Knobs(channel_error_backoff=0.05, connect_error_backoff=0.05)
    async with RealtimeServer(knobs=knobs) as server:
        yield server


@dataclass
class Harness:
    rt: RealtimeServer
    sub: Subscription
    task: asyncio.Task[None]
    metrics: Metrics
    received: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = field(default_factory=list)

    def ids(self, marker: str) -> list[str]:
        return [
            p.get("n", "")
            for e, p, _m in self.received
            if e == "test" and str(p.get("n", "")).startswith(marker)
        ]

    def send(self, n: str) -> str | None:
        return self.rt.send_db(TOPIC, "test", {"n": n})

    async def until(self, cond: Callable[[], bool], timeout: float = 8.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                if self.task.done():
                    self.task.result()
                await asyncio.sleep(0.01)

    async def arrives(self, n: str, timeout: float = 8.0) -> None:
        await self.until(lambda: n in self.ids(n), timeout)


def settings_for(
    rt: RealtimeServer,
    *,
    token: str | None = None,
    token_file: Path | None = None,
    window: float = 1.0,
) -> RealtimeSettings:
    return RealtimeSettings(
        url=rt.url,
        apikey=Secret(rt.anon_key),
        token=Secret(token) if token else None,
        token_file=token_file,
        topic=TOPIC,
        heartbeat_window=window,
        rebuild_backoff_initial=0.05,
        rebuild_backoff_max=0.4,
    )


@contextlib.asynccontextmanager
async def running(
    rt: RealtimeServer,
    *,
    token: str | None = None,
    token_file: Path | None = None,
    tuning: SubscriptionTuning = TUNING,
    tokens: TokenSource | None = None,
    join: bool = True,
    replay_since_ms: int | None = None,
) -> AsyncIterator[Harness]:
    metrics = Metrics("p1", "s1")
    received: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    if token is None and token_file is None and tokens is None:
        token = rt.make_token()
    sub = Subscription(
        settings_for(rt, token=token, token_file=token_file),
        metrics,
        lambda e, p, m: received.append((e, p, m)),
        tokens=tokens,
        tuning=tuning,
        replay_since_ms=replay_since_ms,
    )
    task = asyncio.create_task(sub.run())
    h = Harness(rt, sub, task, metrics, received)
    try:
        if join:
            await h.until(lambda: sub.is_joined and rt.joined(TOPIC))
        yield h
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RealtimeAuthError):
            await task
        rt.unstall()


async def test_joins_and_receives(rt: RealtimeServer) -> None:
    """The channel reaches SUBSCRIBED; a realtime.send row arrives with its meta.id; the
    connected gauge is 1 while joined and 0 after stopping."""
    async with running(rt) as h:
        row = h.send("hello")
        await h.arrives("hello")
        event, payload, meta = h.received[0]
        assert (event, payload["n"]) == ("test", "hello")
        assert meta == {"id": row}
        assert h.metrics.connected._value.get() == 1
        assert h.sub.status().joined is True
    assert h.metrics.connected._value.get() == 0


async def test_set_auth_before_join(rt: RealtimeServer) -> None:
    """The join carries the scoped JWT as access_token, the URL apikey is the anon key, and the
    private channel asks for replay with an integer `since` and limit 25."""
    scoped = rt.make_token(sub="scoped-user")
    async with running(rt, token=scoped):
        joins = rt.frames_in("phx_join", TOPIC)
        assert joins[0]["payload"]["access_token"] == scoped
        assert rt.sockets[0].query["apikey"] == rt.anon_key
        config = joins[0]["payload"]["config"]
        assert config["private"] is True
        assert config["broadcast"]["ack"] is False
        assert config["broadcast"]["self"] is False
        replay = config["broadcast"]["replay"]
        assert isinstance(replay["since"], int)
        assert replay["limit"] == 25


async def test_logs_never_contain_the_token(rt: RealtimeServer) -> None:
    """No log event of a join, a fault and a rebuild contains the scoped token."""
    scoped = rt.make_token(sub="secret-user")
    with capture_logs() as logs:
        async with running(rt, token=scoped) as h:
            rt.abort()
            h.send("x")
            await h.arrives("x")
    assert logs
    assert scoped not in repr(logs)
    assert scoped.split(".")[1] not in repr(logs)


async def test_send_and_queue_while_not_joined(rt: RealtimeServer) -> None:
    """send() broadcasts on the joined channel; a send before the join is queued and flushed."""
    async with running(rt, join=False) as h:
        await h.sub.send("snapshot:request", {"session_id": "s1", "reason": "early"})
        await h.until(lambda: h.sub.is_joined)
        await h.sub.send("file:local-change", {"file_path": "a.txt"})
        await rt.wait_until(lambda: len(rt.frames_in("broadcast", TOPIC)) == 2)
        pushed = [f["payload"] for f in rt.frames_in("broadcast", TOPIC)]
        assert [p["event"] for p in pushed] == ["snapshot:request", "file:local-change"]
        assert pushed[0]["payload"] == {"session_id": "s1", "reason": "early"}


async def test_automatic_rejoin_moves_replay_since_forward(rt: RealtimeServer) -> None:
    """realtime-py's own rejoin after a reconnect asks for replay since the last time the
    channel was known live, not since the first join."""
    async with running(rt) as h:
        first = rt.frames_in("phx_join", TOPIC)[0]["payload"]["config"]["broadcast"]["replay"]
        await asyncio.sleep(0.3)  # let a few health checks mark the channel live
        rt.abort()
        await h.until(lambda: len(rt.frames_in("phx_join", TOPIC)) >= 2 and h.sub.is_joined)
        second = rt.frames_in("phx_join", TOPIC)[-1]["payload"]["config"]["broadcast"]["replay"]
        assert second["since"] > first["since"]
        assert second["since"] <= int((time.time() - TUNING.replay_margin) * 1000)


# -- every fault of section 8.8 is survived: an event sent during and after arrives once --


async def _crash(rt: RealtimeServer) -> None:
    rt.crash(TOPIC)


async def _shutdown(rt: RealtimeServer) -> None:
    rt.shutdown(TOPIC, "Replication connection was not established in time")


async def _server_disconnect(rt: RealtimeServer) -> None:
    rt.server_disconnect()


async def _abort(rt: RealtimeServer) -> None:
    rt.abort()


async def _refuse(rt: RealtimeServer) -> None:
    rt.refuse_connects(503, seconds=2.0)
    rt.abort()


async def _refuse_401(rt: RealtimeServer) -> None:
    rt.refuse_connects(401, seconds=1.5)
    rt.abort()


async def _stall(rt: RealtimeServer) -> None:
    rt.stall()


async def _oversize(rt: RealtimeServer) -> None:
    rt.oversize_frame(1_100_000)


async def _stale_close(rt: RealtimeServer) -> None:
    rt.stale_close(TOPIC, ref="0")


async def _sweep(rt: RealtimeServer) -> None:
    rt.sweep_now()  # no effect while joined; then a real zero-channel drop
    for sock in rt.open_sockets:
        sock.abort()


def _close(code: int) -> Callable[[RealtimeServer], Awaitable[None]]:
    async def fault(rt: RealtimeServer) -> None:
        rt.close(code)

    return fault


FAULTS: dict[str, Callable[[RealtimeServer], Awaitable[None]]] = {
    "crash": _crash,
    "shutdown": _shutdown,
    "server_disconnect": _server_disconnect,
    "close_1000": _close(1000),
    "close_1001": _close(1001),
    "close_1012": _close(1012),
    "abort": _abort,
    "refuse_connects_503": _refuse,
    "refuse_connects_401": _refuse_401,
    "stall": _stall,
    "oversize_frame": _oversize,
    "stale_close": _stale_close,
    "tcp_drop": _sweep,
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault_is_survived(rt: RealtimeServer, fault: str) -> None:
    """After the fault an event sent during the outage and one sent after both arrive, exactly
    once each (live or by replay on rejoin): no edit is lost."""
    async with running(rt) as h:
        h.send("before")
        await h.arrives("before")
        await asyncio.sleep(0.25)  # a few health checks: the channel is known live
        await FAULTS[fault](rt)
        h.send("during")
        await h.arrives("during", timeout=10)
        h.send("after")
        await h.arrives("after")
        assert h.ids("before") == ["before"]
        assert h.ids("during") == ["during"]
        assert h.ids("after") == ["after"]
        assert h.sub.status().joined


async def test_stall_is_caught_by_the_supervisor_ping(rt: RealtimeServer) -> None:
    """A stalled server (no reads, no pongs) is detected by the supervisor's own ping within
    its window, far sooner than websockets' 20 s keepalive."""
    async with running(rt) as h:
        rebuilds = h.sub.rebuilds
        t0 = time.monotonic()
        rt.stall()
        await h.until(lambda: h.sub.rebuilds > rebuilds, timeout=5)
        assert time.monotonic() - t0 < 3.0
        await h.until(lambda: h.sub.is_joined)
        assert h.metrics.reconnects._value.get() >= 1


async def test_rate_limit_shutdown_is_survived(rt: RealtimeServer) -> None:
    """The tenant's events-per-second limit shuts the channel down (system error + phx_close);
    the subscription rebuilds and the messages dropped while triggered arrive by replay."""
    async with running(rt) as h:
        h.send("warm")
        await h.arrives("warm")
        await asyncio.sleep(0.25)
        rt.knobs.max_events_per_second = 3 / 60  # average over 60 s: the 4th delivery trips it
        for i in range(6):
            h.send(f"burst-{i}")
        await rt.wait_until(lambda: bool(rt.frames_out("system", TOPIC)), timeout=5)
        rt.knobs.max_events_per_second = None
        await h.until(lambda: len(h.ids("burst-")) == 6, timeout=10)
        h.send("after")
        await h.arrives("after")
        assert sorted(h.ids("burst-")) == [f"burst-{i}" for i in range(6)]


async def test_rate_limit_knob_is_survived(rt: RealtimeServer) -> None:
    """rate_limit(triggered=True) drops realtime.send live delivery; once it is lifted and the
    channel rejoins, the replay delivers what was dropped."""
    async with running(rt) as h:
        await asyncio.sleep(0.25)
        rt.rate_limit(True)
        h.send("dropped")
        rt.shutdown(TOPIC, "Too many messages per second")
        await h.until(lambda: h.sub.rebuilds >= 1)
        rt.rate_limit(False)
        await h.arrives("dropped", timeout=10)
        h.send("after")
        await h.arrives("after")


async def test_token_rotation_keeps_the_channel_past_exp(
    rt: RealtimeServer, tmp_path: Path
) -> None:
    """A new token written to REALTIME_TOKEN_FILE before exp is sent with set_auth; after the old
    exp the channel is still joined (no rebuild) and events keep arriving."""
    path = tmp_path / "token"
    first = rt.make_token(exp_in=2)
    path.write_text(first)
    async with running(rt, token_file=path) as h:
        rebuilds = h.sub.rebuilds
        second = rt.make_token(exp_in=3600, sub="rotated")
        path.write_text(second)
        await rt.wait_until(lambda: bool(rt.frames_in("access_token", TOPIC)), timeout=5)
        pushed = rt.frames_in("access_token", TOPIC)[-1]["payload"]["access_token"]
        assert pushed == second
        old_exp = token_expiry(first)[0]
        assert old_exp is not None
        await h.until(lambda: time.time() > old_exp + 1.2)  # the server's exp timer has fired
        assert rt.joined(TOPIC)
        assert h.sub.is_joined
        h.send("after-exp")
        await h.arrives("after-exp")
        assert h.sub.rebuilds == rebuilds
        assert not rt.frames_out("system", TOPIC)


async def test_expired_token_then_rotation_rebuilds(rt: RealtimeServer, tmp_path: Path) -> None:
    """When the token expires while joined the server closes the channel; once a newer token
    appears in the file, the subscription rebuilds with it and the edit made meanwhile arrives."""
    path = tmp_path / "token"
    path.write_text(rt.make_token(exp_in=1))
    async with running(rt, token_file=path) as h:
        await rt.wait_until(lambda: bool(rt.frames_out("system", TOPIC)), timeout=5)
        msg = rt.frames_out("system", TOPIC)[0]["payload"]["message"]
        assert msg.startswith("Token has expired")
        h.send("meanwhile")
        await asyncio.sleep(0.3)  # the rebuild with the expired token is refused
        path.write_text(rt.make_token(exp_in=3600, sub="fresh"))
        await h.until(lambda: h.sub.is_joined and rt.joined(TOPIC))
        await h.arrives("meanwhile")
        h.send("after")
        await h.arrives("after")


async def test_refused_token_is_fatal(rt: RealtimeServer) -> None:
    """A join refused as Unauthorized again and again, with no newer token, ends run() with
    RealtimeAuthError (exit code 77) and a one-line reason without the token."""
    rt.policy = lambda _claims, _topic: Policy(read=False, write=False)
    token = rt.make_token(sub="nobody")
    tuning = SubscriptionTuning(
        check_interval=0.05,
        unhealthy_grace=0.5,
        auth_fail_window=1.0,
        join_timeout=2,
        close_timeout=0.2,
    )
    async with running(rt, token=token, tuning=tuning, join=False) as h:
        async with asyncio.timeout(10):
            with pytest.raises(RealtimeAuthError) as info:
                await h.task
    err = info.value
    assert err.exit_code == ExitCode.REALTIME_AUTH
    assert int(err.exit_code) == 77
    text = str(err)
    assert "\n" not in text
    assert "Unauthorized" in text
    assert token not in text
    assert h.metrics.connected._value.get() == 0


async def test_refused_token_recovers_when_a_new_token_arrives(
    rt: RealtimeServer, tmp_path: Path
) -> None:
    """Refusals are not fatal while a newer token keeps arriving: the new token joins."""
    rt.policy = lambda claims, _topic: Policy(read=claims.get("sub") == "good", write=False)
    path = tmp_path / "token"
    path.write_text(rt.make_token(sub="bad"))
    tuning = SubscriptionTuning(
        check_interval=0.05,
        unhealthy_grace=0.5,
        auth_fail_window=1.5,
        join_timeout=2,
        close_timeout=0.2,
    )
    async with running(rt, token_file=path, tuning=tuning, join=False) as h:
        await rt.wait_until(lambda: rt.counters.joins_error >= 1, timeout=5)
        path.write_text(rt.make_token(sub="good"))
        await h.until(lambda: h.sub.is_joined)
        h.send("ok")
        await h.arrives("ok")


async def test_set_replay_since_rejoins_for_older_history(rt: RealtimeServer) -> None:
    """set_replay_since(ms, rejoin=True) with a start older than the current join's rebuilds the
    channel with that `since` less the replay margin, so the server replays what was sent
    before."""
    t_before = int(time.time() * 1000) - 50
    rt.send_db(TOPIC, "test", {"n": "old"})
    tuning = SubscriptionTuning(
        check_interval=0.1,
        ping_timeout=0.6,
        unhealthy_grace=1.5,
        initial_lookback=-5.0,
        replay_margin=1.0,
        join_timeout=3,
        close_timeout=0.2,
    )
    async with running(rt, tuning=tuning) as h:
        assert h.ids("old") == []  # the first join asked for replay from "now + 5 s"
        h.sub.set_replay_since(t_before, rejoin=True)
        await h.arrives("old")
        assert (
            rt.frames_in("phx_join", TOPIC)[-1]["payload"]["config"]["broadcast"]["replay"]["since"]
            == t_before - 1000
        )
        joins = len(rt.frames_in("phx_join", TOPIC))
        h.sub.set_replay_since(t_before + 1, rejoin=True)  # not older: no rebuild
        await asyncio.sleep(0.3)
        assert len(rt.frames_in("phx_join", TOPIC)) == joins


async def test_first_join_replays_from_a_margin_before_the_snapshot(rt: RealtimeServer) -> None:
    """The first join asks for replay from the snapshot's created_at less the replay margin:
    replay compares with inserted_at, the writing transaction's start, so a write that started
    before the snapshot was read and committed after it is inside the window."""
    created_at = int(time.time() * 1000)
    tuning = dataclasses.replace(TUNING, replay_margin=2.5)
    async with running(rt, tuning=tuning, replay_since_ms=created_at):
        [join] = rt.frames_in("phx_join", TOPIC)
        assert join["payload"]["config"]["broadcast"]["replay"]["since"] == created_at - 2500


async def test_raising_callback_does_not_kill_delivery(rt: RealtimeServer) -> None:
    """An on_message that raises is logged and swallowed: realtime-py's listener survives and
    later messages are still delivered (no zombie client)."""
    seen: list[str] = []

    def on_message(event: str, payload: dict[str, Any], meta: dict[str, Any] | None) -> None:
        seen.append(str(payload.get("n")))
        if payload.get("n") == "boom":
            raise RuntimeError("consumer bug")

    sub = Subscription(
        settings_for(rt, token=rt.make_token()), Metrics(), on_message, tuning=TUNING
    )
    task = asyncio.create_task(sub.run())
    try:
        await sub.wait_joined(5)
        with capture_logs() as logs:
            rt.send_db(TOPIC, "test", {"n": "boom"})
            rt.send_db(TOPIC, "test", {"n": "next"})
            await rt.wait_until(lambda: "next" in seen, 5)
        assert any(e["event"] == "subscription.callback_failed" for e in logs)
        assert sub.rebuilds == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_dead_listener_is_rebuilt(rt: RealtimeServer) -> None:
    """When realtime-py's listener task is gone (it gave up reconnecting, or died), the
    supervisor rebuilds the client at once instead of waiting for a frame that never comes."""
    async with running(rt) as h:
        build = h.sub._build
        assert build is not None
        listener = build.client._listen_task
        assert listener is not None
        listener.cancel()  # what a give-up or a zombie leaves behind: a finished listener
        await h.until(lambda: h.sub.rebuilds == 1 and h.sub.is_joined, timeout=5)
        h.send("after")
        await h.arrives("after")


async def test_idle_channel_sends_at_most_one_ping_per_interval(rt: RealtimeServer) -> None:
    """Joined and idle, the liveness check sends at most one WebSocket ping per
    `ping_interval`, however often it looks at the channel (here 20 checks per interval), and
    its own pongs never wake it into sending the next one (that loop sent over a thousand pings
    a second). Counted by the server over a fixed window."""
    tuning = dataclasses.replace(TUNING, check_interval=0.05, ping_interval=1.0, ping_timeout=0.9)
    async with running(rt, tuning=tuning) as h:
        pings, frames = rt.counters.pings_in, rt.counters.frames_in
        window = 3.0
        await asyncio.sleep(window)  # the observation window, not a wait for a condition
        sent = rt.counters.pings_in - pings
        assert 1 <= sent <= window / 1.0 + 1
        # realtime-py's own heartbeat (every 25 s) is the only text frame an idle client sends.
        assert rt.counters.frames_in - frames <= 1
        assert h.sub.is_joined


async def test_message_over_1_mib_costs_one_reconnect_not_a_loop(rt: RealtimeServer) -> None:
    """realtime-py closes the socket (1009) on a frame over 1 MiB; replayed at every rejoin it
    looped reconnect, rejoin, replay, close (about 70 a second). Now the replay start moves
    past it once a rejoin replayed it: a bounded number of joins, the loss is reported once,
    and later messages arrive.

    1. joined; 2. the database sends a 1.5 MiB message, then three small ones; 3. the small
    ones arrive, on_lost was called once, and the server saw at most 3 more joins over the
    whole scenario (the reconnect, and a margin)."""
    lost: list[str] = []
    async with running(rt) as h:
        h.sub.on_lost = lost.append
        joins = rt.counters.joins_ok
        rt.send_db(TOPIC, "test", {"n": "big", "blob": "x" * (1536 * 1024)})
        await h.until(lambda: bool(lost))
        for i in range(3):
            h.send(f"after-{i}")
        for i in range(3):
            await h.arrives(f"after-{i}")
        await h.until(lambda: h.sub.is_joined)
        await asyncio.sleep(1.0)  # a loop would show here: rejoins continuing on their own
        assert lost == ["message_too_big"]
        assert h.sub.oversize <= 2  # live, then at most once more by replay
        assert rt.counters.joins_ok - joins <= 3
        assert "big" not in h.ids("big")
