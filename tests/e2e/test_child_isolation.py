"""End to end, the trust boundary: started as root, `sidecar run` runs its child as
SIDECAR_CHILD_USER, is non-dumpable and keeps the token file to itself. The child (an
unprivileged user) cannot open /proc/$PPID/environ, /proc/$PPID/mem or the token file, and its
own environment has neither the token nor the signed URL; it can still write the project."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import Stack, atomic_write, running_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

# Plain sh (the unprivileged user cannot run the test's interpreter under /root): report what
# it could open, what its environment holds, whether it can write the project, then stay up.
_CHILD = r"""
P=PROBE  # the log repeats this script: its lines must not match the report
for f in /proc/$PPID/environ /proc/$PPID/mem "$PROBE_TOKEN_FILE"; do
  if (exec 3< "$f") 2>/dev/null; then echo "$P opened $f"; else echo "$P denied $f"; fi
done
echo "$P uid=$(id -u) home=$HOME"
env | grep -E 'REALTIME_TOKEN|SNAPSHOT_URL|token=' >/dev/null && echo "$P env-leak" || echo "$P env-clean"
echo hi > child-wrote.txt && echo "$P wrote" || echo "$P cannot-write"
echo "// edited" >> src/app.js && echo "$P edited" || echo "$P cannot-edit"
echo "$P done"
exec sleep 600
"""


async def test_unprivileged_child_cannot_read_the_token(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the sidecar switches the child to another user")
    nobody = pwd.getpwnam("nobody")
    tmp_path.chmod(0o755)  # the child's cwd is below it
    token_file = tmp_path / "secrets" / "token"
    async with Stack(pg_cluster) as stack:
        token = stack.token()
        async with running_sidecar(
            stack,
            tmp_path,
            cmd=["sh", "-c", _CHILD],
            token=token,
            token_file=token_file,
            env_overrides={"SIDECAR_CHILD_USER": "nobody", "PROBE_TOKEN_FILE": str(token_file)},
        ) as sc:
            await sc.wait(lambda: "PROBE done" in sc.stdout(), "the child's report")
            out = [ln for ln in sc.stdout().splitlines() if ln.startswith("PROBE")]
            pid = sc.sidecar_pid()
            assert f"PROBE denied /proc/{pid}/environ" in out, out
            assert f"PROBE denied /proc/{pid}/mem" in out, out
            assert f"PROBE denied {token_file}" in out, out
            assert f"PROBE uid={nobody.pw_uid} home={nobody.pw_dir}" in out, out
            assert "PROBE env-clean" in out, out
            assert "PROBE wrote" in out, out
            assert "PROBE edited" in out, out
            assert token not in sc.stdout()
            assert (token_file.stat().st_mode & 0o077) == 0
            assert (sc.project_dir / "src" / "app.js").stat().st_uid == nobody.pw_uid
            # Changes from the database land owned by the child's user too.
            await stack.editor_upsert("lib/new.js", b"new\n")
            await sc.wait_file("lib/new.js", b"new\n")
            assert (sc.project_dir / "lib").stat().st_uid == nobody.pw_uid
            assert (sc.project_dir / "lib" / "new.js").stat().st_uid == nobody.pw_uid
            assert (sc.project_dir / ".sidecar").stat().st_mode & 0o077 == 0
            # A rotated token file (written 0644 by the orchestrator here) is made private too.
            atomic_write(token_file, stack.token(session_id="rotated"))
            await sc.wait(
                lambda: token_file.stat().st_mode & 0o077 == 0, "rotated token file made private"
            )
