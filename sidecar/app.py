"""The sidecar's life in three named phases, as uvicorn's `Server.serve`.

`startup()` builds every component (`sidecar/wiring.py`), installs the signal handlers and
starts the health listener (unready) and the PID-1 reaper. `steady()` is the one TaskGroup:
load the live stack and subscribe (events buffer) while hydrating -> apply the buffer ->
after-hydrate hook -> child -> sync, hooks and local changes, until a signal or the child's
exit. The child waits for the files, not for the live stack's imports. `shutdown()`
stops the child, persists LocalSync's bases and closes what startup opened, in reverse order;
every step runs, and each failure is logged and collected (aiohttp's `CleanupContext`), then
raised unless a failure of the steady state is already on its way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import NoReturn, TypeVar

import structlog

from sidecar.config import Settings
from sidecar.errors import ConfigError, HookFailedError, SidecarError, SnapshotUnavailableError
from sidecar.health import serve
from sidecar.process.child import build_child_env, set_run_as
from sidecar.process.identity import protect_private_files
from sidecar.redact import redact
from sidecar.snapshot.hydrate import hydrate
from sidecar.snapshot.manifest import Manifest
from sidecar.tree import fsio
from sidecar.tree.preflight import check_dirs
from sidecar.wiring import Components, build, hand_over_tree

__all__ = ["Sidecar", "run", "sync_only"]

log = structlog.get_logger(component="sidecar")

_FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_T = TypeVar("_T")


async def run(settings: Settings, cmd: tuple[str, ...]) -> int:
    """`sidecar run`: the container entrypoint; returns the child's status or 128+signal."""
    return await Sidecar(settings, cmd, hydrate_first=True).serve()


async def sync_only(settings: Settings) -> int:
    """`sidecar sync`: keep an already hydrated PROJECT_DIR in sync until a signal."""
    return await Sidecar(settings, (), hydrate_first=False).serve()


class _Shutdown(Exception):
    """Raised inside the task group to end the steady state (CPython's documented recipe)."""


class _Teardown:
    """Undo steps run in reverse order of registration. Every step runs; each failure is logged
    and collected (aiohttp's `CleanupContext`) instead of stopping the others."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    def push(self, name: str, step: Callable[[], Awaitable[object]]) -> None:
        """Run `step` at teardown, before every step pushed earlier."""
        self._steps.append((name, step))

    async def enter(self, name: str, cm: contextlib.AbstractAsyncContextManager[_T]) -> _T:
        """Enter `cm` now and exit it at teardown."""
        value = await cm.__aenter__()
        self.push(name, lambda: cm.__aexit__(None, None, None))
        return value

    def enter_sync(self, name: str, cm: contextlib.AbstractContextManager[_T]) -> _T:
        """Enter `cm` now and exit it at teardown."""
        value = cm.__enter__()
        self.push(name, _as_async(lambda: cm.__exit__(None, None, None)))
        return value

    async def run(self) -> list[Exception]:
        """Run every step, newest first; the failures, each one already logged."""
        failures: list[Exception] = []
        while self._steps:
            name, step = self._steps.pop()
            try:
                await step()
            except Exception as exc:  # collected and raised by the caller
                log.exception("sidecar.shutdown_failed", step=name, error=type(exc).__name__)
                failures.append(exc)
        return failures


class Sidecar:
    """One sidecar process: `serve()` = `startup()` -> `steady()` -> `shutdown()`.

    `components` is set once startup() has built them; `signal_received` by the first
    SIGTERM/SIGINT.
    """

    def __init__(self, settings: Settings, cmd: tuple[str, ...], *, hydrate_first: bool) -> None:
        self.settings = settings
        self.cmd = cmd
        self.hydrate_first = hydrate_first
        self.stop = asyncio.Event()
        self.signal_received: int | None = None
        self.components: Components | None = None
        self.http_port: int | None = None
        self._teardown = _Teardown()

    async def serve(self) -> int:
        """Run the three phases and return the exit code.

        Raises what startup or the steady state raised (shutdown failures are then only
        logged), else an ExceptionGroup of the shutdown failures that are bugs, if any.
        """
        try:
            c = await self.startup()
            await self.steady(c)
        except BaseException:
            await self.shutdown()
            raise
        failures = await self.shutdown()
        # Each failure is logged already. One of the environment (a full disk while the merge
        # bases are saved, an OS refusal) does not replace the child's status, which is what the
        # orchestrator acts on; anything else is a bug and ends as exit 70 (sidecar/errors.py).
        bugs = [f for f in failures if not isinstance(f, SidecarError | OSError)]
        if bugs:
            raise ExceptionGroup("shutdown failed", bugs)
        code = self.exit_code(c)
        log.info("sidecar.stopped", exit_code=code)
        return code

    # -- phases --

    async def startup(self) -> Components:
        """Build everything, install signals, start the health listener (unready) and the
        reaper. Every step registers its undo with the teardown, which shutdown() runs."""
        settings = self.settings
        check_dirs(settings.project_dir, settings.state_dir)
        c = build(settings, self.cmd)
        # Closed last: the live stack's HTTP session (large contents, RPCs), once it is loaded.
        self._teardown.push("live", c.live.close)
        self._teardown.push("state", _as_async(c.state.close))
        # What a kill left behind: downloads and staged writes (never visible in the project).
        swept = fsio.sweep_temp(
            settings.state_dir / fsio.STAGE_DIR_NAME,
            settings.project_dir,
            {p.rpartition("/")[0] for p in c.state.live()},
        )
        if swept:
            log.info("sidecar.temp_swept", entries=swept)
        # Started as root: the child (untrusted code) runs as another user and cannot read the
        # token file or the state; non-dumpable (cli.py) keeps it out of /proc/<pid>/environ.
        set_run_as(c.child_user)
        if c.child_user is not None:
            protect_private_files(settings.state_dir, settings.realtime.token_file)
            log.info("sidecar.child_user", user=c.child_user.name, uid=c.child_user.uid)
        log.info(
            "sidecar.starting",
            command=list(self.cmd),
            project_dir=str(settings.project_dir),
            pid=os.getpid(),
        )
        self._teardown.enter_sync("signals", self._signals(c))
        server = await self._teardown.enter("health", serve(settings.http, c.health, c.metrics))
        self.http_port = server.port
        await self._teardown.enter("reaper", c.reaper)
        # Undone first: the child stops before anything it may still use goes away, then the
        # last-synced bases that merges need after a restart are persisted.
        self._teardown.push("localsync", c.local.close)
        self._teardown.push("child", lambda: asyncio.shield(c.child.stop()))
        self.components = c
        return c

    async def steady(self, c: Components) -> None:
        """The one TaskGroup: bring the tree and the child up, then run until stopped."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_raise_when_set(self.stop), name="stop")
                # Subscribes while hydrating (delta rule 4, sidecar/live/__init__.py).
                c.live.start(tg)
                await self._bring_up(c, tg)
        except* _Shutdown:
            pass

    async def shutdown(self) -> list[Exception]:
        """Undo startup in reverse order (the child first); the failures, each one logged."""
        if self.components is not None:
            self.components.health.state = "stopping"
            log.info("sidecar.stopping", signal=self.signal_received)
        return await self._teardown.run()

    def exit_code(self, c: Components) -> int:
        """The child's status, else 128+signal, else 0."""
        if c.child.exit_code is not None:
            return c.child.exit_code
        if self.signal_received is not None:
            return 128 + self.signal_received
        return 0

    # -- the steps of the steady state --

    async def _bring_up(self, c: Components, tg: asyncio.TaskGroup) -> None:
        health = c.health
        if self.hydrate_first:
            health.state = "hydrating"
            manifest = await self._hydrate_healing(c)
        else:
            manifest = None
            if c.state.meta("snapshot_id") is None:
                raise ConfigError("PROJECT_DIR is not hydrated; run `sidecar hydrate`")
        await hand_over_tree(self.settings, c.child_user)
        health.hydrated = True
        health.snapshot_id = _str_or_none(c.state.meta("snapshot_id"))
        c.live.mark_hydrated(manifest)
        await c.live.wait_idle()  # the child starts once the buffer is on disk
        await self._after_hydrate(c)
        tg.create_task(self._child_then_stop(c), name="child")
        # Local changes start right after the child (tasks run in creation order): the child
        # does not wait for the watcher's imports, and the watcher's initial scan still sees
        # anything the child wrote before it was watching.
        tg.create_task(c.local.run(), name="localsync")
        tg.create_task(c.hooks.run(), name="hooks")
        health.state = "syncing"
        log.info(
            "sidecar.ready",
            http_port=self.http_port,
            child=list(self.cmd),
            snapshot_id=health.snapshot_id,
        )

    async def _hydrate_healing(self, c: Components) -> Manifest | None:
        """Hydrate from SNAPSHOT_URL; when it is expired or failing and the channel is reachable,
        ask the producer for a fresh snapshot (snapshot:request) and hydrate from its answer."""
        settings = self.settings
        url = settings.snapshot.url
        if url is None and c.state.meta("snapshot_id") is not None:
            log.info("sidecar.hydrate_skipped", reason="no SNAPSHOT_URL; tree already in place")
            return None
        if url is None and not c.live.enabled:
            raise ConfigError("SNAPSHOT_URL is required for the first hydration")
        started = time.monotonic()
        first_error = SnapshotUnavailableError("SNAPSHOT_URL is not set")
        if url is not None:
            try:
                return await hydrate(settings, c.tree, c.metrics)
            except SnapshotUnavailableError as exc:
                first_error = exc
        if not c.live.enabled:
            raise first_error
        log.warning("sidecar.snapshot_request", reason=redact(str(first_error)))
        remaining = max(1.0, settings.snapshot.request_wait - (time.monotonic() - started))
        try:
            async with asyncio.timeout(remaining):
                ready = await c.live.request_snapshot("snapshot_unavailable")
        except TimeoutError:
            raise first_error from None
        assert ready.snapshot_url is not None
        return await hydrate(
            settings,
            c.tree,
            c.metrics,
            url=ready.snapshot_url,
            sha256=ready.sha256,
            snapshot_id=ready.snapshot_id,
        )

    async def _after_hydrate(self, c: Components) -> None:
        settings = self.settings
        if not settings.process.after_hydrate:
            return
        from sidecar.process import hooks as hooks_mod

        status = await hooks_mod.run_after_hydrate(
            settings.process.after_hydrate,
            settings.project_dir,
            build_child_env(os.environ),
            reaper=c.reaper,
            stop_grace=settings.process.stop_grace,
        )
        if status != 0:
            c.health.last_error = f"SIDECAR_AFTER_HYDRATE exited with status {status}"
            raise HookFailedError(c.health.last_error, status)

    async def _child_then_stop(self, c: Components) -> None:
        await c.child.run()
        self.stop.set()

    @contextlib.contextmanager
    def _signals(self, c: Components) -> Iterator[None]:
        """SIGTERM/SIGINT: first one stops in order, a second kills the child at once.
        SIGHUP/SIGUSR1/SIGUSR2 go to the child's process group."""
        loop = asyncio.get_running_loop()

        def on_stop(sig: signal.Signals) -> None:
            if self.signal_received is not None:
                log.warning("sidecar.second_signal", signal=sig)
                c.child.kill()
                return
            self.signal_received = int(sig)
            log.info("sidecar.signal", signal=sig.name)
            self.stop.set()

        def on_forward(sig: signal.Signals) -> None:
            forwarded = c.child.forward(sig)
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


def _str_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


async def _raise_when_set(stop: asyncio.Event) -> NoReturn:
    await stop.wait()
    raise _Shutdown


def _as_async(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def step() -> object:
        return fn()

    return step
