"""The SidecarError tree and the exit code each error maps to; imports nothing from sidecar."""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ChildStartError",
    "ConfigError",
    "ExitCode",
    "HookFailedError",
    "QuotaExceededError",
    "RealtimeAuthError",
    "SidecarError",
    "SnapshotExpiredError",
    "SnapshotInvalidError",
    "SnapshotUnavailableError",
    "UnsafePathError",
]


class ExitCode(IntEnum):
    """Named process exit codes (sysexits.h where one fits); documented in the README."""

    OK = 0
    SNAPSHOT_INVALID = 65  # EX_DATAERR: integrity or safety check failed
    SNAPSHOT_UNAVAILABLE = 69  # EX_UNAVAILABLE: download failed after retries, or URL expired
    INTERNAL = 70  # EX_SOFTWARE: a bug
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


class QuotaExceededError(SidecarError):
    """Raised when a snapshot or change would exceed a configured limit."""

    exit_code = ExitCode.QUOTA_EXCEEDED


class RealtimeAuthError(SidecarError):
    """Raised when the Realtime token is refused for good (revoked, not authorised)."""

    exit_code = ExitCode.REALTIME_AUTH


class HookFailedError(SidecarError):
    """Raised when SIDECAR_AFTER_HYDRATE fails; the sidecar exits with the hook's status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status


class ChildStartError(SidecarError, OSError):
    """Raised when the child command cannot be executed."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code
