"""Project hooks: SIDECAR_AFTER_HYDRATE (one command before the child starts) and
SIDECAR_ON_CHANGE (glob → restart the child, or run a command), debounced and coalesced.

Commands never go through a shell (``shlex.split``), run in project_dir with an explicit
environment, and are started through :func:`sidecar.process.child.spawn`, so the PID-1 reaper leaves
their status alone. (hooks → child is the one import between the entrypoint modules; child
imports nothing from here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, NoReturn

import structlog

from sidecar.errors import ChildStartError, ConfigError
from sidecar.process.child import ChildProcess, Reaper

__all__ = ["RESTART", "OnChangeHooks", "OnChangeRule", "run_after_hydrate"]

log = structlog.get_logger(component="hooks")

RESTART = "restart"
"""The on-change action that restarts the child instead of running a command."""

_MAX_PATHS = 200  # matched paths passed to a command in SIDECAR_CHANGED_PATHS
_MAX_PATHS_CHARS = 32 * 1024


async def run_after_hydrate(
    argv: Sequence[str],
    project_dir: Path,
    env: Mapping[str, str],
    *,
    reaper: Reaper | None = None,
    max_seconds: float | None = None,
    stop_grace: float = 10.0,
) -> int:
    """Run SIDECAR_AFTER_HYDRATE once in project_dir and return its exit status (0 when empty).

    A failure is logged (``hooks.after_hydrate_failed``) and returned, not raised: the app
    decides. The intended policy is not to start the child and to exit with this status, since a
    failed ``npm ci`` leaves a tree the dev server cannot run on. 127/126 mean the command could
    not be executed; after ``max_seconds`` the command is stopped (grace, then SIGKILL) and
    its status (143 or 137) returned. On cancellation the command is stopped, then re-raised.
    """
    if not argv:
        return 0
    return await _run_hook(
        "after_hydrate",
        argv,
        project_dir,
        env,
        stop_grace,
        reaper,
        max_seconds=max_seconds,
        failed_level=logging.ERROR,
    )


@dataclass(frozen=True, slots=True)
class _HookEvents:
    """A hook role's log event names, spelled out so that grep finds them."""

    started: str
    finished: str
    failed: str
    timed_out: str


_EVENTS = {
    "after_hydrate": _HookEvents(
        "hooks.after_hydrate_started",
        "hooks.after_hydrate_finished",
        "hooks.after_hydrate_failed",
        "hooks.after_hydrate_timed_out",
    ),
    "on_change": _HookEvents(
        "hooks.on_change_started",
        "hooks.on_change_finished",
        "hooks.on_change_failed",
        "hooks.on_change_timed_out",
    ),
}


async def _run_hook(
    role: Literal["after_hydrate", "on_change"],
    argv: Sequence[str],
    project_dir: Path,
    env: Mapping[str, str],
    stop_grace: float,
    reaper: Reaper | None,
    *,
    max_seconds: float | None = None,
    failed_level: int,
    **fields: object,
) -> int:
    """Run one hook command to its end and return its exit status, logging
    ``hooks.<role>_started`` / ``_finished`` / ``_failed`` / ``_timed_out`` (with the argv and
    `fields` on each).

    127/126 when it could not be executed (always logged as an error); after `max_seconds` it
    is stopped (grace, then SIGKILL) and its 143 or 137 returned. A non-zero exit is logged at
    `failed_level`. On cancellation the command is stopped, then the cancellation re-raised.
    """
    events = _EVENTS[role]
    fields = {"argv": list(argv), **fields}
    started = time.monotonic()
    proc = ChildProcess(argv, project_dir, env, stop_grace, reaper=reaper, role=role)
    log.info(events.started, **fields)
    try:
        await proc.start()
    except ChildStartError as exc:
        failure: ChildStartError | None = exc
    else:
        failure = None
    if failure is not None:
        code = int(failure.exit_code)
        log.error(events.failed, **fields, exit_code=code, reason=str(failure))
        return code
    timed_out = False
    try:
        async with asyncio.timeout(max_seconds):
            status = await proc.wait()
    except TimeoutError:
        timed_out = True
        status = await proc.stop()
    finally:
        await proc.stop()
    if timed_out:
        log.error(events.timed_out, **fields, max_seconds=max_seconds, exit_code=status)
    seconds = round(time.monotonic() - started, 3)
    if status == 0:
        log.info(events.finished, **fields, exit_code=0, seconds=seconds)
    else:
        log.log(failed_level, events.failed, **fields, exit_code=status, seconds=seconds)
    return status


@dataclass(frozen=True, slots=True)
class OnChangeRule:
    """One SIDECAR_ON_CHANGE rule: a glob over project-relative paths and its action."""

    glob: str
    action: str

    def matches(self, path: str) -> bool:
        """fnmatch on the posix relative path; a glob without "/" also matches the basename."""
        path = path.removeprefix("./")
        if fnmatchcase(path, self.glob):
            return True
        return "/" not in self.glob and fnmatchcase(posixpath.basename(path), self.glob)

    @property
    def argv(self) -> tuple[str, ...] | None:
        """The command to run, or None for the restart action."""
        return None if self.action == RESTART else tuple(shlex.split(self.action))


class OnChangeHooks:
    """SIDECAR_ON_CHANGE: notify() collects matching paths, run() acts on them.

    A burst of matching changes produces one run, ``debounce`` seconds after the last of them
    (but no later than ``max_delay`` after the first), so the action sees the latest files. A
    change arriving while a run is in progress produces exactly one more run after it. In a run,
    each distinct action whose rules matched runs once: commands in rule order, then the restart
    callback. A command's failure is logged and does not stop the hooks; an exception from
    ``on_restart`` propagates out of run(). Commands get ``SIDECAR_CHANGED_PATHS`` (newline
    separated, capped) in their environment.
    """

    def __init__(
        self,
        rules: Iterable[tuple[str, str]],
        project_dir: Path,
        env: Mapping[str, str],
        *,
        on_restart: Callable[[], Awaitable[None]] | None = None,
        debounce: float = 0.3,
        max_delay: float = 5.0,
        reaper: Reaper | None = None,
        stop_grace: float = 10.0,
    ) -> None:
        self.rules = tuple(OnChangeRule(glob, action.strip()) for glob, action in rules)
        problems = []
        for rule in self.rules:
            try:
                argv = rule.argv
            except ValueError as exc:
                problems.append(f"SIDECAR_ON_CHANGE action for {rule.glob!r}: {exc}")
                continue
            if argv == ():
                problems.append(f"SIDECAR_ON_CHANGE action for {rule.glob!r} is empty")
        if problems:
            raise ConfigError(problems)
        self.project_dir = project_dir
        self.env = dict(env)
        self.debounce = debounce
        self.max_delay = max(max_delay, debounce)
        self.stop_grace = stop_grace
        self.runs = 0
        self._on_restart = on_restart
        self._reaper = reaper
        self._pending: dict[str, dict[str, None]] = {}  # action -> matched paths (ordered set)
        self._first_at = 0.0
        self._last_at = 0.0
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def notify(self, paths: Iterable[str]) -> None:
        """Record changed project-relative paths; never blocks (call from the loop thread)."""
        matched = False
        for path in paths:
            for rule in self.rules:
                if rule.matches(path):
                    bucket = self._pending.setdefault(rule.action, {})
                    if len(bucket) < _MAX_PATHS:
                        bucket[path] = None
                    matched = True
        if not matched:
            return
        now = time.monotonic()
        if not self._wake.is_set():
            self._first_at = now
        self._last_at = now
        self._idle.clear()
        self._wake.set()
        self._kick.set()

    @property
    def idle(self) -> bool:
        """True when nothing is pending and no run is in progress."""
        return self._idle.is_set()

    async def wait_idle(self) -> None:
        """Wait until nothing is pending and no run is in progress."""
        await self._idle.wait()

    async def run(self) -> NoReturn:
        """Act on notifications forever; owned by the app's TaskGroup, ends by cancellation.

        Cancelling it while a command runs stops that command (grace, then SIGKILL) first.
        """
        while True:
            await self._wake.wait()
            await self._debounce()
            batch, self._pending = self._pending, {}
            self._wake.clear()
            self.runs += 1
            await self._run_batch(batch)
            if not self._wake.is_set():
                self._idle.set()

    async def _debounce(self) -> None:
        # Wait until no matching change came for `debounce` seconds (or max_delay has passed);
        # every notify() kicks the wait so the deadline is recomputed from the latest change.
        while (remaining := self._quiet_at() - time.monotonic()) > 0:
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._kick.wait()

    def _quiet_at(self) -> float:
        return min(self._last_at + self.debounce, self._first_at + self.max_delay)

    async def _run_batch(self, batch: dict[str, dict[str, None]]) -> None:
        restart = batch.pop(RESTART, None)
        for action, paths in batch.items():
            await self._run_command(action, list(paths))
        if restart is not None:
            if self._on_restart is None:
                log.warning("hooks.restart_unavailable", paths=len(restart))
            else:
                log.info("hooks.restart", paths=len(restart), first=next(iter(restart)))
                await self._on_restart()

    async def _run_command(self, action: str, paths: list[str]) -> None:
        argv = shlex.split(action)
        changed = "\n".join(paths)[:_MAX_PATHS_CHARS]
        env = {**self.env, "SIDECAR_CHANGED_PATHS": changed}
        await _run_hook(
            "on_change",
            argv,
            self.project_dir,
            env,
            self.stop_grace,
            self._reaper,
            failed_level=logging.WARNING,
            paths=len(paths),
        )
