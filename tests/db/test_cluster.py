"""The throwaway cluster itself: no cluster outlives the process that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.testing.postgres import PostgresCluster

pytestmark = pytest.mark.pg

OWNER = """
import sys, time
from sidecar.testing.postgres import start_cluster
c = start_cluster(schema=False)
print(c.pid, c.root, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


def test_a_killed_owner_does_not_leak_its_cluster(pg_cluster: PostgresCluster) -> None:
    """SIGKILL (or `timeout`'s SIGTERM) skips atexit: the watchdog stops the postmaster and
    removes the directory."""
    with subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            pid_s, root = owner.stdout.readline().split()
            pid = int(pid_s)
            assert alive(pid)
        finally:
            owner.kill()
    deadline = time.monotonic() + 40
    while alive(pid) or Path(root).exists():
        assert time.monotonic() < deadline, f"postmaster {pid} or {root} outlived its owner"
        time.sleep(0.1)


def test_stop_is_by_pid_and_removes_everything(pg_cluster: PostgresCluster) -> None:
    from sidecar.testing.postgres import start_cluster

    cluster = start_cluster(schema=False)
    pid, root = cluster.pid, cluster.root
    cluster.stop()
    assert not alive(pid)
    assert not root.exists()
    cluster.stop()  # idempotent
