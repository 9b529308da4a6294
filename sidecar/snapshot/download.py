"""Streaming, resumable download of a signed snapshot URL: chunks go to a sink as they arrive.

Connection errors, read timeouts and 5xx are retried with capped exponential backoff and full
jitter; an interrupted body resumes with `Range: bytes=N-` (checked against `Content-Range`,
guarded by `If-Range`). A server that answers a resumed request with 200 makes the sink start over.
400/401/403 mean the signed URL is expired or forbidden and end the download at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

import aiohttp
import structlog

from sidecar.config import SnapshotSettings
from sidecar.errors import SnapshotExpiredError, SnapshotInvalidError, SnapshotUnavailableError
from sidecar.redact import redact, redact_url
from sidecar.retry import backoff_delay

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

__all__ = ["ChunkSink", "DownloadResult", "download"]

log = structlog.get_logger(component="snapshot")

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_CONTENT_RANGE_UNSAT = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_RETRY_STATUS = frozenset({408, 425, 429})
_EXPIRED_STATUS = frozenset({400, 401, 403})
_RETRYABLE_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class ChunkSink(Protocol):
    """Where downloaded bytes go; both methods may block (await) to apply backpressure."""

    async def write(self, chunk: bytes) -> None:
        """Consume the next chunk of the object."""

    async def restart(self) -> None:
        """Forget every byte written so far: the object starts again at offset 0."""


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """What one completed download did."""

    size: int  # bytes of the object delivered to the sink in the final pass
    transferred: int  # body bytes received over the network, including discarded ones
    retries: int
    restarts: int
    sha256: str | None  # of the object bytes, when it was computed
    seconds: float


class _RetryableError(Exception):
    """A failure worth another attempt (5xx, 408/429, inconsistent ranges)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


async def download(
    url: str,
    sink: ChunkSink,
    *,
    settings: SnapshotSettings,
    metrics: Metrics | None = None,
    session: aiohttp.ClientSession | None = None,
    expected_sha256: str | None = None,
    hash_bytes: bool | None = None,
    chunk_size: int = 256 * 1024,
    on_total: Callable[[int | None], None] | None = None,
) -> DownloadResult:
    """Stream url into sink, retrying and resuming until the whole object was delivered.

    `settings.retries` bounds consecutive failed attempts; an attempt that delivered bytes resets
    the count (a long download over a flaky link keeps going while it makes progress).
    `on_total` is told the object size once it is known.

    Raises:
        SnapshotExpiredError: HTTP 400/401/403 (expired or forbidden signed URL), at once.
        SnapshotUnavailableError: 404 or another 4xx, or still failing after the retries.
        SnapshotInvalidError: expected_sha256 given and the bytes do not match it.
    Cancellation: the open response is closed; bytes already written to the sink stay there.
    """
    d = _Download(
        url,
        sink,
        settings,
        metrics,
        expected_sha256,
        expected_sha256 is not None if hash_bytes is None else hash_bytes,
        chunk_size,
        on_total,
    )
    if urlsplit(url).scheme == "file":
        return await d.run_file()
    if session is not None:
        return await d.run(session)
    async with aiohttp.ClientSession(auto_decompress=False) as own:
        return await d.run(own)


class _Download:
    def __init__(
        self,
        url: str,
        sink: ChunkSink,
        settings: SnapshotSettings,
        metrics: Metrics | None,
        expected_sha256: str | None,
        hash_bytes: bool,
        chunk_size: int,
        on_total: Callable[[int | None], None] | None,
    ) -> None:
        self.url = url
        self.shown = redact_url(url)
        self.sink = sink
        self.settings = settings
        self.metrics = metrics
        self.expected = expected_sha256.lower() if expected_sha256 else None
        self.hash_bytes = hash_bytes
        self.chunk_size = chunk_size
        self.on_total = on_total
        self.offset = 0
        self.total: int | None = None
        self.validator: str | None = None
        self.hasher = hashlib.sha256() if hash_bytes else None
        self.transferred = 0
        self.retries = 0
        self.restarts = 0

    async def run(self, session: aiohttp.ClientSession) -> DownloadResult:
        t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.settings.connect_timeout,
            sock_read=self.settings.read_timeout,
        )
        failures = 0
        while True:
            before = self.transferred
            try:
                if await self._attempt(session, timeout):
                    break
            except (*_RETRYABLE_ERRORS, _RetryableError) as exc:
                failures = 1 if self.transferred > before else failures + 1
                reason = _reason(exc)
                if failures > self.settings.retries:
                    raise SnapshotUnavailableError(
                        f"snapshot download failed after {self.settings.retries} retries "
                        f"({reason}): {self.shown}"
                    ) from None
                wait = backoff_delay(
                    failures, self.settings.backoff_initial, self.settings.backoff_max
                )
                if isinstance(exc, _RetryableError) and exc.retry_after is not None:
                    wait = max(wait, min(exc.retry_after, self.settings.backoff_max))
                self.retries += 1
                if self.metrics is not None:
                    self.metrics.snapshot_retries.inc()
                log.warning(
                    "snapshot.retry_scheduled",
                    attempt=failures,
                    wait_for=round(wait, 3),
                    offset=self.offset,
                    total=self.total,
                    reason=reason,
                    url=self.shown,
                )
                await asyncio.sleep(wait)
            except aiohttp.ClientError as exc:  # not worth retrying: bad URL, redirect loop...
                raise SnapshotUnavailableError(
                    f"snapshot download failed ({_reason(exc)}): {self.shown}"
                ) from None
        return self._result(t0)

    def _result(self, t0: float) -> DownloadResult:
        digest = self.hasher.hexdigest() if self.hasher is not None else None
        if self.expected is not None and digest != self.expected:
            raise SnapshotInvalidError(
                f"snapshot sha256 mismatch: expected {self.expected}, got {digest}"
            )
        return DownloadResult(
            size=self.offset,
            transferred=self.transferred,
            retries=self.retries,
            restarts=self.restarts,
            sha256=digest,
            seconds=time.monotonic() - t0,
        )

    async def run_file(self) -> DownloadResult:
        """A file:// URL (a snapshot on a mounted volume): same sink protocol, no retries."""
        t0 = time.monotonic()
        path = Path(unquote(urlsplit(self.url).path))
        try:
            fh = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise SnapshotUnavailableError(
                f"snapshot file cannot be read ({exc.strerror}): {self.shown}"
            ) from None
        try:
            self._set_total(await asyncio.to_thread(lambda: os.fstat(fh.fileno()).st_size))
            while True:
                try:
                    chunk = await asyncio.to_thread(fh.read, self.chunk_size)
                except OSError as exc:
                    raise SnapshotUnavailableError(
                        f"snapshot file cannot be read ({exc.strerror}): {self.shown}"
                    ) from None
                if not chunk:
                    break
                self.transferred += len(chunk)
                self.offset += len(chunk)
                if self.hasher is not None:
                    self.hasher.update(chunk)
                await self.sink.write(chunk)
        finally:
            fh.close()
        return self._result(t0)

    async def _attempt(
        self, session: aiohttp.ClientSession, client_timeout: aiohttp.ClientTimeout
    ) -> bool:
        """One request; True when the object is complete."""
        headers = {"Accept-Encoding": "identity"}
        resuming = self.offset > 0
        if resuming:
            headers["Range"] = f"bytes={self.offset}-"
            if self.validator:
                headers["If-Range"] = self.validator
        async with session.get(
            self.url, headers=headers, timeout=client_timeout, raise_for_status=False
        ) as resp:
            await self._check_status(resp, resuming)
            if resp.status == 416:
                return await self._unsatisfiable(resp)
            if resp.status == 206:
                await self._check_content_range(resp)
            elif resuming:
                # 200 to a Range request: the server ignores Range (or If-Range said the object
                # changed). Start over with this body.
                log.warning(
                    "snapshot.download_restarted",
                    offset=self.offset,
                    url=self.shown,
                    reason="server answered 200 to a Range request",
                )
                await self._start_over()
            if self.total is None and resp.status == 200:
                self._set_total(resp.content_length)
            self._remember_validator(resp)
            async for chunk in resp.content.iter_chunked(self.chunk_size):
                self.transferred += len(chunk)
                self.offset += len(chunk)
                if self.hasher is not None:
                    self.hasher.update(chunk)
                await self.sink.write(chunk)
        if self.total is not None and self.offset != self.total:
            raise _RetryableError(f"body ended at {self.offset} of {self.total} bytes")
        return True

    async def _check_status(self, resp: aiohttp.ClientResponse, resuming: bool) -> None:
        status = resp.status
        if status in {200, 206} or (status == 416 and resuming):
            return
        if status in _EXPIRED_STATUS:
            detail = await _error_detail(resp)
            raise SnapshotExpiredError(
                f"snapshot URL refused with HTTP {status}{detail} (expired or not authorised; "
                f"ask for a fresh signed URL): {self.shown}"
            )
        if status >= 500 or status in _RETRY_STATUS:
            raise _RetryableError(f"HTTP {status}", _retry_after(resp))
        detail = await _error_detail(resp)
        what = "not found" if status == 404 else "unexpected answer"
        raise SnapshotUnavailableError(f"snapshot {what}: HTTP {status}{detail}: {self.shown}")

    async def _check_content_range(self, resp: aiohttp.ClientResponse) -> None:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        total = None if m is None or m.group(3) == "*" else int(m.group(3))
        if m is None or int(m.group(1)) != self.offset:
            reason = (
                f"bad Content-Range {resp.headers.get('Content-Range')!r} for offset {self.offset}"
            )
        elif total is not None and self.total is not None and total != self.total:
            reason = f"object size changed from {self.total} to {total}"
        else:
            reason = ""
        if reason:
            # Resuming cannot be trusted here: the next attempt fetches the whole object.
            await self._start_over()
            raise _RetryableError(f"{reason}; starting over")
        if self.total is None:
            self._set_total(total)

    def _set_total(self, total: int | None) -> None:
        self.total = total
        if self.on_total is not None:
            self.on_total(total)

    async def _unsatisfiable(self, resp: aiohttp.ClientResponse) -> bool:
        m = _CONTENT_RANGE_UNSAT.match(resp.headers.get("Content-Range", ""))
        if m is not None and int(m.group(1)) == self.offset and self.total in {None, self.offset}:
            return True  # the connection dropped after the last byte: we have it all
        await self._start_over()
        raise _RetryableError("range not satisfiable; starting over")

    async def _start_over(self) -> None:
        if self.offset > 0:
            self.restarts += 1
        self.offset = 0
        self.total = None
        self.validator = None
        if self.hasher is not None:
            self.hasher = hashlib.sha256()
        await self.sink.restart()

    def _remember_validator(self, resp: aiohttp.ClientResponse) -> None:
        etag = resp.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            self.validator = etag
        elif resp.headers.get("Last-Modified"):
            self.validator = resp.headers["Last-Modified"]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _RetryableError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"{type(exc).__name__}: read timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)  # type: ignore[no-any-return]


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    raw = resp.headers.get("Retry-After", "")
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None


async def _error_detail(resp: aiohttp.ClientResponse) -> str:
    """` (error: message)` from a Supabase/S3 error body, redacted and on one line."""
    try:
        raw = await resp.content.read(4096)
    except _RETRYABLE_ERRORS:
        return ""
    text = raw.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        parts = [str(doc[k]) for k in ("error", "message") if doc.get(k)]
        text = ": ".join(parts)
    else:
        m = re.search(r"<Code>([^<]*)</Code>", text)  # S3 XML errors
        text = m.group(1) if m else ""
    text = " ".join(text.split())[:200]
    return f" ({redact(text)})" if text else ""
