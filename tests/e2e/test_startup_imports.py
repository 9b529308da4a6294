"""Start-up imports only what the path in use needs: `sidecar hydrate`, and `sidecar run` without
REALTIME_URL up to the moment it starts the child, never load realtime-py, pydantic or
watchfiles (tens of ms each), nor aiohttp (the health listener is on asyncio streams); with
REALTIME_URL the live stack loads beside the child's start (tests/test_app.py shows the child
does not wait for it).

The real CLI runs in a subprocess under a wrapper that records `sys.modules` when the child is
spawned (the `subprocess.Popen` audit event) and at exit, against the stack on a real PostgreSQL
(tests/e2e/e2e_stack.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import Stack, base_env

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

_WRAPPER = """
import atexit, json, os, runpy, sys
out = os.environ["IMPORTS_OUT"]
def dump(name):
    with open(os.path.join(out, name), "w") as f:
        json.dump(sorted(sys.modules), f)
def hook(event, args):
    if event == "subprocess.Popen" and not os.path.exists(os.path.join(out, "child.json")):
        dump("child.json")
sys.addaudithook(hook)
atexit.register(dump, "exit.json")
sys.argv = ["sidecar", *sys.argv[1:]]
runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
"""

# The live child: exits 0 once the sidecar is ready (subscribed), 1 after 30 s.
_UNTIL_READY = """
import sys, time, urllib.request
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("{url}", timeout=1):
            sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
"""

FORBIDDEN = ("realtime", "pydantic", "watchfiles")


def _loaded(names: list[str], roots: tuple[str, ...]) -> list[str]:
    return sorted({n.split(".")[0] for n in names if n.split(".")[0] in roots})


async def _run(argv: list[str], env: dict[str, str], out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir()
    # In a thread: the stack's servers answer on this event loop.
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _WRAPPER, *argv],
        env={**env, "IMPORTS_OUT": str(out)},
        cwd=out,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_hydrate_and_run_without_realtime_import_only_their_path(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    async with Stack(pg_cluster) as stack:
        env = base_env(stack, tmp_path / "hydrated", overrides={"REALTIME_URL": None})
        done = await _run(["hydrate"], env, tmp_path / "hydrate")
        assert done.returncode == 0, done.stderr
        mods = json.loads((tmp_path / "hydrate" / "exit.json").read_text())
        assert "sidecar.snapshot.writer" in mods  # the wrapper saw the real hydration
        assert _loaded(mods, (*FORBIDDEN, "aiohttp", "prometheus_client")) == []

        env = base_env(stack, tmp_path / "ran", overrides={"REALTIME_URL": None})
        done = await _run(["run", "--", "true"], env, tmp_path / "run")
        assert done.returncode == 0, done.stderr
        mods = json.loads((tmp_path / "run" / "child.json").read_text())
        assert "sidecar.process.child" in mods
        assert "sidecar.health" in mods  # the listener was on (SIDECAR_HTTP_ADDR)
        assert _loaded(mods, (*FORBIDDEN, "aiohttp")) == []

        # With Realtime (and local changes on), the live stack loads in its own thread while
        # the child starts (sidecar/wiring.py LiveLoader), and watchfiles waits until the
        # child runs. The child exits once /readyz says subscribed: the stack was loaded.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            addr = f"127.0.0.1:{s.getsockname()[1]}"
        env = base_env(
            stack,
            tmp_path / "live",
            overrides={"SIDECAR_LOCAL_CHANGES": "true", "SIDECAR_HTTP_ADDR": addr},
        )
        until_ready = _UNTIL_READY.format(url=f"http://{addr}/readyz")
        done = await _run(
            ["run", "--", sys.executable, "-c", until_ready], env, tmp_path / "live-run"
        )
        assert done.returncode == 0, done.stderr
        mods = json.loads((tmp_path / "live-run" / "child.json").read_text())
        assert _loaded(mods, ("watchfiles",)) == []
        mods = json.loads((tmp_path / "live-run" / "exit.json").read_text())
        assert {"sidecar.live.subscription", "sidecar.twoway.localsync"} <= set(mods)
        assert _loaded(mods, ("realtime",)) == ["realtime"]
