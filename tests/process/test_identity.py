"""The trust boundary's pieces: non-dumpable against a same-uid child, the child's user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.process.identity import resolve_child_user

_ROOT = Path(__file__).resolve().parents[2]

# Runs as an unprivileged user (no CAP_SYS_PTRACE): optionally non-dumpable, then a child of the
# same uid tries to open its parent's environ and mem.
_SCRIPT = """
import subprocess, sys
from sidecar.process.identity import make_non_dumpable
if sys.argv[1] == "protect":
    assert make_non_dumpable()
probe = 'for f in environ mem; do (exec 3< /proc/$PPID/$f) 2>/dev/null && echo open || echo denied; done'
print(subprocess.run(["sh", "-c", probe], capture_output=True, text=True).stdout.split())
"""


@pytest.mark.parametrize(("mode", "expected"), [("protect", "denied"), ("control", "open")])
def test_a_same_uid_child_cannot_open_a_non_dumpable_parent(mode: str, expected: str) -> None:
    """The control run (dumpable) shows the probe would see the leak."""
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not system_python.exists():
        pytest.skip("needs root, setpriv and a system python the unprivileged user can run")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{_ROOT}:{sysconfig.get_paths()['purelib']}",
    }
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            str(system_python),
            "-c",
            _SCRIPT,
            mode,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([expected, expected])


def test_resolve_child_user() -> None:
    """Root switches to the named user (or uid[:gid]); others run the child as themselves; an
    explicit unknown name is a configuration error; root/0 keeps root."""
    assert resolve_child_user("nobody", euid=1000) is None
    user = resolve_child_user("nobody", euid=0)
    assert user is not None
    assert user.name == "nobody"
    assert user.uid == 65534
    assert user.env()["USER"] == "nobody"
    numeric = resolve_child_user("4242:4343", euid=0)
    assert numeric is not None
    assert (numeric.uid, numeric.gid) == (4242, 4343)
    assert resolve_child_user("root", euid=0) is None
    assert resolve_child_user("0", euid=0) is None
    with pytest.raises(ConfigError, match="no such user"):
        resolve_child_user("no-such-user-here", euid=0)
