"""A throwaway PostgreSQL 15 cluster with the Supabase test shim and the sidecar migration.

`start_cluster()` runs `initdb` and `pg_ctl start` from the Debian binaries
(/usr/lib/postgresql/15/bin, or SIDECAR_PG_BINDIR) in a fresh temporary directory, listening on
127.0.0.1 only, then applies sidecar/testing/sql/supabase_shim.sql as the bootstrap superuser
`supabase_admin` and the migration (sidecar/sql/) as `postgres`, the way a Supabase project is
laid out. `initdb` refuses to run as root, so as root every server command runs as the OS user
`postgres` (runuser). `PostgresCluster.stop()` stops the postmaster by its pid (SIGINT: fast
shutdown) and removes the directory. Used by tests (tests/db/conftest.py), the demo and the
compose run (`python -m sidecar.testing.postgres` prints the connection URLs and runs until
SIGTERM).

Authentication is `trust` on loopback: any role connects without a password, e.g.
`authenticator` for the PostgREST-style gateway (sidecar/testing/gateway.py).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

from sidecar.errors import SidecarError
from sidecar.sql import migration_sql

__all__ = [
    "DEFAULT_BINDIR",
    "PostgresCluster",
    "PostgresUnavailableError",
    "find_bindir",
    "main",
    "shim_sql",
    "start_cluster",
    "unavailable_reason",
]

DEFAULT_BINDIR = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "supabase_admin"  # the bootstrap superuser; `postgres` is demoted as on Supabase
_OS_USER = "postgres"  # who runs the server when we are root


class PostgresUnavailableError(SidecarError):
    """Raised when no PostgreSQL server binaries are installed or the cluster cannot start."""


def find_bindir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres: SIDECAR_PG_BINDIR, else Debian's 15."""
    env = os.environ.get("SIDECAR_PG_BINDIR")
    candidate = Path(env) if env else DEFAULT_BINDIR
    return candidate if (candidate / "initdb").is_file() else None


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (one line), or None when it can."""
    if find_bindir() is None:
        return (
            "PostgreSQL server binaries not found in "
            f"{os.environ.get('SIDECAR_PG_BINDIR') or DEFAULT_BINDIR} (install the Debian "
            "package postgresql-15, or set SIDECAR_PG_BINDIR)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_OS_USER)
        except KeyError:
            return f"running as root and there is no OS user {_OS_USER!r} to run initdb as"
        if _runuser() is None:
            return "running as root and runuser(1) is not installed"
    return None


def shim_sql() -> str:
    """The test-only Supabase shim (roles, auth.*, realtime.messages/send/topic)."""
    return (
        resources.files("sidecar.testing")
        .joinpath("sql", "supabase_shim.sql")
        .read_text(encoding="utf-8")
    )


@dataclass
class PostgresCluster:
    """A running throwaway cluster; a (sync) context manager that stops it."""

    root: Path
    bindir: Path
    port: int
    pid: int
    host: str = "127.0.0.1"
    _stopped: bool = field(default=False, repr=False)
    _watchdog: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, user: str = "postgres", dbname: str = "postgres") -> str:
        """A libpq connection string for user (trust auth: no password)."""
        return f"host={self.host} port={self.port} user={user} dbname={dbname}"

    def url(self, user: str = "postgres", dbname: str = "postgres") -> str:
        """The same as a postgresql:// URL."""
        return f"postgresql://{user}@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str, *, user: str = SUPERUSER) -> None:
        """Run a script (several statements, no parameters) in one transaction as user."""
        import psycopg

        with psycopg.connect(self.dsn(user)) as conn:
            conn.execute(sql.encode())  # bytes: no client-side placeholder parsing

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the postmaster by its pid (fast shutdown) and remove the directory; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if _signal(self.pid, signal.SIGINT):
            deadline = time.monotonic() + timeout
            while _alive(self.pid):
                if time.monotonic() > deadline:
                    _signal(self.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)  # it exits once the postmaster is gone

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_cluster(
    *,
    base_dir: Path | None = None,
    port: int = 0,
    schema: bool = True,
    listen: str = "127.0.0.1",
) -> PostgresCluster:
    """Start a cluster in a new directory under base_dir (default: the system temp dir).

    base_dir must be traversable by the OS user `postgres` when running as root. With
    `schema` the shim and the migration are applied. The cluster is also stopped at
    interpreter exit if the caller forgets. `listen` other than loopback (the compose run's
    database container) also trusts clients on the server's own subnets (`samenet`).

    Raises:
        PostgresUnavailableError: no binaries, or initdb / start / the schema failed (the
            message carries the server log's tail).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise PostgresUnavailableError(reason)
    bindir = find_bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="sidecar-pg-", dir=base_dir))
    as_root = os.geteuid() == 0
    if as_root:
        entry = pwd.getpwnam(_OS_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    try:
        _run(
            as_root,
            bindir / "initdb",
            "-D",
            str(root / "data"),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        )
        if listen != "127.0.0.1":
            with (root / "data" / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet trust\n")
        cluster = _start(as_root, bindir, root, port, listen)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    atexit.register(cluster.stop)
    cluster._watchdog = _watchdog(cluster)
    if schema:
        try:
            cluster.execute(shim_sql(), user=SUPERUSER)
            cluster.execute(migration_sql(), user="postgres")
        except Exception as exc:
            cluster.stop()
            raise PostgresUnavailableError(f"applying the schema failed: {exc}") from exc
    return cluster


def _start(as_root: bool, bindir: Path, root: Path, port: int, listen: str) -> PostgresCluster:
    # A port picked free can be taken before the server binds it: try a few.
    attempts = 1 if port else 4
    last = ""
    for _ in range(attempts):
        chosen = port or _free_port()
        options = " ".join(
            [
                f"-c listen_addresses={listen}",
                f"-c port={chosen}",
                f"-c unix_socket_directories={root}",
                "-c fsync=off",  # speed; keep synchronous_commit on (see the reference notes)
                "-c full_page_writes=off",
                "-c timezone=UTC",
                "-c max_connections=200",
                "-c log_min_messages=warning",
            ]
        )
        try:
            _run(
                as_root,
                bindir / "pg_ctl",
                "-D",
                str(root / "data"),
                "-l",
                str(root / "postgres.log"),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            )
        except PostgresUnavailableError as exc:
            last = f"{exc}; log: {_tail(root / 'postgres.log')}"
            continue
        pid = int((root / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
        return PostgresCluster(root=root, bindir=bindir, port=chosen, pid=pid)
    raise PostgresUnavailableError(f"PostgreSQL did not start in {root}: {last}")


# A process of its own that stops the postmaster when we die without stopping it (SIGKILL, or a
# SIGTERM from `timeout`: atexit handlers do not run then), so no cluster outlives its owner.
_WATCHDOG = """
import os, shutil, signal, sys, time
owner, pid, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def alive(p):
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
while os.getppid() == owner and alive(pid):
    time.sleep(0.5)
if alive(pid):
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
"""


def _watchdog(cluster: PostgresCluster) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(cluster.pid), str(cluster.root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to our process group is ours to handle, not its
        cwd="/",
    )


def _run(as_root: bool, exe: Path, *args: str) -> None:
    cmd = [str(exe), *args]
    if as_root:
        cmd = [_runuser() or "runuser", "-u", _OS_USER, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/")
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().splitlines()
        raise PostgresUnavailableError(
            f"{exe.name} exited {proc.returncode}: {out[-1] if out else 'no output'}"
        )


def _runuser() -> str | None:
    # util-linux installs it in /usr/sbin, which a minimal PATH (as in tests) may leave out.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("runuser", path=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our child only when not daemonised) counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False
    return True


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])


async def _serve(args: argparse.Namespace) -> None:
    from sidecar.testing._server import until_terminated

    cluster = await asyncio.to_thread(start_cluster, port=args.port, listen=args.listen)
    try:
        sys.stdout.write(
            json.dumps(
                {
                    "port": cluster.port,
                    "postgres_url": cluster.url("postgres"),
                    "superuser_url": cluster.url(SUPERUSER),
                    "authenticator_url": cluster.url("authenticator"),
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        await until_terminated()
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m sidecar.testing.postgres [--port P]`: run a cluster until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(
        prog="sidecar.testing.postgres", description=__doc__.splitlines()[0]
    )
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--listen", default="127.0.0.1", help="listen_addresses (not loopback: trusts samenet)"
    )
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
