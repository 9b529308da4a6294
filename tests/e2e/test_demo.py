"""`sidecar demo`: the README's main-job command runs the whole loop and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.testing.postgres import unavailable_reason

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("database", ["postgres", "in-memory"])
def test_demo_runs_the_whole_loop(tmp_path: Path, database: str) -> None:
    """The demo hydrates, applies an update, a delete and a bulk, pushes a local change and
    stops cleanly, saying so step by step; on PostgreSQL when it is installed, else on the
    in-memory table."""
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
        "7. SIGTERM",
    ):
        assert step in proc.stdout, proc.stdout
    project = tmp_path / "project"
    assert (project / "src/app.js").read_bytes() == b"document.title = 'v2';\n"
    assert not (project / "notes.txt").exists()
    assert (project / "src/a.js").exists()
    assert not (project / "src/util.js").exists()
