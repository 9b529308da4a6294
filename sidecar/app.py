"""Startup order, the steady-state TaskGroup, signals and ordered shutdown.

The only module that knows all the others. `run` is the container entrypoint: health server
(unready) -> subscribe (events buffer) -> hydrate -> apply the buffer -> after-hydrate hook ->
child -> steady state (sync, hooks, local changes) -> on a signal or the child's exit, stop in
reverse order and return the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import aiohttp
import structlog

from sidecar.config import Settings
from sidecar.errors import ConfigError, HookFailedError, SnapshotUnavailableError
from sidecar.health import HealthState, serve
from sidecar.live.apply import Applier
from sidecar.live.engine import SyncEngine, SyncTuning
from sidecar.live.subscription import Subscription, SubscriptionTuning
from sidecar.metrics import Metrics
from sidecar.process import hooks as hooks_mod
from sidecar.process.child import ChildProcess, Reaper, Supervisor, build_child_env
from sidecar.redact import redact
from sidecar.snapshot.hydrate import hydrate
from sidecar.snapshot.manifest import Manifest
from sidecar.tree.preflight import check_dirs
from sidecar.tree.state import StateStore
from sidecar.twoway.localsync import LocalSync
from sidecar.twoway.upstream import Upstream

__all__ = ["Runtime", "run", "sync_only"]

log = structlog.get_logger(component="sidecar")

_FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class _Shutdown(Exception):
    """Raised inside the task group to end the steady state (CPython's documented recipe)."""


@dataclass(slots=True)
class Runtime:
    """The live components of one sidecar, for /status and for tests."""

    settings: Settings
    metrics: Metrics
    health: HealthState
    state: StateStore
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    signal_received: int | None = None
    supervisor: Supervisor | None = None
    engine: SyncEngine | None = None
    subscription: Subscription | None = None
    localsync: LocalSync | None = None


async def run(settings: Settings, cmd: tuple[str, ...]) -> int:
    """`sidecar run`: the container entrypoint; returns the child's status or 128+signal."""
    return await _main(settings, cmd, hydrate_first=True)


async def sync_only(settings: Settings) -> int:
    """`sidecar sync`: keep an already hydrated PROJECT_DIR in sync until a signal."""
    return await _main(settings, (), hydrate_first=False)


async def _main(settings: Settings, cmd: tuple[str, ...], *, hydrate_first: bool) -> int:
    check_dirs(settings.project_dir, settings.state_dir)
    metrics = Metrics(settings.project_id, settings.session_id)
    metrics.quota_bytes.set(settings.limits.max_bytes)
    health = HealthState(project_id=settings.project_id, session_id=settings.session_id)
    state = StateStore(settings.state_dir)
    rt = Runtime(settings, metrics, health, state)
    health.refresh = lambda: _refresh_status(rt)
    log.info(
        "sidecar.starting",
        command=list(cmd),
        project_dir=str(settings.project_dir),
        pid=os.getpid(),
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(state.close)
        stack.enter_context(_signals(rt))
        server = await stack.enter_async_context(serve(settings.http, health, metrics))
        reaper = await stack.enter_async_context(Reaper())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        applier = Applier(
            settings.project_dir,
            state,
            settings.limits,
            metrics,
            write_mode=settings.write_mode,
            http=http,
        )
        applier.recount()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_raise_when_set(rt.stop), name="stop")
                hooks = _make_hooks(settings, reaper, rt)
                _start_sync(rt, tg, applier, http, hooks)
                if hydrate_first:
                    health.state = "hydrating"
                    manifest = await _hydrate_healing(rt, http)
                else:
                    manifest = None
                    if state.meta("snapshot_id") is None:
                        raise ConfigError("PROJECT_DIR is not hydrated; run `sidecar hydrate`")
                health.hydrated = True
                health.snapshot_id = _str_or_none(state.meta("snapshot_id"))
                if rt.engine is not None:
                    rt.engine.mark_hydrated(manifest)
                    await rt.engine.wait_idle()  # the child starts once the buffer is on disk
                if rt.localsync is not None:
                    # After hydration: the published tree is what the state records, not news.
                    local = rt.localsync
                    tg.create_task(
                        local.run(local.watcher(ignore=settings.sync.ignore, initial_scan=True)),
                        name="localsync",
                    )
                await _after_hydrate(settings, reaper, rt)
                if cmd:
                    rt.supervisor = _make_supervisor(settings, cmd, reaper, rt)
                    tg.create_task(_child_then_stop(rt), name="child")
                if hooks is not None:
                    tg.create_task(hooks.run(), name="hooks")
                health.state = "syncing"
                log.info(
                    "sidecar.ready",
                    http_port=server.port,
                    child=list(cmd),
                    snapshot_id=health.snapshot_id,
                )
        except* _Shutdown:
            pass
        finally:
            health.state = "stopping"
            log.info("sidecar.stopping", signal=rt.signal_received)
            if rt.supervisor is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(rt.supervisor.stop())
            if rt.localsync is not None:
                # Persist the last-synced bases that merges need after a restart.
                with contextlib.suppress(Exception):
                    await rt.localsync.close()
    code = _exit_code(rt)
    log.info("sidecar.stopped", exit_code=code)
    return code


def _exit_code(rt: Runtime) -> int:
    sup = rt.supervisor
    if sup is not None and sup.exit_code is not None:
        return sup.exit_code
    if rt.signal_received is not None:
        return 128 + rt.signal_received
    return 0


def _str_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


# -- startup pieces --


def _start_sync(
    rt: Runtime,
    tg: asyncio.TaskGroup,
    applier: Applier,
    http: aiohttp.ClientSession,
    hooks: hooks_mod.OnChangeHooks | None,
) -> None:
    """Subscribe before hydrating (rule 4): events buffer in the engine until mark_hydrated."""
    settings = rt.settings
    if not settings.realtime.url:
        log.warning("sidecar.sync_disabled", reason="REALTIME_URL is not set")
        rt.health.subscribed = True  # nothing to subscribe to; readiness does not wait for it
        return

    def on_applied(paths: list[str]) -> None:
        if hooks is not None:
            hooks.notify(paths)

    async def resync(url: str, sha256: str | None) -> Manifest:
        return await hydrate(settings, rt.state, rt.metrics, url=url, sha256=sha256, session=http)

    engine = SyncEngine(
        applier,
        rt.state,
        rt.metrics,
        resync=resync,
        session_id=settings.session_id,
        on_applied=on_applied,
        tuning=SyncTuning(request_wait=settings.snapshot.request_wait),
        accept_client_events=settings.sync.accept_client_events,
    )
    replay_since = rt.state.meta("created_at")
    sub = Subscription(
        settings.realtime,
        rt.metrics,
        engine.on_message,
        replay_since_ms=replay_since if isinstance(replay_since, int) else None,
        tuning=SubscriptionTuning(auth_fail_window=settings.realtime.auth_fail_window),
    )
    engine.link = sub
    rt.engine, rt.subscription = engine, sub
    tg.create_task(sub.run(), name="subscription")
    tg.create_task(engine.run(), name="sync")
    if settings.sync.local_changes:
        upstream = None
        if settings.sync.upstream == "rpc" and settings.sync.supabase_url:
            upstream = Upstream(
                settings.sync.supabase_url,
                settings.project_id,
                apikey=settings.realtime.apikey or "",
                token=lambda: sub.tokens.current,
                session=http,
            )
        local = LocalSync.from_settings(
            settings, rt.state, rt.metrics, lock=applier.lock, send=sub.send, upstream=upstream
        )
        applier.before_publish = local.before_publish
        rt.localsync = local


async def _hydrate_healing(rt: Runtime, http: aiohttp.ClientSession) -> Manifest | None:
    """Hydrate from SNAPSHOT_URL; when it is expired or failing and the channel is reachable,
    ask the producer for a fresh snapshot (snapshot:request) and hydrate from its answer."""
    settings = rt.settings
    url = settings.snapshot.url
    if url is None and rt.state.meta("snapshot_id") is not None:
        log.info("sidecar.hydrate_skipped", reason="no SNAPSHOT_URL; tree already in place")
        return None
    if url is None and rt.engine is None:
        raise ConfigError("SNAPSHOT_URL is required for the first hydration")
    started = time.monotonic()
    first_error: SnapshotUnavailableError = SnapshotUnavailableError("SNAPSHOT_URL is not set")
    if url is not None:
        try:
            return await hydrate(settings, rt.state, rt.metrics, session=http)
        except SnapshotUnavailableError as exc:
            first_error = exc
    engine, sub = rt.engine, rt.subscription
    if engine is None or sub is None:
        raise first_error
    log.warning("sidecar.snapshot_request", reason=redact(str(first_error)))
    remaining = max(1.0, settings.snapshot.request_wait - (time.monotonic() - started))
    try:
        async with asyncio.timeout(remaining):
            await sub.wait_joined()
            ready = await engine.request_snapshot_and_wait("snapshot_unavailable")
    except TimeoutError:
        raise first_error from None
    assert ready.snapshot_url is not None
    return await hydrate(
        settings,
        rt.state,
        rt.metrics,
        url=ready.snapshot_url,
        sha256=ready.sha256,
        snapshot_id=ready.snapshot_id,
        session=http,
    )


async def _after_hydrate(settings: Settings, reaper: Reaper, rt: Runtime) -> None:
    if not settings.after_hydrate:
        return
    env = build_child_env(os.environ)
    status = await hooks_mod.run_after_hydrate(
        settings.after_hydrate,
        settings.project_dir,
        env,
        reaper=reaper,
        stop_grace=settings.stop_grace,
    )
    if status != 0:
        rt.health.last_error = f"SIDECAR_AFTER_HYDRATE exited with status {status}"
        raise HookFailedError(rt.health.last_error, status)


def _make_hooks(settings: Settings, reaper: Reaper, rt: Runtime) -> hooks_mod.OnChangeHooks | None:
    if not settings.on_change:
        return None

    async def restart() -> None:
        if rt.supervisor is not None:
            await rt.supervisor.restart()

    return hooks_mod.OnChangeHooks(
        settings.on_change,
        settings.project_dir,
        build_child_env(os.environ),
        on_restart=restart,
        reaper=reaper,
        stop_grace=settings.stop_grace,
    )


def _make_supervisor(
    settings: Settings, cmd: tuple[str, ...], reaper: Reaper, rt: Runtime
) -> Supervisor:
    env = build_child_env(os.environ)

    def factory() -> ChildProcess:
        return ChildProcess(cmd, settings.project_dir, env, settings.stop_grace, reaper=reaper)

    def on_start(child: ChildProcess) -> None:
        rt.health.child_pid, rt.health.child_status = child.pid, None
        log.info("child.started", pid=child.pid, argv=list(cmd))

    def on_exit(child: ChildProcess, status: int) -> None:
        rt.health.child_status = status
        log.info("child.exited", pid=child.pid, exit_code=status)

    return Supervisor(
        factory, rt.metrics, restart=settings.restart_child, on_start=on_start, on_exit=on_exit
    )


async def _child_then_stop(rt: Runtime) -> None:
    assert rt.supervisor is not None
    await rt.supervisor.run()
    rt.stop.set()


async def _raise_when_set(stop: asyncio.Event) -> NoReturn:
    await stop.wait()
    raise _Shutdown


def _refresh_status(rt: Runtime) -> None:
    """Copy the components' live status into HealthState (called on every /readyz, /status)."""
    h = rt.health
    if rt.subscription is not None:
        h.subscribed = rt.subscription.is_joined
    if rt.engine is not None:
        st = rt.engine.status()
        h.last_seq = st["last_seq"]
        h.lag_seconds = st["lag"]
        h.last_event_at = st["last_applied_at"]
        h.counts = dict(st["counts"])
        if st["last_error"]:
            h.last_error = st["last_error"]
    if rt.localsync is not None:
        h.conflicts = [c.to_json() for c in rt.localsync.conflicts]
    h.snapshot_id = _str_or_none(rt.state.meta("snapshot_id")) or h.snapshot_id


@contextlib.contextmanager
def _signals(rt: Runtime) -> Iterator[None]:
    """SIGTERM/SIGINT: first one stops in order, a second kills the child at once.
    SIGHUP/SIGUSR1/SIGUSR2 go to the child's process group."""
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        if rt.signal_received is not None:
            log.warning("sidecar.second_signal", signal=sig)
            if rt.supervisor is not None:
                rt.supervisor.kill()
            return
        rt.signal_received = int(sig)
        log.info("sidecar.signal", signal=sig.name)
        rt.stop.set()

    def on_forward(sig: signal.Signals) -> None:
        forwarded = rt.supervisor.forward(sig) if rt.supervisor is not None else False
        log.info("sidecar.signal_forwarded", signal=sig.name, forwarded=forwarded)

    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
        installed.append(sig)
    for sig in _FORWARDED:
        loop.add_signal_handler(sig, on_forward, sig)
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
