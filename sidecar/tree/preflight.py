"""Checks of PROJECT_DIR and the state directory before anything is written (hydrate and run).

A fault of the environment found here is reported as one line naming the path and the cause
(sidecar/errors.py: NO_SPACE, READ_ONLY, PERMISSION_DENIED, CONFIG for a state directory on
another filesystem) instead of failing half-way through a hydration.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sidecar.errors import (
    ConfigError,
    PermissionDeniedError,
    ReadOnlyError,
    environment_fault,
)

__all__ = ["CrossDeviceStateError", "check_dirs"]


class CrossDeviceStateError(ConfigError):
    """SIDECAR_STATE_DIR is on another filesystem than PROJECT_DIR: staged files and downloads
    are renamed into the project, which cannot cross filesystems (EXDEV)."""


def check_dirs(project_dir: Path, state_dir: Path) -> None:
    """Create both directories, then refuse what would fail later.

    Raises:
        EnvironmentFaultError (NoSpaceError / ReadOnlyError / PermissionDeniedError): a
            directory cannot be created or written.
        CrossDeviceStateError: the two are on different filesystems.
    """
    for d, what in ((project_dir, "PROJECT_DIR"), (state_dir, "SIDECAR_STATE_DIR")):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise environment_fault(exc, d, f"creating {what}") or exc from None
        _check_writable(d, what)
    p_dev, s_dev = project_dir.stat().st_dev, state_dir.stat().st_dev
    if p_dev != s_dev:
        raise CrossDeviceStateError(
            f"SIDECAR_STATE_DIR {state_dir} is on another filesystem than PROJECT_DIR "
            f"{project_dir} (files are staged there and renamed into place, which cannot "
            "cross filesystems: EXDEV); put SIDECAR_STATE_DIR on the filesystem of "
            "PROJECT_DIR, or leave it unset (default PROJECT_DIR/.sidecar)"
        )


def _check_writable(d: Path, what: str) -> None:
    # access() sees both a read-only mount (EROFS, even for root) and missing permissions.
    if os.access(d, os.W_OK | os.X_OK):
        return
    if os.statvfs(d).f_flag & os.ST_RDONLY:
        raise ReadOnlyError(
            f"{what} {d}: read-only file system (EROFS)", path=str(d), errno=errno.EROFS
        )
    raise PermissionDeniedError(
        f"{what} {d}: permission denied for uid {os.geteuid()} (EACCES)",
        path=str(d),
        errno=errno.EACCES,
    )
