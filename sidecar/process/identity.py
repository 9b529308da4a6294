"""The trust boundary between the sidecar and its child: the dev server runs AI-generated code and
thousands of npm packages, so it must not read the sidecar's token or signed URL.

- The sidecar marks itself non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): /proc/<pid>/environ, mem,
  maps... become root-owned and need CAP_SYS_PTRACE, so a same-uid child cannot read them.
- Started as root, it runs the child (and the hooks) as SIDECAR_CHILD_USER (default `app`, the
  image's user), hands it the project tree (chown: the dev server writes node_modules, caches,
  and the agent edits files), keeps its state directory 0700 and the token file 0600 for itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.errors import ConfigError
from sidecar.tree.paths import STATE_DIR_NAME

__all__ = [
    "DEFAULT_CHILD_USER",
    "ChildUser",
    "hand_over",
    "hand_over_paths",
    "make_non_dumpable",
    "protect_private_files",
    "protect_token_file",
    "resolve_child_user",
]

log = structlog.get_logger(component="sidecar")

DEFAULT_CHILD_USER = "app"  # the Dockerfile's user for the dev server
_PR_SET_DUMPABLE = 4


@dataclass(frozen=True, slots=True)
class ChildUser:
    """Who the child runs as: uid, gid and the login's name and home (HOME for npm)."""

    uid: int
    gid: int
    name: str
    home: str

    def env(self) -> dict[str, str]:
        """HOME/USER/LOGNAME for the child (not the sidecar's /root)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def make_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0); False where it is not available (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def resolve_child_user(spec: str | None, *, euid: int | None = None) -> ChildUser | None:
    """The user to run the child as, or None to run it as ourselves.

    Only root can switch: as another user the child runs as that user (non-dumpable still
    protects /proc). `spec` is a name, a uid or uid:gid; unset means DEFAULT_CHILD_USER when it
    exists; `root` / `0` keeps the child as root (documented as unsafe).

    Raises:
        ConfigError: an explicit SIDECAR_CHILD_USER that does not exist.
    """
    euid = os.geteuid() if euid is None else euid
    explicit = spec is not None and spec.strip() != ""
    if euid != 0:
        if explicit:
            log.warning(
                "sidecar.child_user_ignored",
                user=spec,
                reason="not started as root: the child runs as the sidecar's own user",
            )
        return None
    name = spec.strip() if spec is not None and explicit else DEFAULT_CHILD_USER
    uid_s, _, gid_s = name.partition(":")
    try:
        pw = pwd.getpwuid(int(uid_s)) if uid_s.isdigit() else pwd.getpwnam(uid_s)
    except KeyError:
        if uid_s.isdigit():  # a bare uid without a passwd entry (common in images)
            uid = int(uid_s)
            gid = int(gid_s) if gid_s.isdigit() else uid
            return None if uid == 0 else ChildUser(uid, gid, uid_s, "/tmp")
        if explicit:
            raise ConfigError(f"SIDECAR_CHILD_USER {name!r}: no such user") from None
        log.warning(
            "sidecar.child_user_missing",
            user=DEFAULT_CHILD_USER,
            reason="running as root without a user to run the child as; set SIDECAR_CHILD_USER",
        )
        return None
    if pw.pw_uid == 0:
        return None
    gid = int(gid_s) if gid_s.isdigit() else pw.pw_gid
    return ChildUser(pw.pw_uid, gid, pw.pw_name, pw.pw_dir or "/tmp")


def hand_over(project_dir: Path, user: ChildUser) -> int:
    """chown the project tree (not the state directory) to the child's user; the count changed.

    Symlinks are changed themselves (lchown), never followed.
    """
    changed = _chown(project_dir, user)
    for dirpath, dirnames, filenames in os.walk(project_dir):
        if dirpath == str(project_dir):
            dirnames[:] = [d for d in dirnames if d != STATE_DIR_NAME]
        for name in (*dirnames, *filenames):
            changed += _chown(Path(dirpath, name), user)
    return changed


def hand_over_paths(project_dir: Path, user: ChildUser, paths: list[str]) -> None:
    """chown the given project-relative paths and their parent directories to the child."""
    seen: set[str] = set()
    for rel in paths:
        while rel and rel not in seen:
            seen.add(rel)
            _chown(project_dir / rel, user)
            rel = rel.rpartition("/")[0]


def _chown(path: Path, user: ChildUser) -> int:
    try:
        st = path.lstat()
        if st.st_uid == user.uid and st.st_gid == user.gid:
            return 0
        os.lchown(path, user.uid, user.gid)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    return 1


def protect_private_files(state_dir: Path, token_file: Path | None) -> None:
    """Keep the state directory and the token file to ourselves (0700 / 0600, our owner).

    A token file on a read-only mount (a projected secret) cannot be changed: when the child
    could read it, say so loudly; the orchestrator must mount it 0600 for the sidecar's user.
    """
    with contextlib.suppress(OSError):
        state_dir.chmod(0o700)
    if token_file is not None:
        protect_token_file(token_file)


def protect_token_file(token_file: Path) -> None:
    """0600 and our own: at start and after every rotation (a rotated file comes with the
    writer's mode; the orchestrator should write it 0600 in the first place)."""
    try:
        st = token_file.stat()
        if st.st_uid != os.geteuid():
            os.chown(token_file, os.geteuid(), os.getegid())
        if stat.S_IMODE(st.st_mode) & 0o077:
            token_file.chmod(0o600)
    except OSError as exc:
        log.warning(
            "sidecar.token_file_exposed",
            path=str(token_file),
            reason=f"cannot make it private ({exc.strerror}); mount it 0600 for the sidecar",
        )
