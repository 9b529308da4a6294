"""End to end, `sidecar hydrate` (init-container mode) as a subprocess: exit codes with a
one-line reason for bad input, and PROJECT_DIR left as it was. The snapshots are the real
publish path's, of a project in a real PostgreSQL (tests/e2e/e2e_stack.py)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from sidecar.errors import ExitCode
from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import Stack, base_env, read_tree, run_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.pg]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("sidecar: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


async def test_hydrate_exit_codes_leave_the_project_as_it_was(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A corrupt snapshot exits 65, a quota breach 73 and an expired URL 69 (at once), each with
    one line naming the problem and without the URL's token; the hydrated tree stays intact."""
    async with Stack(pg_cluster) as stack:
        project = tmp_path / "project"
        url, sha = await stack.publish()
        env = base_env(stack, project, snapshot=(url, sha))
        code, _out, err = await run_sidecar(["hydrate"], env, tmp_path)
        assert code == 0, err
        before = read_tree(project)
        assert before == await stack.files()

        await stack.editor_upsert("src/new.js", b"x" * 5000)
        url2, _sha2 = await stack.publish()
        token = url2.partition("token=")[2]
        cases = [
            ({"SNAPSHOT_URL": url2, "SNAPSHOT_SHA256": None}, "corrupt", ExitCode.SNAPSHOT_INVALID),
            (
                {"SNAPSHOT_URL": url2, "SNAPSHOT_SHA256": None, "SIDECAR_MAX_BYTES": "1kB"},
                None,
                ExitCode.QUOTA_EXCEEDED,
            ),
            (
                {"SNAPSHOT_URL": (await stack.publish(expires_in=-10))[0], "SNAPSHOT_SHA256": None},
                None,
                ExitCode.SNAPSHOT_UNAVAILABLE,
            ),
        ]
        for overrides, fault, expected in cases:
            stack.snaps.faults.corrupt_at = 600 if fault == "corrupt" else None
            env = base_env(stack, project, overrides=overrides)
            started = time.monotonic()
            code, out, err = await run_sidecar(["hydrate"], env, tmp_path)
            assert code == expected, (overrides, err)
            line = _one_error_line(err)
            assert token not in line
            assert token not in out
            assert read_tree(project) == before, overrides
            assert not list((project / ".sidecar").glob("staging-*"))
            if expected == ExitCode.SNAPSHOT_UNAVAILABLE:
                assert time.monotonic() - started < 5, "an expired URL is not retried"


_WITH_EXIT_HANDLER = """
import atexit, runpy, sys
atexit.register(lambda: print("exit handler ran"))  # buffered: written only if flushed after
sys.argv = ["sidecar", "hydrate"]
runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
"""


async def test_hydrate_ends_fast_but_runs_exit_handlers_and_keeps_its_output(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """`sidecar hydrate` skips the interpreter's teardown, yet atexit handlers still run, their
    buffered output and the last log line are written, and the recorded state is complete (a
    second run finds the tree in place)."""
    async with Stack(pg_cluster) as stack:
        project = tmp_path / "project"
        # Block-buffered stdout (as under a process manager), where an unflushed line is lost.
        env = base_env(stack, project, overrides={"PYTHONUNBUFFERED": None})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WITH_EXIT_HANDLER,
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        *logs, last = out.decode().splitlines()
        assert last == "exit handler ran"
        assert json.loads(logs[-1])["event"] == "sidecar.hydrated"
        assert read_tree(project) == await stack.files()

        code, out2, err2 = await run_sidecar(["hydrate"], env, tmp_path)
        assert code == 0, err2
        hydrated = [json.loads(ln) for ln in out2.splitlines() if '"snapshot.hydrated"' in ln]
        assert [h["outcome"] for h in hydrated] == ["in_place"]
