"""`sidecar demo`: the README's main-job command runs the whole loop and exits 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.testing.postgres import unavailable_reason

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("database", ["postgres", "in-memory"])
def test_demo_runs_the_whole_loop(tmp_path: Path, database: str) -> None:
    """The demo hydrates, applies an update, a delete and a bulk, pushes a local change and
    stops cleanly, saying so step by step; on PostgreSQL when it is installed (the orchestrator's
    chain: publish, mint, worker), else on the in-memory table, saying why."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if database == "postgres":
        reason = unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    else:
        env["SIDECAR_PG_BINDIR"] = str(tmp_path / "no-postgres")
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    label = "database: PostgreSQL 15" if database == "postgres" else "database: an in-memory table"
    assert label in proc.stdout, proc.stdout
    for step in (
        "1. hydrated",
        "2. editor saved",
        "3. editor deleted",
        "4. a multi-file save",
        "5. a file written inside the container",
        "SIGTERM: sidecar stopped the dev server",
    ):
        assert step in proc.stdout, proc.stdout
    if database == "postgres":
        assert_real_chain(proc.stdout, tmp_path)
    else:
        assert "no PostgreSQL: PostgreSQL server binaries not found" in proc.stdout
        assert "orchestrator$" not in proc.stdout
    project = tmp_path / "project"
    assert (project / "src/app.js").read_bytes() == b"document.title = 'v2';\n"
    assert not (project / "notes.txt").exists()
    assert (project / "src/a.js").exists()
    assert not (project / "src/util.js").exists()


def assert_real_chain(stdout: str, workdir: Path) -> None:
    """The orchestrator's commands ran and gave the container its whole environment; the
    second container's snapshot request was answered by the worker."""
    for command in (
        "orchestrator$ sidecar snapshot worker",
        "orchestrator$ sidecar snapshot publish --project",
        "orchestrator$ sidecar token mint --project",
    ):
        assert command in stdout, stdout
    assert re.search(r"SNAPSHOT_URL=http://127\.0\.0\.1:\d+/storage/v1/object/sign/", stdout)
    assert re.search(r"SNAPSHOT_SHA256=[0-9a-f]{64}", stdout)
    # Nothing secret on the screen: no signed-URL query, no whole token.
    assert "?token=" not in stdout
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", stdout)
    # The container got exactly what an orchestrator passes, and no service key.
    [listed] = re.findall(r"container\$ sidecar run .*\(environment: ([^)]*)\)", stdout)
    assert set(listed.split(", ")) == {
        "LOG_FORMAT",
        "PROJECT_DIR",
        "PROJECT_ID",
        "REALTIME_APIKEY",
        "REALTIME_TOKEN",
        "REALTIME_URL",
        "SESSION_ID",
        "SIDECAR_HTTP_ADDR",
        "SIDECAR_UPSTREAM",
        "SNAPSHOT_SHA256",
        "SNAPSHOT_URL",
        "SUPABASE_URL",
    }
    assert "7. a second container started with an expired signed URL" in stdout, stdout
    second = (workdir / "sidecar-b.log").read_text()
    assert '"event": "sync.snapshot_requested"' in second
    assert '"event": "sync.snapshot_ready_received"' in second
    answers = [
        json.loads(line)
        for line in (workdir / "worker.log").read_text().splitlines()
        if '"worker.answered"' in line
    ]
    assert answers, "the worker answered no request"
    assert (workdir / "project-b/src/generated.js").read_bytes() == (
        b"// written inside the container\n"
    )
