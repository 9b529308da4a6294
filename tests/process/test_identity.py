"""The trust boundary's pieces: non-dumpable against a same-uid child, the child's user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

import sidecar
from sidecar.errors import ConfigError
from sidecar.process.identity import resolve_child_user

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


@pytest.fixture
def readable_lib() -> Iterator[Path]:
    """The packages the script imports, copied where uid 65534 can read them: a checkout or a
    virtualenv under a 0700 directory (mktemp -d, a home) is out of its reach."""
    lib = Path(tempfile.mkdtemp(prefix="sidecar-identity-"))
    try:
        for pkg in (sidecar, structlog):
            src = Path(str(pkg.__file__)).parent
            shutil.copytree(src, lib / src.name, ignore=shutil.ignore_patterns("__pycache__"))
        for p in (lib, *lib.rglob("*")):
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield lib
    finally:
        shutil.rmtree(lib)


@pytest.mark.parametrize(("mode", "expected"), [("protect", "denied"), ("control", "open")])
def test_a_same_uid_child_cannot_open_a_non_dumpable_parent(
    mode: str, expected: str, readable_lib: Path
) -> None:
    """The control run (dumpable) shows the probe would see the leak."""
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not system_python.exists():
        pytest.skip("needs root, setpriv and a system python the unprivileged user can run")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(readable_lib)}
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
