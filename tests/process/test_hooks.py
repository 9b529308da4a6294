"""Tests for sidecar.process.hooks: after-hydrate command and debounced, coalesced on-change rules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sidecar.errors import ConfigError
from sidecar.process.child import build_child_env
from sidecar.process.hooks import OnChangeHooks, OnChangeRule, run_after_hydrate

PY = sys.executable
ENV = build_child_env(os.environ)

# Appends one line (the changed paths, comma separated) to argv[1] per run.
RECORD = """
import os, sys
with open(sys.argv[1], "a") as f:
    f.write(os.environ["SIDECAR_CHANGED_PATHS"].replace("\\n", ",") + "\\n")
"""

# Appends a line, then holds the run until the gate file argv[2] exists.
GATED = """
import os, sys, time
with open(sys.argv[1], "a") as f:
    f.write("run\\n")
deadline = time.monotonic() + 20
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.01)
"""

# Records its pid, then sleeps.
SLEEP = """
import sys, time
open(sys.argv[1], "w").write(str(__import__("os").getpid()))
time.sleep(60)
"""


def command(script: str, *args: Path | str) -> str:
    """A SIDECAR_ON_CHANGE command line running script with the test interpreter."""
    return shlex.join([PY, "-c", script, *map(str, args)])


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll predicate until it is true, failing after timeout seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def lines(path: Path) -> list[str]:
    """The lines of path, empty when it does not exist yet."""
    return path.read_text().splitlines() if path.exists() else []


@contextlib.asynccontextmanager
async def running(hooks: OnChangeHooks) -> AsyncIterator[OnChangeHooks]:
    """Run hooks.run() in a TaskGroup for the duration of the block, then cancel it."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(hooks.run())
        try:
            yield hooks
        finally:
            task.cancel()


async def idle(hooks: OnChangeHooks, timeout: float = 10.0) -> None:
    """Wait until hooks has nothing pending or running."""
    async with asyncio.timeout(timeout):
        await hooks.wait_idle()


@pytest.mark.parametrize(
    ("glob", "path", "expected"),
    [
        ("package.json", "package.json", True),
        ("package.json", "apps/web/package.json", True),
        ("package.json", "./package.json", True),
        ("package.json", "package.json.bak", False),
        ("*.ts", "src/deep/app.ts", True),
        ("src/*.ts", "src/app.ts", True),
        ("src/*.ts", "lib/src/app.ts", False),
        ("config/*.yml", "app.yml", False),
        ("*.TS", "a.ts", False),
    ],
)
def test_rule_matching(glob: str, path: str, expected: bool) -> None:
    """Globs match the relative path; a glob without "/" also matches the basename."""
    assert OnChangeRule(glob, "restart").matches(path) is expected


def test_invalid_action_is_a_config_error(tmp_path: Path) -> None:
    """An action that shlex cannot split is refused up front."""
    with pytest.raises(ConfigError, match=r"package\.json"):
        OnChangeHooks([("package.json", "npm 'install")], tmp_path, ENV)


async def test_burst_of_changes_runs_once(tmp_path: Path) -> None:
    """Fifty matching notifications in a burst produce exactly one run with every path."""
    log = tmp_path / "runs"
    hooks = OnChangeHooks([("package.json", command(RECORD, log))], tmp_path, ENV, debounce=0.05)
    async with running(hooks):
        for i in range(50):
            hooks.notify(["package.json" if i % 2 else "pkgs/a/package.json"])
            await asyncio.sleep(0)
        await idle(hooks)
    assert lines(log) == ["pkgs/a/package.json,package.json"]
    assert hooks.runs == 1


async def test_non_matching_paths_run_nothing(tmp_path: Path) -> None:
    """Paths that match no rule leave the hooks idle and run nothing."""
    log = tmp_path / "runs"
    hooks = OnChangeHooks([("package.json", command(RECORD, log))], tmp_path, ENV, debounce=0.01)
    async with running(hooks):
        hooks.notify(["src/app.ts", "README.md", "package.json.orig"])
        assert hooks.idle
        await idle(hooks)
    assert not log.exists()
    assert hooks.runs == 0


async def test_changes_during_a_run_cause_one_follow_up(tmp_path: Path) -> None:
    """Changes that arrive while a run is in progress lead to exactly one more run.

    1. A change starts run 1, which blocks on a gate file.
    2. Ten more changes arrive during run 1.
    3. The gate opens; run 1 ends and exactly one follow-up run happens.
    """
    log, gate = tmp_path / "runs", tmp_path / "gate"
    hooks = OnChangeHooks([("*.json", command(GATED, log, gate))], tmp_path, ENV, debounce=0.02)
    async with running(hooks):
        hooks.notify(["a.json"])
        await wait_for(lambda: len(lines(log)) == 1)
        for i in range(10):
            hooks.notify([f"b{i}.json"])
            await asyncio.sleep(0)
        gate.touch()
        await idle(hooks)
    assert lines(log) == ["run", "run"]
    assert hooks.runs == 2


async def test_restart_action_calls_back_once(tmp_path: Path) -> None:
    """A burst matching a "restart" rule calls the restart callback exactly once."""
    calls = 0

    async def on_restart() -> None:
        nonlocal calls
        calls += 1

    hooks = OnChangeHooks(
        [("*.ts", "restart"), ("tsconfig.json", "restart")],
        tmp_path,
        ENV,
        on_restart=on_restart,
        debounce=0.02,
    )
    async with running(hooks):
        with capture_logs() as logs:
            for i in range(20):
                hooks.notify([f"src/m{i}.ts", "tsconfig.json"])
            await idle(hooks)
    assert calls == 1
    assert [e["event"] for e in logs].count("hooks.restart") == 1


async def test_commands_run_before_restart(tmp_path: Path) -> None:
    """When a command and a restart both match, the command runs first, then the restart."""
    log = tmp_path / "runs"
    order: list[str] = []

    async def on_restart() -> None:
        order.append("restart" if log.exists() else "restart-before-command")

    hooks = OnChangeHooks(
        [("package.json", "restart"), ("package.json", command(RECORD, log))],
        tmp_path,
        ENV,
        on_restart=on_restart,
        debounce=0.01,
    )
    async with running(hooks):
        hooks.notify(["package.json"])
        await idle(hooks)
    assert order == ["restart"]
    assert lines(log) == ["package.json"]


async def test_failing_command_is_logged_and_hooks_continue(tmp_path: Path) -> None:
    """A failing or missing command is logged; later changes still run their actions."""
    log = tmp_path / "runs"
    hooks = OnChangeHooks(
        [
            ("*.txt", command("import sys; sys.exit(3)")),
            ("*.txt", "sidecar-test-no-such-command"),
            ("*.md", command(RECORD, log)),
        ],
        tmp_path,
        ENV,
        debounce=0.01,
    )
    async with running(hooks):
        with capture_logs() as logs:
            hooks.notify(["a.txt"])
            await idle(hooks)
        hooks.notify(["b.md"])
        await idle(hooks)
    failed = [e for e in logs if e["event"] == "hooks.on_change_failed"]
    assert sorted(e["exit_code"] for e in failed) == [3, 127]
    assert lines(log) == ["b.md"]


async def test_cancelling_run_stops_the_running_command(tmp_path: Path) -> None:
    """Cancelling run() while a command runs stops that command."""
    pidfile = tmp_path / "pid"
    hooks = OnChangeHooks(
        [("*", command(SLEEP, pidfile))], tmp_path, ENV, debounce=0.01, stop_grace=2.0
    )
    task = asyncio.create_task(hooks.run())
    hooks.notify(["x"])
    await wait_for(lambda: pidfile.exists() and pidfile.read_text() != "")
    pid = int(pidfile.read_text())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert not Path(f"/proc/{pid}").exists()


async def test_after_hydrate_runs_in_project_dir(tmp_path: Path) -> None:
    """The after-hydrate command runs once in project_dir and its status is returned."""
    script = "import os; open('cwd.txt', 'w').write(os.getcwd())"
    assert await run_after_hydrate([PY, "-c", script], tmp_path, ENV) == 0
    assert (tmp_path / "cwd.txt").read_text() == str(tmp_path)


async def test_after_hydrate_failure_is_returned(tmp_path: Path) -> None:
    """A failing command's status is returned (and logged), not raised."""
    with capture_logs() as logs:
        assert await run_after_hydrate([PY, "-c", "raise SystemExit(7)"], tmp_path, ENV) == 7
    assert logs[-1]["event"] == "hooks.after_hydrate_failed"
    assert logs[-1]["exit_code"] == 7


async def test_after_hydrate_missing_command_and_empty(tmp_path: Path) -> None:
    """A missing command returns 127; no command returns 0 without running anything."""
    assert await run_after_hydrate(["sidecar-test-no-such-command"], tmp_path, ENV) == 127
    assert await run_after_hydrate([], tmp_path, ENV) == 0


async def test_after_hydrate_time_limit(tmp_path: Path) -> None:
    """A command over max_seconds is stopped with SIGTERM and its status returned."""
    status = await run_after_hydrate(
        [PY, "-c", "import time; time.sleep(60)"], tmp_path, ENV, max_seconds=0.2
    )
    assert status == 143
