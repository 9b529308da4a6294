"""The SidecarError tree and the exit code each error maps to; imports nothing from sidecar.

Every error that crosses a module boundary is a SidecarError, defined here, so the exit codes
(`ExitCode`, documented in the README) are read in one place. `cli.py` maps whatever reaches it
to its `exit_code`; anything else is a bug (70). A few subclasses live next to the only code
that raises them, and are listed here so the whole tree reads in one place:

- `tree/state.py` StateStoreError(EnvironmentFaultError): the state database failed otherwise.
- `tree/preflight.py` CrossDeviceStateError(ConfigError): state dir on another filesystem.
- `live/apply.py` ResyncNeeded(SidecarError): control flow inside the Applier (returned to the engine as an ApplyResult), never an exit.
- `orch/storage.py` StorageError(SidecarError): a Storage API request failed.
- `testing/postgres.py` PostgresUnavailableError(SidecarError): no PostgreSQL for the tests.

`tests/test_errors.py` checks that this list stays complete.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum

__all__ = [
    "ChildStartError",
    "ConfigError",
    "ConflictError",
    "EnvironmentFaultError",
    "ExitCode",
    "HookFailedError",
    "InvalidEventError",
    "NoSpaceError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "ReadOnlyError",
    "RealtimeAuthError",
    "SidecarError",
    "SnapshotExpiredError",
    "SnapshotInvalidError",
    "SnapshotUnavailableError",
    "TarFormatError",
    "UnsafePathError",
    "UpstreamError",
    "environment_fault",
]


class ExitCode(IntEnum):
    """Named process exit codes (sysexits.h where one fits); documented in the README."""

    OK = 0
    SNAPSHOT_INVALID = 65  # EX_DATAERR: integrity or safety check failed
    SNAPSHOT_UNAVAILABLE = 69  # EX_UNAVAILABLE: download failed after retries, or URL expired
    INTERNAL = 70  # EX_SOFTWARE: a bug
    ENVIRONMENT = 71  # EX_OSERR: the machine failed an operation (I/O error, cross-device...)
    PERMISSION_DENIED = 72  # EX_OSFILE: a file or directory the sidecar must write is not its own
    READ_ONLY = 74  # EX_IOERR: PROJECT_DIR or the state directory is on a read-only filesystem
    NO_SPACE = 75  # EX_TEMPFAIL: the disk (or quota) is full; retry once space is freed
    QUOTA_EXCEEDED = 73  # EX_CANTCREAT: over SIDECAR_MAX_BYTES / _FILES / _FILE_BYTES
    REALTIME_AUTH = 77  # EX_NOPERM: the Realtime token is refused for good
    CONFIG = 78  # EX_CONFIG: invalid or missing configuration
    CHILD_NOT_EXECUTABLE = 126
    CHILD_NOT_FOUND = 127


class SidecarError(Exception):
    """Base of every error that crosses a module boundary; carries its exit code."""

    exit_code: int = ExitCode.INTERNAL


class ConfigError(SidecarError, ValueError):
    """Raised when the configuration is invalid or forbidden; lists every problem."""

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class SnapshotUnavailableError(SidecarError):
    """Raised when the snapshot cannot be downloaded after all retries."""

    exit_code = ExitCode.SNAPSHOT_UNAVAILABLE


class SnapshotExpiredError(SnapshotUnavailableError):
    """Raised at once when the signed URL is expired or forbidden (HTTP 400/401/403)."""


class SnapshotInvalidError(SidecarError, ValueError):
    """Raised when the snapshot fails an integrity or safety check; nothing is published."""

    exit_code = ExitCode.SNAPSHOT_INVALID


class UnsafePathError(SnapshotInvalidError):
    """Raised for a path that is absolute, escapes the root, or is otherwise not allowed."""


class TarFormatError(SnapshotInvalidError):
    """Raised when the tar stream is malformed, truncated or uses an unsupported feature."""


class InvalidEventError(SidecarError, ValueError):
    """Raised for a malformed or unsafe delta event; the message is a one-line reason.

    Never fatal in steady state: the engine counts the event as rejected and skips it.
    """


class QuotaExceededError(SidecarError):
    """Raised when a snapshot or change would exceed a configured limit."""

    exit_code = ExitCode.QUOTA_EXCEEDED


class RealtimeAuthError(SidecarError):
    """Raised when the Realtime token is refused for good (revoked, not authorised)."""

    exit_code = ExitCode.REALTIME_AUTH


class HookFailedError(SidecarError):
    """Raised when SIDECAR_AFTER_HYDRATE fails; the sidecar exits with the hook's status.

    `exit_code` is per instance: the hook's own status (126/127 when it could not be executed,
    143/137 when it was stopped), so the container reports what the hook reported.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status


class ChildStartError(SidecarError, OSError):
    """Raised when the child command cannot be executed.

    `exit_code` is per instance, as a shell reports it: CHILD_NOT_FOUND (127) when the command
    does not exist, CHILD_NOT_EXECUTABLE (126) when it exists but cannot be run.
    """

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UpstreamError(SidecarError):
    """Raised when the database refuses a call (auth, bad request) or retries ran out.

    `transient` is True when a later attempt may succeed (outage, timeouts, 5xx). Never an
    exit: two-way sync counts it and retries the path later.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.transient = transient


class ConflictError(UpstreamError):
    """Raised when `expected_version` is stale: someone else wrote the path first."""

    def __init__(
        self, path: str, expected_version: int | None, current_version: int | None
    ) -> None:
        super().__init__(
            f"version conflict on {path!r}: expected {expected_version}, head is {current_version}",
            status=409,
            code="PT409",
        )
        self.path = path
        self.expected_version = expected_version
        self.current_version = current_version


class EnvironmentFaultError(SidecarError):
    """Raised when the machine refuses an operation (disk full, read-only, permission, I/O).

    Not a bug: the message names the path and the cause in one line. `kind` is the metric
    label and the /status reason.
    """

    exit_code = ExitCode.ENVIRONMENT
    kind = "environment"

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class NoSpaceError(EnvironmentFaultError):
    """ENOSPC / EDQUOT / SQLITE_FULL: the filesystem (or the user's disk quota) is full."""

    exit_code = ExitCode.NO_SPACE
    kind = "no_space"


class ReadOnlyError(EnvironmentFaultError):
    """EROFS / SQLITE_READONLY: the filesystem is mounted (or turned) read-only."""

    exit_code = ExitCode.READ_ONLY
    kind = "read_only"


class PermissionDeniedError(EnvironmentFaultError):
    """EACCES / EPERM: the sidecar's user may not write there."""

    exit_code = ExitCode.PERMISSION_DENIED
    kind = "permission_denied"


_KINDS: dict[int, type[EnvironmentFaultError]] = {
    _errno.ENOSPC: NoSpaceError,
    _errno.EDQUOT: NoSpaceError,
    _errno.EROFS: ReadOnlyError,
    _errno.EACCES: PermissionDeniedError,
    _errno.EPERM: PermissionDeniedError,
    _errno.EXDEV: EnvironmentFaultError,
    _errno.EIO: EnvironmentFaultError,
    _errno.EMFILE: EnvironmentFaultError,
    _errno.ENFILE: EnvironmentFaultError,
    _errno.EMLINK: EnvironmentFaultError,
    _errno.ENOMEM: EnvironmentFaultError,
}


def environment_fault(
    exc: BaseException, path: object = None, doing: str = "writing"
) -> EnvironmentFaultError | None:
    """The EnvironmentFaultError an OSError stands for, or None when it is not one.

    `path` is used when the OSError does not name one (a write on an open descriptor).
    """
    if isinstance(exc, EnvironmentFaultError):
        return exc
    if not isinstance(exc, OSError) or exc.errno not in _KINDS:
        return None
    where = exc.filename if exc.filename is not None else path
    shown = f" {where}" if where is not None else ""
    cause = exc.strerror or _errno.errorcode.get(exc.errno, str(exc.errno))
    name = _errno.errorcode.get(exc.errno, "")
    fault = _KINDS[exc.errno](
        f"{doing}{shown}: {cause.lower()} ({name})",
        path=None if where is None else str(where),
        errno=exc.errno,
    )
    fault.__cause__ = exc
    return fault
