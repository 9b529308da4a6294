"""Tests for sidecar.process.child: real child processes, real signals, real orphans."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.errors import ChildStartError, ExitCode
from sidecar.metrics import Metrics
from sidecar.process.child import (
    FORWARDED_SIGNALS,
    ChildProcess,
    Reaper,
    Supervisor,
    build_child_env,
    exit_status,
)

PY = sys.executable
ENV = build_child_env(os.environ)

# Installs a handler for every forwarded signal that records the signal number, then exits 0.
SIGNAL_RECORDER = """
import os, signal, sys
out, ready = sys.argv[1], sys.argv[2]
def handler(sig, frame):
    with open(out, "w") as f:
        f.write(str(sig))
    os._exit(0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, handler)
open(ready, "w").close()
while True:
    signal.pause()
"""

# Ignores SIGTERM: only SIGKILL ends it.
IGNORES_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").close()
time.sleep(60)
"""

# Forks a grandchild that outlives the child: it waits for a gate file, then exits 3.
DOUBLE_FORK = """
import os, sys, time
pidfile, gate = sys.argv[1], sys.argv[2]
pid = os.fork()
if pid == 0:
    deadline = time.monotonic() + 20
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(3)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(pid))
os.rename(pidfile + ".tmp", pidfile)
sys.exit(5)
"""

# Starts a grandchild in the same process group, records its pid, then sleeps.
WITH_GRANDCHILD = """
import subprocess, sys, os, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(g.pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

SLEEPER = "import time; time.sleep(60)"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll predicate until it is true, failing after timeout seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def proc_state(pid: int) -> str | None:
    """The /proc state letter of pid (Z for a zombie), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


def child(argv: list[str], cwd: Path, grace: float = 2.0, **kw: Any) -> ChildProcess:
    """A ChildProcess with the test environment."""
    return ChildProcess(argv, cwd, ENV, grace, **kw)


def restarts(metrics: Metrics) -> float | None:
    """The value of sidecar_child_restarts_total."""
    return metrics.registry.get_sample_value(
        "sidecar_child_restarts_total", {"project_id": "local", "session_id": "local"}
    )


@pytest.mark.parametrize("code", [0, 3, 42])
async def test_exit_status_passes_through(tmp_path: Path, code: int) -> None:
    """wait() returns the child's own exit code."""
    proc = child([PY, "-c", f"import sys; sys.exit({code})"], tmp_path)
    await proc.start()
    assert await proc.wait() == code
    assert proc.exit_code == code
    assert not proc.running


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
async def test_signal_death_maps_to_128_plus_n(tmp_path: Path, sig: signal.Signals) -> None:
    """A child killed by signal N yields 128+N."""
    proc = child([PY, "-c", f"import os; os.kill(os.getpid(), {int(sig)})"], tmp_path)
    await proc.start()
    assert await proc.wait() == 128 + sig
    assert exit_status(-sig) == 128 + sig


@pytest.mark.parametrize("sig", FORWARDED_SIGNALS, ids=lambda s: s.name)
async def test_forward_delivers_each_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """forward(sig) reaches the child, which records which signal it got."""
    out, ready = tmp_path / "got", tmp_path / "ready"
    proc = child([PY, "-c", SIGNAL_RECORDER, str(out), str(ready)], tmp_path)
    await proc.start()
    try:
        await wait_for(ready.exists)
        with capture_logs() as logs:
            assert proc.forward(sig)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        assert out.read_text() == str(int(sig))
        assert logs[0]["event"] == "child.signal_forwarded"
        assert logs[0]["signal"] == sig.name
        assert not proc.forward(sig), "nothing to forward to once the child has exited"
    finally:
        await proc.stop()


async def test_stop_is_graceful_when_child_handles_sigterm(tmp_path: Path) -> None:
    """stop() sends SIGTERM; a child that exits on it is not killed."""
    out, ready = tmp_path / "got", tmp_path / "ready"
    proc = child([PY, "-c", SIGNAL_RECORDER, str(out), str(ready)], tmp_path, grace=5.0)
    await proc.start()
    await wait_for(ready.exists)
    with capture_logs() as logs:
        assert await proc.stop() == 0
    assert out.read_text() == str(int(signal.SIGTERM))
    events = [e["event"] for e in logs]
    assert "child.stopping" in events
    assert "child.killed" not in events
    assert "child.stop_timed_out" not in events


async def test_stop_escalates_to_sigkill_and_is_idempotent(tmp_path: Path) -> None:
    """A child ignoring SIGTERM is SIGKILLed after the grace; repeated stop() agrees."""
    ready = tmp_path / "ready"
    proc = child([PY, "-c", IGNORES_TERM, str(ready)], tmp_path, grace=0.3)
    await proc.start()
    await wait_for(ready.exists)
    with capture_logs() as logs:
        first, second = await asyncio.gather(proc.stop(), proc.stop())
    assert first == second == 128 + signal.SIGKILL
    assert await proc.stop() == 137
    events = [e["event"] for e in logs]
    assert events.count("child.stop_timed_out") == 1
    assert events.count("child.killed") == 1
    timed_out = next(e for e in logs if e["event"] == "child.stop_timed_out")
    assert timed_out["log_level"] == "warning"
    assert timed_out["grace"] == 0.3


async def test_stop_terminates_the_whole_process_group(tmp_path: Path) -> None:
    """stop() signals the child's process group, so a grandchild does not outlive it."""
    pidfile = tmp_path / "gpid"
    async with Reaper(enabled=True, subreaper=True) as reaper:
        proc = child([PY, "-c", WITH_GRANDCHILD, str(pidfile)], tmp_path, reaper=reaper)
        await proc.start()
        await wait_for(pidfile.exists)
        gpid = int(pidfile.read_text())
        assert os.getpgid(gpid) == proc.pid
        assert await proc.stop() == 128 + signal.SIGTERM
        await wait_for(lambda: proc_state(gpid) is None)


async def test_kill_is_immediate(tmp_path: Path) -> None:
    """kill() SIGKILLs at once, without waiting for a grace period."""
    ready = tmp_path / "ready"
    proc = child([PY, "-c", IGNORES_TERM, str(ready)], tmp_path, grace=60)
    await proc.start()
    await wait_for(ready.exists)
    proc.kill()
    async with asyncio.timeout(5):
        assert await proc.wait() == 137


async def test_environment_is_exactly_the_given_mapping(tmp_path: Path) -> None:
    """The child sees the env it was given, without sidecar secrets, and os.environ is untouched."""
    out = tmp_path / "env"
    before = dict(os.environ)
    env = build_child_env(
        {"PATH": os.environ.get("PATH", ""), "REALTIME_TOKEN": "t0k3n-secret", "KEEP": "1"},
        {"EXTRA": "2"},
    )
    script = "import os, sys, json; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    proc = ChildProcess([PY, "-c", script, str(out)], tmp_path, env, 2.0)
    await proc.start()
    assert await proc.wait() == 0
    seen = json.loads(out.read_text())
    assert seen.get("KEEP") == "1"
    assert seen.get("EXTRA") == "2"
    assert "REALTIME_TOKEN" not in seen
    assert dict(os.environ) == before


def _not_executable(tmp_path: Path) -> Path:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    return script


def _no_shebang(tmp_path: Path) -> Path:
    script = tmp_path / "garbage"
    script.write_bytes(b"\x00\x01\x02 not a program")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    ("make_argv", "code"),
    [
        (lambda p: [str(p / "does-not-exist")], ExitCode.CHILD_NOT_FOUND),
        (lambda p: ["sidecar-test-no-such-command"], ExitCode.CHILD_NOT_FOUND),
        (lambda p: [str(_not_executable(p))], ExitCode.CHILD_NOT_EXECUTABLE),
        (lambda p: [str(_no_shebang(p))], ExitCode.CHILD_NOT_EXECUTABLE),
        (lambda p: [str(p)], ExitCode.CHILD_NOT_EXECUTABLE),
    ],
    ids=["missing-path", "missing-command", "no-x-bit", "exec-format", "directory"],
)
async def test_start_failure_maps_to_126_or_127(
    tmp_path: Path, make_argv: Callable[[Path], list[str]], code: ExitCode
) -> None:
    """A command that cannot be found is 127; one that cannot be executed is 126."""
    proc = child(make_argv(tmp_path), tmp_path)
    with pytest.raises(ChildStartError) as info:
        await proc.start()
    assert info.value.exit_code == code
    assert isinstance(info.value, OSError)


async def test_missing_cwd_is_reported_as_such(tmp_path: Path) -> None:
    """A missing working directory fails the start with a message naming it."""
    proc = child([PY, "-c", "pass"], tmp_path / "nope")
    with pytest.raises(ChildStartError, match="working directory"):
        await proc.start()


async def test_reaper_reaps_orphaned_grandchild(tmp_path: Path) -> None:
    """An orphaned grandchild reparented to us is reaped; our own child's status is not stolen.

    1. Become a child subreaper and start the reaper.
    2. The child double-forks and exits 5; the grandchild is reparented to this process.
    3. The grandchild exits 3; SIGCHLD makes the reaper collect it, so no zombie is left.
    """
    pidfile, gate = tmp_path / "gpid", tmp_path / "gate"
    async with Reaper(enabled=True, subreaper=True) as reaper:
        proc = child([PY, "-c", DOUBLE_FORK, str(pidfile), str(gate)], tmp_path, reaper=reaper)
        await proc.start()
        assert await proc.wait() == 5
        gpid = int(pidfile.read_text())
        await wait_for(lambda: proc_state(gpid) in {None, "Z"} or _ppid(gpid) == os.getpid())
        gate.touch()
        await wait_for(lambda: proc_state(gpid) is None)
        assert (gpid, 3) in reaper.reaped
        assert reaper.reaped_total >= 1


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


async def test_reaper_leaves_protected_zombie_alone(tmp_path: Path) -> None:
    """A sweep skips a protected child even when it is the first zombie, and reaps the rest.

    1. A protected child exits 9 and stays a zombie (nobody waits for it yet).
    2. An orphan zombie appears behind it; the reaper finds it through /proc and reaps it.
    3. The protected child's status is still there for its owner.
    """
    pidfile, gate = tmp_path / "gpid", tmp_path / "gate"
    async with Reaper(enabled=True, subreaper=True) as reaper:
        with reaper.holding():
            protected = subprocess.Popen([PY, "-c", "import sys; sys.exit(9)"])
            reaper.protect(protected.pid)
        try:
            await wait_for(lambda: proc_state(protected.pid) == "Z")
            proc = child([PY, "-c", DOUBLE_FORK, str(pidfile), str(gate)], tmp_path, reaper=reaper)
            await proc.start()
            assert await proc.wait() == 5
            gpid = int(pidfile.read_text())
            gate.touch()
            await wait_for(lambda: proc_state(gpid) is None)
            assert proc_state(protected.pid) == "Z"
        finally:
            assert protected.wait(timeout=5) == 9
            reaper.release(protected.pid)


async def test_reaper_disabled_when_not_pid_1() -> None:
    """By default the reaper only runs as PID 1, and a disabled reaper does nothing."""
    reaper = Reaper()
    assert reaper.enabled is (os.getpid() == 1)
    disabled = Reaper(enabled=False)
    async with disabled:
        assert disabled.sweep() == 0


def _flaky_factory(tmp_path: Path, code: int = 1) -> Callable[[], ChildProcess]:
    return lambda: child([PY, "-c", f"import sys; sys.exit({code})"], tmp_path)


async def test_supervisor_restarts_with_capped_exponential_backoff(tmp_path: Path) -> None:
    """A crashing child is restarted with doubling, capped delays, up to max_restarts."""
    metrics = Metrics()
    sup = Supervisor(
        _flaky_factory(tmp_path),
        metrics,
        restart=True,
        backoff_initial=0.01,
        backoff_max=0.03,
        stable_after=60,
        max_restarts=3,
    )
    with capture_logs() as logs:
        assert await sup.run() == 1
    waits = [e["wait_for"] for e in logs if e["event"] == "child.restart_scheduled"]
    assert waits == [0.01, 0.02, 0.03]
    assert [e["event"] for e in logs].count("child.restart_limit") == 1
    assert sup.restarts == 3
    assert restarts(metrics) == 3


async def test_supervisor_backoff_resets_after_stable_run(tmp_path: Path) -> None:
    """Once a child ran for stable_after seconds, the next delay starts from the initial one."""
    metrics = Metrics()
    sup = Supervisor(
        _flaky_factory(tmp_path, 2),
        metrics,
        restart=True,
        backoff_initial=0.01,
        backoff_max=1.0,
        stable_after=0.0,
        max_restarts=1,  # consecutive fast failures only: a stable run resets the count
    )
    with capture_logs() as logs:
        task = asyncio.create_task(sup.run())
        await wait_for(lambda: sup.restarts >= 3)
        await sup.stop()
        assert await task in {2, 128 + signal.SIGTERM}  # stopped in a backoff or mid-run
    waits = [e["wait_for"] for e in logs if e["event"] == "child.restart_scheduled"]
    assert len(waits) >= 3
    assert set(waits) == {0.01}
    assert "child.restart_limit" not in [e["event"] for e in logs]
    assert restarts(metrics) == sup.restarts


async def test_supervisor_without_restart_returns_child_status(tmp_path: Path) -> None:
    """With the default policy the child's exit ends run() with its status, no restart."""
    metrics = Metrics()
    sup = Supervisor(_flaky_factory(tmp_path, 4), metrics)
    assert await sup.run() == 4
    assert sup.exit_code == 4
    assert restarts(metrics) == 0


async def test_supervisor_restart_on_request_and_stop(tmp_path: Path) -> None:
    """restart() replaces the child at once and counts; stop() ends run() with the status."""
    metrics = Metrics()
    started: list[int] = []
    sup = Supervisor(
        lambda: child([PY, "-c", SLEEPER], tmp_path),
        metrics,
        on_start=lambda c: started.append(c.pid or 0),
    )
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(sup.run())
        await wait_for(lambda: len(started) == 1)
        first = started[0]
        await sup.restart()
        await wait_for(lambda: len(started) == 2)
        assert started[1] != first
        assert proc_state(first) is None
        assert restarts(metrics) == 1
        await wait_for(lambda: sup.child is not None and sup.child.running)
        assert await sup.stop() == 128 + signal.SIGTERM
    assert task.result() == 128 + signal.SIGTERM
    assert restarts(metrics) == 1


async def test_supervisor_cancellation_stops_child(tmp_path: Path) -> None:
    """Cancelling run() stops the child before the cancellation propagates."""
    started: list[int] = []
    sup = Supervisor(
        lambda: child([PY, "-c", SLEEPER], tmp_path),
        Metrics(),
        on_start=lambda c: started.append(c.pid or 0),
    )
    task = asyncio.create_task(sup.run())
    await wait_for(lambda: len(started) == 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert proc_state(started[0]) is None
