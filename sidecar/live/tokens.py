"""The scoped Realtime JWT: from REALTIME_TOKEN, or REALTIME_TOKEN_FILE re-read when it changes.

Kubernetes projects a secret as a symlinked directory that is swapped atomically, so the file's
*directory* is watched (watchfiles) and the file re-read on any event there; a slow poll and a
re-read at 80% of the token's lifetime back the watch up. A token whose claims say
`role: service_role` is never used: ConfigError at start, refused and alarmed on a rotation
(the current token is kept). The token itself is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from sidecar.config import RealtimeSettings, jwt_claims
from sidecar.errors import ConfigError
from sidecar.redact import register_secret

__all__ = ["TokenSource", "token_expiry"]

log = structlog.get_logger(component="tokens")


def token_expiry(token: str) -> tuple[float | None, float | None]:
    """(exp, iat) of a JWT's unverified claims as unix seconds; None where absent or not numeric."""
    claims = jwt_claims(token)

    def num(key: str) -> float | None:
        value = claims.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    return num("exp"), num("iat")


def _fingerprint(token: str) -> str:
    # A short, non-reversible id for logs: which token is in use, never the token itself.
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def _check(token: str, origin: str) -> None:
    if jwt_claims(token).get("role") == "service_role":
        raise ConfigError(f"{origin} holds a token with role service_role; refusing to use it")


class TokenSource:
    """The current scoped JWT, its expiry, and a way to wait for a newer one.

    Args:
        token: a fixed token (REALTIME_TOKEN); never changes.
        token_file: a file re-read when it changes (REALTIME_TOKEN_FILE); wins over `token`.
        poll_interval: fallback re-read period for filesystems without change events.
        refresh_fraction: also re-read at this fraction of the token's lifetime.

    Raises:
        ConfigError: no token at all, or one whose role is service_role.
    """

    def __init__(
        self,
        token: str | None = None,
        token_file: Path | None = None,
        *,
        poll_interval: float = 30.0,
        refresh_fraction: float = 0.8,
    ) -> None:
        self.token_file = token_file
        self.poll_interval = poll_interval
        self.refresh_fraction = refresh_fraction
        self._token: str = ""
        self._version = 0
        self._event = asyncio.Event()
        self._received_at = time.time()
        self.after_reload: Callable[[], None] | None = None  # e.g. keep the file 0600
        self.refused = 0  # rotations to a service_role token, refused (the current one kept)
        self.last_refusal: str | None = None  # for /status
        self._refused_print: str | None = None
        initial = self._read_file() if token_file is not None else token
        if not initial:
            what = f"REALTIME_TOKEN_FILE {token_file}" if token_file else "REALTIME_TOKEN"
            raise ConfigError(f"{what} is empty or missing; a scoped Realtime JWT is required")
        _check(initial, "REALTIME_TOKEN_FILE" if token_file else "REALTIME_TOKEN")
        self._set(initial)

    @classmethod
    def from_settings(cls, settings: RealtimeSettings, **kwargs: float) -> TokenSource:
        """Build from RealtimeSettings (token_file wins over token)."""
        return cls(str(settings.token) if settings.token else None, settings.token_file, **kwargs)

    # -- reads --

    @property
    def current(self) -> str:
        """The newest accepted token."""
        return self._token

    @property
    def version(self) -> int:
        """Increases by one every time a different token is accepted."""
        return self._version

    @property
    def expires_at(self) -> float | None:
        """Unix time of the current token's unverified `exp` claim, if any."""
        return token_expiry(self._token)[0]

    @property
    def refresh_at(self) -> float | None:
        """When the token is `refresh_fraction` through its lifetime (a new one should exist)."""
        exp, iat = token_expiry(self._token)
        if exp is None:
            return None
        start = iat if iat is not None and iat < exp else min(self._received_at, exp)
        return start + (exp - start) * self.refresh_fraction

    def expired(self, *, skew: float = 0.0) -> bool:
        """True when the current token's exp is in the past (minus skew seconds)."""
        exp = self.expires_at
        return exp is not None and exp <= time.time() + skew

    @property
    def fingerprint(self) -> str:
        """A short hash naming the current token in logs."""
        return _fingerprint(self._token)

    # -- waiting and reloading --

    async def changed(self, since_version: int | None = None) -> str:
        """Wait until a token newer than `since_version` (default: the current one) is accepted."""
        base = self._version if since_version is None else since_version
        while self._version <= base:
            await self._event.wait()
        return self._token

    def reload(self) -> bool:
        """Re-read the token file; True when a different token was accepted.

        A file rotated to a service_role token is refused, but the preview goes on: the
        current scoped token is kept (until it expires, when the channel's own auth-failure
        handling takes over) and the refusal is alarmed (an error log once per token, `refused`,
        `last_refusal` in /status). Exiting would take the user's preview down for an
        orchestrator's mistake, and the service_role key is never sent anywhere either way.
        """
        if self.token_file is None:
            return False
        new = self._read_file()
        if not new or new == self._token:
            return False
        if self.after_reload is not None:
            self.after_reload()
        if jwt_claims(new).get("role") == "service_role":
            self._refuse(new)
            return False
        self.last_refusal = None
        self._set(new)
        exp = self.expires_at
        log.info(
            "tokens.rotated",
            token=self.fingerprint,
            version=self._version,
            expires_in=None if exp is None else round(exp - time.time(), 1),
        )
        self._notify()
        return True

    def _refuse(self, token: str) -> None:
        register_secret(token)  # never in a log line, even refused
        fp = _fingerprint(token)
        if fp == self._refused_print:
            return  # the same file re-read: alarmed once
        self._refused_print = fp
        self.refused += 1
        exp = self.expires_at
        left = "" if exp is None else f", it expires in {max(0, round(exp - time.time()))} s"
        self.last_refusal = (
            "REALTIME_TOKEN_FILE holds a service_role token: refused, "
            f"keeping the current scoped token{left}"
        )
        log.error("tokens.service_role_refused", token=fp, reason=self.last_refusal)

    async def run(self) -> None:
        """Watch the token file's directory forever (returns at once for a fixed token)."""
        if self.token_file is None:
            return
        import watchfiles  # here: only a token file needs it, and the child need not wait

        directory = self.token_file.parent
        while True:
            self.reload()
            try:
                # One batch of changes (or a timeout) per watcher: the next timeout depends on
                # the token now in use, so the watcher is rebuilt after every reload.
                watcher = watchfiles.awatch(
                    directory,
                    watch_filter=None,
                    # watchfiles' Rust loop wakes (and takes the GIL) once per `step` even when
                    # nothing changes: 250 ms is 4 wake-ups a second at rest instead of 50, and
                    # a rotation is still seen within about half a second.
                    debounce=500,
                    step=250,
                    recursive=False,
                    rust_timeout=int(self._next_wait() * 1000),
                    yield_on_timeout=True,
                    ignore_permission_denied=True,
                )
                async with contextlib.aclosing(watcher) as changes:
                    async for _batch in changes:
                        break
            except (OSError, RuntimeError) as exc:
                # The directory vanished for a moment (volume remount): poll until it is back.
                log.warning("tokens.watch_failed", error=str(exc), retry_in=self.poll_interval)
                await asyncio.sleep(min(self.poll_interval, 5.0))

    def _next_wait(self) -> float:
        wait = self.poll_interval
        refresh = self.refresh_at
        if refresh is not None:
            wait = min(wait, max(refresh - time.time(), 0.5))
        return max(wait, 0.05)

    def _read_file(self) -> str:
        assert self.token_file is not None
        try:
            return self.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("tokens.read_failed", path=str(self.token_file), error=type(exc).__name__)
            return ""

    def _set(self, token: str) -> None:
        register_secret(token)
        self._token = token
        self._version += 1
        self._received_at = time.time()

    def _notify(self) -> None:
        old, self._event = self._event, asyncio.Event()
        old.set()
