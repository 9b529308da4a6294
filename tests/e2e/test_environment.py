"""End to end, environment faults: `sidecar hydrate` (and `sidecar run` before it starts) on a
full disk, under a read-only parent, with a read-only state directory, on a filesystem that
turned read-only, with a state directory on another filesystem, and without permission. Each
exits with its documented code and one line naming the path and the cause, no traceback, and
PROJECT_DIR is left as it was; `sidecar run` on a disk that fills up or turns read-only keeps
its child and converges. The project lives in a real PostgreSQL and every snapshot is made by
the real publish path (tests/e2e/e2e_stack.py)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import ExitCode
from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import SAMPLE, Stack, base_env, read_tree, run_sidecar, running_sidecar
from tests.fsfaults import fill, readonly_bind, remount, tmpfs

pytestmark = [pytest.mark.e2e, pytest.mark.pg]


def _one_error_line(out: str, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("sidecar: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in out + err, out + err
    assert "internal error" not in err
    return lines[0]


async def _hydrate(stack: Stack, project: Path, tmp: Path, **over: str | None) -> tuple[int, str]:
    """`sidecar hydrate` of a snapshot of the database as it is now."""
    env = base_env(stack, project, snapshot=await stack.publish(), overrides=over)
    code, out, err = await run_sidecar(["hydrate"], env, tmp)
    if code == 0:
        return code, ""
    return code, _one_error_line(out, err)


async def test_full_disk_during_hydrate_exits_no_space_and_keeps_the_old_tree(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A snapshot larger than the free space: exit NO_SPACE naming the file being written, the
    previously hydrated tree unchanged, no staging left; after freeing space it hydrates."""
    async with Stack(pg_cluster) as stack:
        with tmpfs(tmp_path / "disk", "1m") as disk:
            project = disk / "project"
            code, line = await _hydrate(stack, project, tmp_path)
            assert code == 0, line
            before = read_tree(project)
            ballast = fill(disk, leave=64 * 1024)
            await stack.editor_upsert("big.bin", os.urandom(300 * 1024))
            code, line = await _hydrate(stack, project, tmp_path)
            assert code == ExitCode.NO_SPACE, line
            assert "no space left on device" in line
            assert str(disk) in line, line
            assert read_tree(project) == before
            assert not list((project / ".sidecar").glob("staging-*"))
            ballast.unlink()
            code, line = await _hydrate(stack, project, tmp_path)
            assert code == 0, line
            assert read_tree(project) == await stack.files()


async def test_read_only_parent_and_state_dir(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """PROJECT_DIR under a read-only parent, and a read-only SIDECAR_STATE_DIR (missing or
    existing): exit READ_ONLY naming the directory; nothing is created."""
    async with Stack(pg_cluster, SAMPLE) as stack:
        ro = tmp_path / "ro"
        (ro / "state").mkdir(parents=True)
        project = tmp_path / "project"
        with readonly_bind(ro):
            code, line = await _hydrate(stack, ro / "project", tmp_path)
            assert code == ExitCode.READ_ONLY, line
            assert str(ro / "project") in line
            assert "read-only" in line
            for state in (ro / "state", ro / "missing"):
                code, line = await _hydrate(stack, project, tmp_path, SIDECAR_STATE_DIR=str(state))
                assert code == ExitCode.READ_ONLY, line
                assert str(state) in line
                assert "read-only" in line
                assert read_tree(project) == {}
        assert sorted(os.listdir(ro)) == ["state"]


async def test_filesystem_turned_read_only(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """A hydrated project whose filesystem was remounted read-only: a new snapshot exits
    READ_ONLY naming PROJECT_DIR, the tree as it was."""
    async with Stack(pg_cluster) as stack:
        with tmpfs(tmp_path / "disk", "4m") as disk:
            project = disk / "project"
            assert (await _hydrate(stack, project, tmp_path))[0] == 0
            before = read_tree(project)
            await stack.editor_upsert("src/app.js", b"export const v = 2;\n")
            remount(disk, "remount,ro")
            code, line = await _hydrate(stack, project, tmp_path)
            assert code == ExitCode.READ_ONLY, line
            assert str(project) in line
            assert read_tree(project) == before
            remount(disk, "remount,rw")


async def test_state_dir_on_another_filesystem_is_refused_up_front(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """SIDECAR_STATE_DIR on a second tmpfs: exit CONFIG before any download, naming both
    directories and the fix; PROJECT_DIR stays empty (was: EXDEV mid-publish, exit 70)."""
    async with Stack(pg_cluster) as stack:
        with tmpfs(tmp_path / "other", "4m") as other:
            project = tmp_path / "project"
            code, line = await _hydrate(
                stack, project, tmp_path, SIDECAR_STATE_DIR=str(other / "state")
            )
            assert code == ExitCode.CONFIG, line
            assert str(other / "state") in line
            assert str(project) in line
            assert "another filesystem" in line
            assert "leave it unset" in line
            assert read_tree(project) == {}
            # `sidecar run` checks the same before it starts anything.
            env = base_env(stack, project, overrides={"SIDECAR_STATE_DIR": str(other / "s")})
            code, out, err = await run_sidecar(["run", "--", "true"], env, tmp_path)
            assert code == ExitCode.CONFIG, out + err
            assert "another filesystem" in _one_error_line(out, err)
            assert read_tree(project) == {}


async def test_permission_denied(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """Without CAP_DAC_OVERRIDE (root in most containers has it; a non-root image does not),
    PROJECT_DIR in a directory owned by someone else exits PERMISSION_DENIED naming it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    parent = tmp_path / "not-mine"
    parent.mkdir(mode=0o755)
    os.chown(parent, 65534, 65534)
    caps = "-dac_override,-dac_read_search"
    wrap = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    async with Stack(pg_cluster) as stack:
        env = base_env(stack, parent / "project")
        code, out, err = await run_sidecar(["hydrate"], env, tmp_path, wrap=wrap)
        assert code == ExitCode.PERMISSION_DENIED, out + err
        line = _one_error_line(out, err)
        assert str(parent / "project") in line
        assert "permission denied" in line
        assert os.listdir(parent) == []


async def test_full_disk_in_run_keeps_the_child_and_converges_when_space_is_back(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """`sidecar run` with PROJECT_DIR on a full tmpfs: deltas and then a resync fail with
    ENOSPC; the child keeps running, the failure is visible (log, metric, /status, /readyz 503
    with the reason), the failed event's seq is not counted as applied, and once space is freed
    the tree converges within seconds (not after the snapshot:request timeout). The resync is
    asked of the database (request_snapshot) and answered by the worker."""
    async with Stack(pg_cluster, worker=True) as stack:
        with tmpfs(tmp_path / "disk", "4m") as disk:
            env = {
                "SIDECAR_SNAPSHOT_REQUEST_WAIT": "60",
                "SIDECAR_STATE_DIR": None,
                "SUPABASE_URL": stack.rpc.url,
            }
            async with running_sidecar(
                stack, disk, cmd=["sleep", "600"], env_overrides=env, out_dir=tmp_path
            ) as sc:

                async def child_pid() -> int | None:
                    pid: int | None = (await sc.status())["child"]["pid"]
                    return pid

                child = await sc.wait(child_pid, "the child is running")
                ballast = fill(disk)
                # Deltas on a full disk.
                await stack.editor_upsert("src/big.js", os.urandom(40 * 1024))
                await stack.editor_upsert("src/next.js", b"next\n")
                await sc.wait_log("sync.environment_fault")

                async def unready() -> dict[str, Any] | None:
                    code, doc = await sc.readyz()
                    return doc if code == 503 else None

                doc = await sc.wait(unready, "/readyz 503 with the fault")
                assert any("no space left" in r for r in doc["reasons"]), doc
                status = await sc.status()
                assert status["fault"], status
                assert status["last_seq"] < await stack.seq(), status
                assert status["child"]["pid"] == child
                assert await sc.metric("sidecar_events_total", outcome="environment_fault") >= 1
                # Held behind the stalled event, not mistaken for a gap (no snapshot asked for).
                await stack.editor_upsert("src/third.js", b"third\n")
                await sc.wait(
                    lambda: sc.metric("sidecar_events_total", outcome="environment_fault"),
                    "a retry",
                )
                ballast.unlink()
                freed = time.monotonic()
                await sc.wait_tree(stack.files, timeout=15)
                assert not sc.events("sync.gap_detected")
                assert await stack.snapshot_requests() == []
                assert time.monotonic() - freed < 10
                await sc.wait_ready(10)
                assert (await sc.status())["last_seq"] == await stack.seq()

                # A resync (gap beyond replay and the pruned event log) on a full disk.
                ballast = fill(disk)
                rt = stack.rt
                rt.knobs.replication_up = False
                for i in range(30):
                    await stack.editor_upsert(f"gap/f{i:02d}.txt", os.urandom(2048))
                assert await stack.prune_event_log() >= 29
                rt.knobs.replication_up = None
                await stack.editor_upsert("gap/last.txt", b"seen live\n")
                await sc.wait_log(
                    "sync.environment_fault", where=lambda d: d.get("event_name") == "resync"
                )
                assert sc.proc.returncode is None
                assert (await sc.status())["child"]["pid"] == child
                ballast.unlink()
                freed = time.monotonic()
                await sc.wait_tree(stack.files, timeout=30)
                assert time.monotonic() - freed < 15, "converged by the retry, not the timeout"
                await sc.wait_ready(10)
                assert (await sc.status())["child"]["pid"] == child
            assert not list((disk / "sidecar-project").rglob("*.sidecar-tmp-*"))


async def test_filesystem_turning_read_only_in_run_is_retried(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """PROJECT_DIR turned read-only under a running sidecar (a read-only bind mount over it:
    a remount is refused while the state database is open): a delta stalls (read_only fault,
    /readyz 503 with the reason), the child keeps running, and once it is writable again the
    tree converges within seconds."""
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(stack, tmp_path, cmd=["sleep", "600"]) as sc,
    ):
        with readonly_bind(sc.project_dir):
            await stack.editor_upsert("src/app.js", b"v2\n")
            fault = await sc.wait_log("sync.environment_fault")
            assert fault["kind"] == "read_only", fault
            code, doc = await sc.readyz()
            assert code == 503, doc
            assert any("read-only" in r for r in doc["reasons"]), doc
        freed = time.monotonic()
        await sc.wait_tree(stack.files, timeout=15)
        assert time.monotonic() - freed < 10
        await sc.wait_ready(10)
        assert sc.proc.returncode is None
