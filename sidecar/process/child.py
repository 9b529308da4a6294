"""The dev-server child: spawned in its own process group, signals forwarded, stopped with a grace
period, its exit status mapped to ours; an opt-in restart supervisor and the PID-1 zombie reaper.

Process group choice: the child starts in a new session (``start_new_session=True``), so it leads
its own process group, and every signal we send goes to that whole group (``os.killpg``), as
dumb-init does by default. ``npm run dev`` → ``sh`` → ``node`` then all get SIGTERM together,
nothing in the tree is left running on a restart, and a Ctrl-C typed into a terminal reaches the
child exactly once (through us) instead of twice (terminal + forward).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from sidecar.errors import ChildStartError, ExitCode
from sidecar.metrics import Metrics
from sidecar.process.identity import ChildUser
from sidecar.retry import backoff_delay

__all__ = [
    "FORWARDED_SIGNALS",
    "PRIVATE_ENV",
    "ChildProcess",
    "Reaper",
    "Supervisor",
    "build_child_env",
    "exit_status",
    "set_child_subreaper",
    "set_run_as",
    "spawn",
]

log = structlog.get_logger(component="child")

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""Signals the app forwards to the child's process group (it wires loop.add_signal_handler)."""

PRIVATE_ENV: tuple[str, ...] = ("SNAPSHOT_URL", "REALTIME_TOKEN", "REALTIME_TOKEN_FILE")
"""Sidecar-only variables that the dev server has no business seeing."""

_GROUP_POLL = 0.05  # seconds between checks that a stopped child's process group is empty
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


_run_as: ChildUser | None = None


def set_run_as(user: ChildUser | None) -> None:
    """Run every child and hook started from now on as `user` (None: as ourselves). Set once by
    the app when it starts as root (sidecar/process/identity.py)."""
    global _run_as
    _run_as = user


def exit_status(returncode: int) -> int:
    """Map a returncode to a shell-style exit status: itself, or 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def build_child_env(
    environ: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    *,
    drop: Sequence[str] = PRIVATE_ENV,
) -> dict[str, str]:
    """A fresh environment for the child: environ minus sidecar secrets, plus extra."""
    env = {k: v for k, v in environ.items() if k not in drop}
    env.update(extra or {})
    return env


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


async def spawn(
    argv: Sequence[str],
    *,
    cwd: Path | str | None,
    env: Mapping[str, str],
    reaper: Reaper | None = None,
) -> asyncio.subprocess.Process:
    """Start argv (no shell) as leader of a new session with exactly env; stdio is inherited.

    While the process is being created the reaper is held, and its pid is then protected, so the
    reaper never steals the status that asyncio waits for.

    Raises:
        ChildStartError: exit code 127 when the command (or cwd) does not exist, 126 when it
            exists but cannot be executed.
    """
    if not argv:
        raise ChildStartError("empty command", ExitCode.CHILD_NOT_FOUND)
    holding = reaper.holding() if reaper is not None else contextlib.nullcontext()
    user = _run_as
    if user is not None:
        env = {**env, **user.env()}
    with holding:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else [],
            )
        except FileNotFoundError as exc:
            if cwd is not None and exc.filename is not None and str(exc.filename) == str(cwd):
                what = f"working directory {str(cwd)!r} does not exist"
            else:
                what = f"command not found: {argv[0]!r}"
            raise ChildStartError(what, ExitCode.CHILD_NOT_FOUND) from exc
        except (PermissionError, IsADirectoryError) as exc:
            raise ChildStartError(
                f"command is not executable: {argv[0]!r} ({exc.strerror})",
                ExitCode.CHILD_NOT_EXECUTABLE,
            ) from exc
        except OSError as exc:
            # ENOEXEC (no shebang, wrong architecture) and friends: the shell answers 126 too.
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            raise ChildStartError(
                f"command cannot be executed: {argv[0]!r} ({reason})",
                ExitCode.CHILD_NOT_EXECUTABLE,
            ) from exc
        if reaper is not None:
            reaper.protect(proc.pid)
    return proc


class ChildProcess:
    """One run of a command: start, forward signals to its group, wait, stop (grace → SIGKILL).

    The environment is exactly ``env`` (build it with :func:`build_child_env`); ``os.environ`` is
    never read or changed here. ``wait()`` and ``stop()`` return the mapped exit status.
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path | str | None,
        env: Mapping[str, str],
        stop_grace: float = 10.0,
        *,
        stop_signal: int = signal.SIGTERM,
        reaper: Reaper | None = None,
        role: str = "child",
    ) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        self.cwd = cwd
        self.env: dict[str, str] = dict(env)
        self.stop_grace = stop_grace
        self.stop_signal = stop_signal
        self.role = role
        self._reaper = reaper
        self._proc: asyncio.subprocess.Process | None = None
        self._stop_lock = asyncio.Lock()
        self._stopped = False
        self._exit_logged = False
        # Once the leader is reaped and its group is empty, the pgid number may be reused by an
        # unrelated session: never signal it again.
        self._group_empty = False

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id), None before start()."""
        return self._proc.pid if self._proc is not None else None

    @property
    def exit_code(self) -> int | None:
        """The mapped exit status once the child has exited and been reaped, else None."""
        rc = self._proc.returncode if self._proc is not None else None
        return None if rc is None else exit_status(rc)

    @property
    def running(self) -> bool:
        """True between a successful start() and the child's exit."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the command; raises ChildStartError (126/127) and RuntimeError if started twice."""
        if self._proc is not None:
            raise RuntimeError("child already started")
        self._proc = await spawn(self.argv, cwd=self.cwd, env=self.env, reaper=self._reaper)
        log.info(
            "child.started",
            role=self.role,
            pid=self._proc.pid,
            argv=list(self.argv),
            cwd=str(self.cwd) if self.cwd is not None else None,
        )

    def forward(self, sig: int) -> bool:
        """Send sig to the child's process group; False when the child is not running."""
        if not self.running:
            return False
        sent = self._signal_group(sig)
        if sent:
            log.info("child.signal_forwarded", role=self.role, pid=self.pid, signal=_signame(sig))
        return sent

    def kill(self) -> None:
        """SIGKILL the child's process group at once (second signal: no more grace)."""
        if self.running and self._signal_group(signal.SIGKILL):
            log.warning(
                "child.killed", role=self.role, pid=self.pid, signal="SIGKILL", reason="forced"
            )

    async def wait(self) -> int:
        """Wait for the child to exit; return its status, 128+N when killed by signal N."""
        proc = self._require()
        rc = await proc.wait()
        if self._reaper is not None:
            self._reaper.release(proc.pid)
        status = exit_status(rc)
        if not self._group_empty and not self._group_alive():
            self._group_empty = True
        if not self._exit_logged:
            self._exit_logged = True
            log.info(
                "child.exited",
                role=self.role,
                pid=proc.pid,
                exit_code=status,
                signal=_signame(-rc) if rc < 0 else None,
            )
        return status

    async def stop(self, grace: float | None = None) -> int:
        """Stop the child and its process group; idempotent, returns the exit status.

        Sends the stop signal (SIGTERM) to the group, waits up to ``grace`` (default stop_grace)
        for the child and the rest of its group to exit, then SIGKILLs the group. Concurrent and
        repeated calls wait for the first one. If cancelled, the SIGKILL is sent before re-raising.
        """
        proc = self._require()
        async with self._stop_lock:
            if not self._stopped:
                try:
                    await self._terminate(self.stop_grace if grace is None else grace)
                except asyncio.CancelledError:
                    self._signal_group(signal.SIGKILL)
                    raise
                self._stopped = True
        if proc.returncode is not None:
            return exit_status(proc.returncode)
        return await self.wait()

    async def _terminate(self, grace: float) -> None:
        proc = self._require()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if not self._signal_group(self.stop_signal) and proc.returncode is not None:
            return  # exited and its group is empty: nothing to stop
        if proc.returncode is None:
            log.info(
                "child.stopping",
                role=self.role,
                pid=proc.pid,
                signal=_signame(self.stop_signal),
                grace=grace,
            )
        try:
            async with asyncio.timeout_at(deadline):
                await self.wait()
                await self._group_gone()
        except TimeoutError:
            log.warning(
                "child.stop_timed_out",
                role=self.role,
                pid=proc.pid,
                grace=grace,
                leader_exited=proc.returncode is not None,
            )
            self._signal_group(signal.SIGKILL)
            log.warning("child.killed", role=self.role, pid=proc.pid, signal="SIGKILL")
            await self.wait()

    async def _group_gone(self) -> None:
        # A process group has no fd to wait on; poll it briefly, bounded by the stop deadline.
        while self._group_alive():  # noqa: ASYNC110 - nothing to await on
            await asyncio.sleep(_GROUP_POLL)
        self._group_empty = True

    def _group_alive(self) -> bool:
        if self._group_empty:
            return False
        try:
            os.killpg(self._require().pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal_group(self, sig: int) -> bool:
        proc = self._require()
        if self._group_empty:
            return False
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            # The child changed its credentials; it may still accept a direct signal.
            if proc.returncode is not None:
                return False
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                return False
        return True

    def _require(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise RuntimeError("child not started")
        return self._proc


class Supervisor:
    """Runs the child from a factory and, when asked, restarts it.

    ``restart=True`` (SIDECAR_RESTART_CHILD) restarts a child that exited on its own after a
    capped exponential backoff, reset once a child ran for ``stable_after`` seconds, and at most
    ``max_restarts`` times in a row (None: no limit). ``restart()`` (an on-change "restart" hook)
    restarts at once whatever the policy. Every restart counts in metrics.child_restarts.
    """

    def __init__(
        self,
        factory: Callable[[], ChildProcess],
        metrics: Metrics,
        *,
        restart: bool = False,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
        max_restarts: int | None = None,
        on_start: Callable[[ChildProcess], None] | None = None,
        on_exit: Callable[[ChildProcess, int], None] | None = None,
    ) -> None:
        self._factory = factory
        self._metrics = metrics
        self.restart_on_exit = restart
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.max_restarts = max_restarts
        self._on_start = on_start
        self._on_exit = on_exit
        self._child: ChildProcess | None = None
        self._stopping = False
        self._restart_requested = False
        self._wake = asyncio.Event()
        self.restarts = 0
        self.exit_code: int | None = None

    @property
    def child(self) -> ChildProcess | None:
        """The current (or last) child."""
        return self._child

    @property
    def pid(self) -> int | None:
        """The current child's pid."""
        return self._child.pid if self._child is not None else None

    async def run(self) -> int:
        """Start the child, supervise it until it exits for good, and return its exit status.

        Raises ChildStartError when a start fails. On cancellation the current child is stopped
        (grace, then SIGKILL) before the CancelledError propagates.
        """
        loop = asyncio.get_running_loop()
        attempts = 0  # restarts in a row after exits on its own; reset by a stable run
        try:
            while True:
                child = self._factory()
                self._child = child
                await child.start()
                if self._on_start is not None:
                    self._on_start(child)
                started = loop.time()
                if self._stop_requested():
                    return self._exited(child, await child.stop())
                status = await child.wait()
                await child.stop()  # stragglers left in its process group
                self._exited(child, status)
                if self._stop_requested():
                    return status
                if self._restart_requested:
                    self._restart_requested = False
                    attempts = 0
                    self._count_restart(status, reason="requested")
                    continue
                if not self.restart_on_exit:
                    return status
                if loop.time() - started >= self.stable_after:
                    attempts = 0
                if self.max_restarts is not None and attempts >= self.max_restarts:
                    log.error("child.restart_limit", exit_code=status, restarts=attempts)
                    return status
                attempts += 1
                # No jitter: one local process, nothing to spread out.
                delay = backoff_delay(attempts, self.backoff_initial, self.backoff_max, floor=1.0)
                log.warning(
                    "child.restart_scheduled", exit_code=status, attempt=attempts, wait_for=delay
                )
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                if self._stop_requested():
                    return status
                self._restart_requested = False
                self._count_restart(status, reason="exited")
        finally:
            if self._child is not None and self._child.pid is not None:
                await self._child.stop()

    async def restart(self) -> None:
        """Stop the current child (grace, then SIGKILL) so that run() starts a new one at once."""
        if self._stopping:
            return
        self._restart_requested = True
        self._wake.set()
        child = self._child
        if child is not None and child.running:
            log.info("child.restart_requested", pid=child.pid)
            await child.stop()

    def forward(self, sig: int) -> bool:
        """Forward sig to the current child's process group."""
        return self._child.forward(sig) if self._child is not None else False

    def kill(self) -> None:
        """SIGKILL the current child at once and do not restart it."""
        self._stopping = True
        self._wake.set()
        if self._child is not None:
            self._child.kill()

    async def stop(self) -> int | None:
        """Stop the current child for good (no restart); its exit status, None if none ran."""
        self._stopping = True
        self._wake.set()
        child = self._child
        if child is None or child.pid is None:
            return None
        self.exit_code = await child.stop()
        return self.exit_code

    def _stop_requested(self) -> bool:
        # A method, not the attribute: stop() flips it while run() awaits (mypy would narrow it).
        return self._stopping

    def _exited(self, child: ChildProcess, status: int) -> int:
        self.exit_code = status
        if self._on_exit is not None:
            self._on_exit(child, status)
        return status

    def _count_restart(self, status: int, *, reason: str) -> None:
        self.restarts += 1
        self._metrics.child_restarts.inc()
        log.info("child.restarting", reason=reason, exit_code=status, restarts=self.restarts)


def set_child_subreaper(enabled: bool = True) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans below us are reparented to us, not to PID 1.

    Returns the previous setting. Raises OSError where prctl is unavailable (not Linux).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    previous = ctypes.c_int(0)
    if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return bool(previous.value)


class Reaper:
    """PID-1 duty: reap orphaned grandchildren on SIGCHLD, never the pids asyncio waits for.

    Enabled by default only when we are PID 1; tests pass ``enabled=True, subreaper=True`` so that
    orphans are reparented to the test process. A sweep peeks with
    ``waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT)`` and reaps only pids that are not protected; when
    the peek shows a protected pid, the other zombie children are found through /proc. Every
    subprocess this process starts while the reaper is enabled must go through :func:`spawn` (or
    hold :meth:`holding` and :meth:`protect` its pid), otherwise its status may be reaped here.
    Use as ``async with Reaper(...)``, or start()/close() from the event loop thread.
    """

    def __init__(self, *, enabled: bool | None = None, subreaper: bool = False) -> None:
        self.enabled = os.getpid() == 1 if enabled is None else enabled
        self.subreaper = subreaper
        self.reaped_total = 0
        self.reaped: deque[tuple[int, int]] = deque(maxlen=64)  # (pid, exit status), newest last
        self._protected: set[int] = set()
        self._holds = 0
        self._deferred = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_subreaper: bool | None = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Install the SIGCHLD handler (and the subreaper flag); a no-op when disabled."""
        if not self.enabled or self._loop is not None:
            return
        if self.subreaper:
            self._previous_subreaper = set_child_subreaper(True)
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.sweep)
        log.info("child.reaper_started", subreaper=self.subreaper, pid=os.getpid())
        self.sweep()  # whatever exited before the handler was there

    def close(self) -> None:
        """Remove the handler, reap what is left, and restore the subreaper flag."""
        if self._loop is None:
            return
        self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None
        self._sweep()
        if self._previous_subreaper is not None:
            set_child_subreaper(self._previous_subreaper)
            self._previous_subreaper = None

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Defer sweeps while a child is being created and its pid is not yet protected."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._holds == 0 and self._deferred:
                self._deferred = False
                self.sweep()

    def protect(self, pid: int) -> None:
        """Never reap pid: someone (asyncio) waits for it."""
        self._protected.add(pid)

    def release(self, pid: int) -> None:
        """pid has been waited for; forget it (the number may be reused)."""
        self._protected.discard(pid)

    def sweep(self) -> int:
        """Reap every exited orphan now; returns how many were reaped."""
        if not self.enabled or self._loop is None:
            return 0
        if self._holds:
            self._deferred = True
            return 0
        return self._sweep()

    def _sweep(self) -> int:
        count = 0
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break  # no children at all
            if info is None:
                break  # children, but none has exited
            if info.si_pid in self._protected:
                # The oldest zombie is ours to leave alone; look past it.
                count += sum(self._reap(pid) for pid in self._zombie_children())
                break
            reaped = self._reap(info.si_pid)
            if not reaped:
                break
            count += reaped
        return count

    def _reap(self, pid: int) -> int:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if got == 0:
            return 0
        code = os.waitstatus_to_exitcode(status)
        self.reaped_total += 1
        self.reaped.append((got, exit_status(code)))
        log.debug("child.orphan_reaped", pid=got, exit_code=exit_status(code))
        return 1

    def _zombie_children(self) -> list[int]:
        me = os.getpid()
        found: list[int] = []
        try:
            entries = list(Path("/proc").iterdir())
        except OSError:
            return found
        for entry in entries:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in self._protected:
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if len(fields) >= 2 and fields[0] == "Z" and fields[1] == str(me):
                found.append(pid)
        return found
