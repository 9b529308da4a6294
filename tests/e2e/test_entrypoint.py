"""End to end, the entrypoint (issue 4): signals, exit codes, PID-1 reaping, start order,
readiness, on-change hooks, secrets in output, configuration errors; the real `sidecar run`
against the stack on a real PostgreSQL (tests/e2e/e2e_stack.py). The configuration errors need
no database: they are refused before anything is contacted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.errors import ExitCode
from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import (
    SAMPLE,
    Stack,
    base_env,
    run_sidecar,
    running_sidecar,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.e2e

PY = sys.executable

SIGNAL_CHILD = """
import os, signal, sys
rec = sys.argv[1]
def note(what):
    with open(rec, "a") as f:
        f.write(what + "\\n")
def on_signal(signum, frame):
    note(signal.Signals(signum).name)
for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, on_signal)
def on_term(signum, frame):
    note("SIGTERM")
    os._exit(3)
signal.signal(signal.SIGTERM, on_term)
note("ready")
while True:
    signal.pause()
"""

STUBBORN_CHILD = """
import signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "w") as f:
    f.write("ready\\n")
while True:
    signal.pause()
"""

# Runs as the sidecar's child with the sidecar as PID 1 of a new PID namespace. It double-forks a
# grandchild that exits once orphaned (reparented to PID 1), then watches /proc for its zombie.
ORPHAN_CHILD = """
import json, os, sys, time
out = sys.argv[1]
r, w = os.pipe()
mid = os.fork()
if mid == 0:
    grand = os.fork()
    if grand == 0:
        deadline = time.monotonic() + 10
        while os.getppid() != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)
    os.write(w, str(grand).encode())
    os._exit(0)
os.close(w)
os.waitpid(mid, 0)
grand = int(os.read(r, 32))
states = []
result = "zombie"
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        with open(f"/proc/{grand}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone between open and read
        result = "reaped"
        break
    if not states or states[-1] != state:
        states.append(state)
    time.sleep(0.01)
with open("/proc/1/cmdline", "rb") as f:
    pid1 = f.read().replace(b"\\0", b" ").decode()
with open(out, "w") as f:
    json.dump({"result": result, "states": states, "me": os.getpid(), "pid1": pid1}, f)
"""

# Records, when it starts, whether a file that only a buffered delta brings is already there.
STARTUP_PROBE = """
import os, sys, time
with open(sys.argv[1], "w") as f:
    try:
        with open("late.txt", "rb") as g:
            f.write("late=" + g.read().decode())
    except FileNotFoundError:
        f.write("late=missing")
while True:
    time.sleep(3600)
"""

RESTARTING_CHILD = """
import os, sys, time
starts, die = sys.argv[1], sys.argv[2]
with open(starts, "a") as f:
    f.write("start\\n")
while not os.path.exists(die):
    time.sleep(0.02)
os.unlink(die)
sys.exit(1)
"""

HOOK_COUNTER = """
import os, sys
paths = [p for p in os.environ.get("SIDECAR_CHANGED_PATHS", "").split("\\n") if p]
with open(sys.argv[1], "a") as f:
    f.write(f"{len(paths)}\\n")
"""

# Exits 3 once the file given (relative to its cwd, PROJECT_DIR) holds bytes: a delta arrived.
WAIT_FOR_FILE_CHILD = """
import os, sys, time
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    if os.path.exists(sys.argv[1]) and os.path.getsize(sys.argv[1]) > 0:
        sys.exit(3)
    time.sleep(0.02)
sys.exit(9)
"""

ENV_DUMP_CHILD = """
import json, os, sys, time
with open(sys.argv[1], "w") as f:
    json.dump(dict(os.environ), f)
while True:
    time.sleep(3600)
"""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _has_line(path: Path, line: str) -> Callable[[], bool]:
    return lambda: line in _lines(path)


# -- signals and exit codes --


async def test_signals_forwarded_and_child_status_returned(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """SIGHUP, SIGUSR1 and SIGUSR2 reach the child; on SIGTERM the child exits 3 and so does
    the sidecar."""
    child = write_script(tmp_path / "child.py", SIGNAL_CHILD)
    rec = tmp_path / "signals.txt"
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(stack, tmp_path, cmd=[PY, str(child), str(rec)]) as sc,
    ):
        await sc.wait(lambda: "ready" in _lines(rec), "child installed its handlers")
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            sc.send_signal(sig)
            await sc.wait(_has_line(rec, sig.name), f"child got {sig.name}")
        sc.send_signal(signal.SIGTERM)
        assert await sc.wait_exit() == 3, sc.tail()
        assert _lines(rec) == ["ready", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTERM"]


async def test_child_ignoring_sigterm_is_killed_after_grace(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A child that ignores SIGTERM is SIGKILLed after SIDECAR_STOP_GRACE; the sidecar exits 137."""
    child = write_script(tmp_path / "child.py", STUBBORN_CHILD)
    rec = tmp_path / "ready.txt"
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(
            stack,
            tmp_path,
            cmd=[PY, str(child), str(rec)],
            env_overrides={"SIDECAR_STOP_GRACE": "0.5"},
        ) as sc,
    ):
        await sc.wait(rec.exists, "child ignoring SIGTERM")
        sc.send_signal(signal.SIGTERM)
        assert await sc.wait_exit(10) == 128 + signal.SIGKILL, sc.tail()


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        pytest.param([PY, "-c", "import sys; sys.exit(7)"], 7, id="child-exits-7"),
        pytest.param(["/nonexistent/e2e-no-such-command"], ExitCode.CHILD_NOT_FOUND, id="missing"),
    ],
)
async def test_exit_code_is_the_childs(
    pg_cluster: PostgresCluster, tmp_path: Path, cmd: list[str], expected: int
) -> None:
    """The sidecar exits with the child's own status, or 127 when the command does not exist."""
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(stack, tmp_path, cmd=cmd, wait_ready=False) as sc,
    ):
        assert await sc.wait_exit(30) == expected, sc.tail()
        assert (sc.project_dir / "index.html").read_bytes() == SAMPLE["index.html"]


# -- PID 1 --


def _can_unshare_pid() -> str | None:
    """Why a PID namespace cannot be used here (None when it can)."""
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    if os.geteuid() != 0:
        return "creating a PID namespace needs root"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return f"unshare --pid failed here: {probe.stderr.decode().strip()[:200]}"
    return None


async def test_pid1_reaps_orphaned_grandchild(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """As PID 1 of its own PID namespace the sidecar reaps a grandchild orphaned by a double
    fork, so no zombie remains, and exits with the child's status."""
    reason = _can_unshare_pid()
    if reason is not None:
        pytest.skip(reason)
    child = write_script(tmp_path / "child.py", ORPHAN_CHILD)
    out = tmp_path / "orphan.json"
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(
            stack,
            tmp_path,
            cmd=[PY, str(child), str(out)],
            wrap=["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
            wait_ready=False,
        ) as sc,
    ):
        assert await sc.wait_exit(30) == 0, sc.tail()
        report = json.loads(out.read_text())
        assert "sidecar" in report["pid1"], report
        assert report["result"] == "reaped", report
        assert sc.events("child.reaper_started"), sc.tail()


# -- start order --


async def test_child_starts_after_hydration_and_buffered_deltas(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """An edit that arrives while the (slowed) hydration runs is buffered and applied before the
    child starts: the child sees the file at its first look."""
    files = {**SAMPLE, "assets/noise.bin": os.urandom(96_000)}
    probe = write_script(tmp_path / "probe.py", STARTUP_PROBE)
    seen = tmp_path / "seen.txt"
    async with Stack(pg_cluster, files) as stack:
        snap = await stack.publish()
        stack.snaps.faults.trickle = 20_000  # ~5 s of hydration: margin for a loaded machine
        async with running_sidecar(
            stack, tmp_path, cmd=[PY, str(probe), str(seen)], snapshot=snap, wait_ready=False
        ) as sc:
            await sc.wait(
                lambda: stack.sidecar_channels() and stack.snaps.requests,
                "subscribed and downloading",
            )
            assert not seen.exists(), "the child started before hydration finished"
            await stack.editor_upsert("late.txt", b"buffered")
            assert not sc.events("snapshot.hydrated"), "the edit came after hydration: too slow"
            await sc.wait(seen.exists, "child started", 30)
            assert seen.read_text() == "late=buffered"
            released = sc.events("sync.buffer_released")
            assert released, sc.tail()
            assert released[0]["events"] >= 1
            stack.snaps.faults.trickle = None
            await sc.wait_ready()


async def test_file_written_by_child_at_start_is_pushed(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A file the child writes the moment it starts (a code generator, `npm install`) is a local
    change and reaches the database, even if the watcher was not armed yet."""
    # A shell writes at once (a Python child would take longer to start than the watcher).
    generator = "printf 'written by the child at start\\n' > generated.txt; exec sleep 3600"
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(
            stack,
            tmp_path,
            cmd=["sh", "-c", generator],
            upstream=True,
            env_overrides={"SIDECAR_LOCAL_CHANGES": "true"},
        ) as sc,
    ):
        await sc.wait(lambda: stack.content("generated.txt"), "generated.txt pushed", 10)
        assert await stack.content("generated.txt") == b"written by the child at start\n"


# -- readiness --


async def test_readiness_follows_realtime_outage(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """/readyz turns 503 with a reason while Realtime is unreachable and 200 again after."""
    async with Stack(pg_cluster) as stack, running_sidecar(stack, tmp_path) as sc:
        stack.rt.refuse_connects(503)
        stack.rt.abort()

        async def unready() -> dict[str, Any] | None:
            code, doc = await sc.readyz()
            return doc if code == 503 else None

        doc = await sc.wait(unready, "/readyz 503")
        assert "not subscribed" in doc["reasons"], doc
        stack.rt.accept_connects()
        await sc.wait_ready(20)


async def test_readiness_follows_child_restart(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """With SIDECAR_RESTART_CHILD a child that exits makes /readyz 503 (child exited) until it
    has been restarted, then 200 again."""
    child = write_script(tmp_path / "child.py", RESTARTING_CHILD)
    starts, die = tmp_path / "starts.txt", tmp_path / "die"
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(
            stack,
            tmp_path,
            cmd=[PY, str(child), str(starts), str(die)],
            env_overrides={"SIDECAR_RESTART_CHILD": "true"},
        ) as sc,
    ):
        die.touch()

        async def unready() -> dict[str, Any] | None:
            code, doc = await sc.readyz()
            return doc if code == 503 else None

        doc = await sc.wait(unready, "/readyz 503 after the child exited", 10)
        assert any("child exited" in r for r in doc["reasons"]), doc
        await sc.wait(lambda: len(_lines(starts)) == 2, "child restarted")
        await sc.wait_ready(10)
        assert await sc.metric("sidecar_child_restarts_total") == 1


# -- hooks --


async def test_on_change_hook_coalesces_a_burst(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Twenty edits matching SIDECAR_ON_CHANGE within a few milliseconds produce exactly one run
    of the hook (debounce 0.3 s after the last change), covering all twenty paths."""
    hook = write_script(tmp_path / "hook.py", HOOK_COUNTER)
    counter = tmp_path / "runs.txt"
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(
            stack,
            tmp_path,
            env_overrides={"SIDECAR_ON_CHANGE": f"*.js={PY} {hook} {counter}"},
        ) as sc,
    ):
        for i in range(20):
            await stack.editor_upsert(f"burst/f{i:02d}.js", f"{i}\n".encode())
        await sc.wait_tree(stack.files)
        await sc.wait_log("hooks.on_change_finished")
        # The one run saw all 20 paths, so nothing was left pending for a second run.
        assert _lines(counter) == ["20"], _lines(counter)
        started = sc.events("hooks.on_change_started")
        assert [e["paths"] for e in started] == [20], started


# -- its own output --


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
async def test_unwritable_stdout_does_not_end_the_sidecar(
    pg_cluster: PostgresCluster, tmp_path: Path, buffered: bool
) -> None:
    """stdout that takes no line (here /dev/full: every write fails with ENOSPC, as a file on a
    full disk does) loses the log lines, not the preview: the child runs, the sidecar keeps
    syncing and exits with the child's status, no traceback. Unbuffered, as the image runs it
    (Dockerfile: PYTHONUNBUFFERED=1), and block-buffered, where the interpreter's last flush
    would fail too (exit 120) had cli.py not dropped what stdout cannot take."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    child = write_script(tmp_path / "child.py", WAIT_FOR_FILE_CHILD)
    async with Stack(pg_cluster) as stack:
        env = base_env(stack, tmp_path / "project", snapshot=await stack.publish())
        env["SIDECAR_HTTP_ADDR"] = "off"
        if buffered:
            env.pop("PYTHONUNBUFFERED", None)
        with Path("/dev/full").open("wb") as full:
            proc = await asyncio.create_subprocess_exec(
                PY,
                "-m",
                "sidecar",
                "run",
                "--",
                PY,
                str(child),
                "late.txt",
                env=env,
                cwd=tmp_path,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=full,
                stderr=asyncio.subprocess.PIPE,
            )
        try:
            target = tmp_path / "project" / "index.html"
            await wait_for(target.exists, 30, "hydrated", proc=proc)
            await stack.editor_upsert("late.txt", b"synced with no log\n")
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 3, err.decode()
        assert "Traceback" not in err.decode(), err.decode()


# -- secrets --


async def test_no_secret_in_output_status_or_metrics(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Neither the token, the keys nor any signed URL's query string appears in a full run's
    logs, /status or /metrics, in a failing run's error, or in the child's environment."""
    child = write_script(tmp_path / "child.py", ENV_DUMP_CHILD)
    child_env = tmp_path / "child-env.json"
    async with Stack(pg_cluster, worker=True) as stack:
        token = stack.token()
        expired = await stack.publish(expires_in=-10)
        async with running_sidecar(
            stack,
            tmp_path,
            cmd=[PY, str(child), str(child_env)],
            snapshot=expired,
            token=token,
            upstream=True,
            env_overrides={"LOG_LEVEL": "debug", "SIDECAR_LOCAL_CHANGES": "true"},
        ) as sc:
            await stack.editor_upsert("src/app.js", b"edited\n")
            await stack.send_db("file:update", {"file_path": "../x", "version": 1})
            await sc.wait_log("watcher.ready")
            (sc.project_dir / "local.txt").write_bytes(b"made in the container\n")
            await sc.wait(lambda: stack.content("local.txt"), "local push")
            await sc.wait_tree(stack.files)
            await sc.wait(child_env.exists, "child wrote its environment")
            status = json.dumps(await sc.status())
            metrics = await sc.metrics()
        full_run = sc.log_text() + status + metrics
        env_seen = json.loads(child_env.read_text())
        answers = [m["snapshot_url"] for m in await stack.messages("snapshot:ready")]

    # A failing run where nobody answers the snapshot request (no worker, and without
    # SUPABASE_URL the request is a broadcast that the channel policy refuses), on a new
    # project, so the earlier snapshot:ready is not replayed to it.
    async with Stack(pg_cluster, worker=False) as quiet:
        failing_token = quiet.token()
        failing_url = await quiet.publish(expires_in=-10)
        async with running_sidecar(
            quiet,
            tmp_path,
            snapshot=failing_url,
            token=failing_token,
            wait_ready=False,
            name="failing",
            env_overrides={"SIDECAR_SNAPSHOT_REQUEST_WAIT": "1.5", "LOG_LEVEL": "debug"},
        ) as failing:
            assert await failing.wait_exit(20) == ExitCode.SNAPSHOT_UNAVAILABLE
        failing_run = failing.log_text()

    signed = [expired[0], failing_url[0], *answers]
    assert len(signed) >= 3, "the self-healing start did not go through snapshot:ready"
    secrets = {"token": token, "failing-token": failing_token, "apikey": stack.rt.anon_key}
    for i, url in enumerate(signed):
        secrets[f"url{i}-token"] = url.partition("token=")[2]
    for name, value in secrets.items():
        assert value
        assert value not in full_run, f"{name} leaked into the full run's output"
        assert value not in failing_run, f"{name} leaked into the failing run's output"
    assert "sidecar: error:" in failing_run
    for key in ("REALTIME_TOKEN", "REALTIME_TOKEN_FILE", "SNAPSHOT_URL"):
        assert key not in env_seen, f"the child's environment has {key}"
    assert token not in json.dumps(env_seen)


# -- configuration errors --


@pytest.mark.parametrize(
    ("extra", "mentions"),
    [
        pytest.param(
            {"SUPABASE_SERVICE_ROLE_KEY": "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.x"},
            "SUPABASE_SERVICE_ROLE_KEY",
            id="service-role-key",
        ),
        pytest.param(
            {"REALTIME_TOKEN": jwt.encode({"role": "service_role"}, "k" * 32, algorithm="HS256")},
            "service_role",
            id="service-role-token",
        ),
        pytest.param({"SIDECAR_WRITE_MODE": "sometimes"}, "SIDECAR_WRITE_MODE", id="bad-value"),
    ],
)
async def test_config_error_exits_78_with_one_line(
    tmp_path: Path, extra: dict[str, str], mentions: str
) -> None:
    """A forbidden or invalid configuration exits 78 with one line on stderr naming the problem
    and never echoing the secret."""
    env = base_env(None, tmp_path / "project", overrides=extra)
    code, out, err = await run_sidecar(["run", "--", "true"], env, tmp_path)
    assert code == ExitCode.CONFIG, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sidecar: error:"), err
    assert mentions in lines[0]
    for value in extra.values():
        if len(value) > 20:
            assert value not in out + err
