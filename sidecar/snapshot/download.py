"""Streaming, resumable download of a signed snapshot URL: chunks go to a sink as they arrive.

Blocking, on the standard library's http.client (no asyncio web stack: `sidecar hydrate` starts
without importing one), meant to run in a worker thread that feeds the extractor directly;
`download()` wraps it for async callers. Connection errors, read timeouts and 5xx are retried
with capped exponential backoff and full jitter; an interrupted body resumes with
`Range: bytes=N-` (checked against `Content-Range`, guarded by `If-Range`). A server that answers
a resumed request with 200 makes the sink start over. 400/401/403 mean the signed URL is expired
or forbidden and end the download at once. With `if_none_match` / `if_modified_since` the first
request is conditional, and a 304 ends it with `DownloadResult.not_modified` and no body.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import structlog

from sidecar.config import SnapshotSettings
from sidecar.errors import SnapshotExpiredError, SnapshotInvalidError, SnapshotUnavailableError
from sidecar.redact import redact, redact_url
from sidecar.retry import backoff_delay

if TYPE_CHECKING:
    import ssl

    from sidecar.metrics import Metrics

__all__ = [
    "ChunkSink",
    "DownloadResult",
    "StopFlag",
    "SyncSink",
    "download",
    "fetch",
]

log = structlog.get_logger(component="snapshot")

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_CONTENT_RANGE_UNSAT = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_RETRY_STATUS = frozenset({408, 425, 429})
_EXPIRED_STATUS = frozenset({400, 401, 403})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
# OSError covers refused/reset connections, timeouts (TimeoutError) and TLS errors.
_RETRYABLE_ERRORS = (OSError, http.client.HTTPException)
_ssl_context: ssl.SSLContext | None = None
_T = TypeVar("_T")


class ChunkSink(Protocol):
    """Where downloaded bytes go (async callers); both may await to apply backpressure."""

    async def write(self, chunk: bytes) -> None:
        """Consume the next chunk of the object."""

    async def restart(self) -> None:
        """Forget every byte written so far: the object starts again at offset 0."""


class SyncSink(Protocol):
    """Where `fetch` puts the bytes, from its own thread; an exception it raises ends `fetch`."""

    def write(self, chunk: bytes) -> None:
        """Consume the next chunk of the object."""

    def restart(self) -> None:
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
    not_modified: bool = False  # a conditional request was answered 304: nothing delivered
    etag: str | None = None  # the object's validators, as the server last sent them
    last_modified: str | None = None


class _RetryableError(Exception):
    """A failure worth another attempt (5xx, 408/429, inconsistent ranges)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _StoppedError(Exception):
    """StopFlag.stop() was called: the download ends without a result."""


class _SinkError(Exception):
    """The sink raised: never retried, re-raised as it was by `fetch`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.sink_error = error


class StopFlag:
    """Stops a `fetch` running in another thread: between chunks, in a backoff wait, and in a
    blocked read (its connection is shut down)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def stop(self) -> None:
        self._event.set()
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)

    def _watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
        if sock is not None and self._event.is_set():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def fetch(
    url: str,
    sink: SyncSink,
    *,
    settings: SnapshotSettings,
    metrics: Metrics | None = None,
    expected_sha256: str | None = None,
    hash_bytes: bool | None = None,
    chunk_size: int = 256 * 1024,
    on_total: Callable[[int | None], None] | None = None,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    on_validators: Callable[[str | None, str | None], None] | None = None,
    stop: StopFlag | None = None,
) -> DownloadResult:
    """Stream url into sink (blocking), retrying and resuming until the whole object arrived.

    `settings.retries` bounds consecutive failed attempts; an attempt that delivered bytes resets
    the count (a long download over a flaky link keeps going while it makes progress).
    `on_total` is told the object size once it is known, `on_validators` the ETag and
    Last-Modified of every answer that has them. The conditional headers go on requests
    made before any byte was delivered; a 304 returns at once with `not_modified`.

    Raises:
        SnapshotExpiredError: HTTP 400/401/403 (expired or forbidden signed URL), at once.
        SnapshotUnavailableError: 404 or another 4xx, or still failing after the retries.
        SnapshotInvalidError: expected_sha256 given and the bytes do not match it.
        Whatever the sink raises, unchanged.
    `stop.stop()` from another thread makes it raise SnapshotUnavailableError("stopped") soon.
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
        stop or StopFlag(),
    )
    d.on_validators = on_validators
    d.conditional = {
        k: v
        for k, v in (("If-None-Match", if_none_match), ("If-Modified-Since", if_modified_since))
        if v
    }
    try:
        if urlsplit(url).scheme == "file":
            return d.run_file()
        return d.run()
    except _StoppedError:
        raise SnapshotUnavailableError(f"snapshot download stopped: {d.shown}") from None
    except _SinkError as exc:
        raise exc.sink_error from None


async def download(
    url: str,
    sink: ChunkSink,
    *,
    settings: SnapshotSettings,
    metrics: Metrics | None = None,
    expected_sha256: str | None = None,
    hash_bytes: bool | None = None,
    chunk_size: int = 256 * 1024,
    on_total: Callable[[int | None], None] | None = None,
) -> DownloadResult:
    """`fetch` for async callers: runs it in a thread and awaits the sink's methods on this loop.

    Cancellation stops the thread (its connection is shut down) and waits for it; bytes already
    written to the sink stay there.
    """
    loop = asyncio.get_running_loop()

    class Bridge:
        def write(self, chunk: bytes) -> None:
            asyncio.run_coroutine_threadsafe(sink.write(chunk), loop).result()

        def restart(self) -> None:
            asyncio.run_coroutine_threadsafe(sink.restart(), loop).result()

    stop = StopFlag()
    return await run_in_thread(
        lambda: fetch(
            url,
            Bridge(),
            settings=settings,
            metrics=metrics,
            expected_sha256=expected_sha256,
            hash_bytes=hash_bytes,
            chunk_size=chunk_size,
            on_total=on_total,
            stop=stop,
        ),
        stop.stop,
        name="sidecar-download",
    )


async def run_in_thread(fn: Callable[[], _T], on_cancel: Callable[[], None], *, name: str) -> _T:
    """Run fn in a new thread (with this context: structlog binds ids there) and await it.

    Cancelled: on_cancel() asks fn to stop, and the thread is waited for before re-raising (it
    must be done with the disk and the network when the caller goes on)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    ctx = contextvars.copy_context()
    thread = threading.Thread(target=ctx.run, args=(body,), name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        on_cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(done)
        await asyncio.to_thread(thread.join)
        raise


class _Download:
    def __init__(
        self,
        url: str,
        sink: SyncSink,
        settings: SnapshotSettings,
        metrics: Metrics | None,
        expected_sha256: str | None,
        hash_bytes: bool,
        chunk_size: int,
        on_total: Callable[[int | None], None] | None,
        stop: StopFlag,
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
        self.stop = stop
        self.conditional: dict[str, str] = {}
        self.on_validators: Callable[[str | None, str | None], None] | None = None
        self.offset = 0
        self.total: int | None = None
        self.validator: str | None = None
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.hasher = hashlib.sha256() if hash_bytes else None
        self.transferred = 0
        self.retries = 0
        self.restarts = 0
        self.not_modified = False

    def run(self) -> DownloadResult:
        t0 = time.monotonic()
        failures = 0
        while True:
            before = self.transferred
            try:
                if self._attempt():
                    break
            except (*_RETRYABLE_ERRORS, _RetryableError) as exc:
                if self.stop.stopped:
                    raise _StoppedError from None
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
                if self.stop.wait(wait):
                    raise _StoppedError from None
            except (http.client.InvalidURL, UnicodeError) as exc:  # not worth retrying
                raise SnapshotUnavailableError(
                    f"snapshot download failed ({_reason(exc)}): {self.shown}"
                ) from None
        return self._result(t0)

    def _result(self, t0: float) -> DownloadResult:
        digest = self.hasher.hexdigest() if self.hasher is not None else None
        if not self.not_modified and self.expected is not None and digest != self.expected:
            raise SnapshotInvalidError(
                f"snapshot sha256 mismatch: expected {self.expected}, got {digest}"
            )
        return DownloadResult(
            size=self.offset,
            transferred=self.transferred,
            retries=self.retries,
            restarts=self.restarts,
            sha256=None if self.not_modified else digest,
            seconds=time.monotonic() - t0,
            not_modified=self.not_modified,
            etag=self.etag,
            last_modified=self.last_modified,
        )

    def run_file(self) -> DownloadResult:
        """A file:// URL (a snapshot on a mounted volume): same sink protocol, no retries."""
        t0 = time.monotonic()
        path = Path(unquote(urlsplit(self.url).path))
        try:
            fh = path.open("rb", buffering=0)
        except OSError as exc:
            raise SnapshotUnavailableError(
                f"snapshot file cannot be read ({exc.strerror}): {self.shown}"
            ) from None
        with fh:
            self._set_total(os.fstat(fh.fileno()).st_size)
            while True:
                if self.stop.stopped:
                    raise _StoppedError
                try:
                    chunk = fh.read(self.chunk_size)
                except OSError as exc:
                    raise SnapshotUnavailableError(
                        f"snapshot file cannot be read ({exc.strerror}): {self.shown}"
                    ) from None
                if not chunk:
                    break
                self._deliver(chunk)
        return self._result(t0)

    def _deliver(self, chunk: bytes) -> None:
        self.transferred += len(chunk)
        self.offset += len(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)
        try:
            self.sink.write(chunk)
        except BaseException as exc:
            raise _SinkError(exc) from exc

    # -- one request --

    def _attempt(self) -> bool:
        """One request (following redirects); True when the object is complete."""
        headers = {"Accept-Encoding": "identity", "User-Agent": "sidecar"}
        resuming = self.offset > 0
        if resuming:
            headers["Range"] = f"bytes={self.offset}-"
            if self.validator:
                headers["If-Range"] = self.validator
        elif self.conditional and not self.restarts:
            headers.update(self.conditional)
        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            conn, resp = self._request(url, headers)
            try:
                if resp.status in _REDIRECT_STATUS and resp.getheader("Location"):
                    url = urljoin(url, resp.getheader("Location", ""))
                    continue
                return self._receive(resp, resuming)
            finally:
                self.stop._watch(None)
                conn.close()
        raise SnapshotUnavailableError(f"snapshot URL redirects more than {_MAX_REDIRECTS} times")

    def _request(
        self, url: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urlsplit(url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, parts.port, timeout=self.settings.connect_timeout, context=_tls()
            )
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(
                host, parts.port, timeout=self.settings.connect_timeout
            )
        else:
            raise SnapshotUnavailableError(
                f"snapshot URL scheme {parts.scheme!r} is not supported: {self.shown}"
            )
        if self.stop.stopped:
            raise _StoppedError
        try:
            conn.connect()
            assert conn.sock is not None
            self.stop._watch(conn.sock)
            conn.sock.settimeout(self.settings.read_timeout)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            self.stop._watch(None)
            conn.close()
            raise

    def _receive(self, resp: http.client.HTTPResponse, resuming: bool) -> bool:
        self._check_status(resp, resuming)
        status = resp.status
        self._remember_validators(resp)
        if status == 304:
            self.not_modified = True
            return True
        if status == 416:
            return self._unsatisfiable(resp)
        if status == 206:
            self._check_content_range(resp)
        elif resuming:
            # 200 to a Range request: the server ignores Range (or If-Range said the object
            # changed). Start over with this body.
            log.warning(
                "snapshot.download_restarted",
                offset=self.offset,
                url=self.shown,
                reason="server answered 200 to a Range request",
            )
            self._start_over()
        if self.total is None and status == 200:
            self._set_total(resp.length)
        read, size, stop = resp.read1, self.chunk_size, self.stop
        while chunk := read(size):
            if stop.stopped:
                raise _StoppedError
            self._deliver(chunk)
        if stop.stopped:
            raise _StoppedError
        if self.total is not None and self.offset != self.total:
            raise _RetryableError(f"body ended at {self.offset} of {self.total} bytes")
        return True

    def _check_status(self, resp: http.client.HTTPResponse, resuming: bool) -> None:
        status = resp.status
        if status in {200, 206} or (status == 416 and resuming):
            return
        if status == 304 and not resuming and self.conditional:
            return
        if status in _EXPIRED_STATUS:
            raise SnapshotExpiredError(
                f"snapshot URL refused with HTTP {status}{_error_detail(resp)} (expired or not "
                f"authorised; ask for a fresh signed URL): {self.shown}"
            )
        if status >= 500 or status in _RETRY_STATUS:
            raise _RetryableError(f"HTTP {status}", _retry_after(resp))
        what = "not found" if status == 404 else "unexpected answer"
        raise SnapshotUnavailableError(
            f"snapshot {what}: HTTP {status}{_error_detail(resp)}: {self.shown}"
        )

    def _check_content_range(self, resp: http.client.HTTPResponse) -> None:
        header = resp.getheader("Content-Range", "")
        m = _CONTENT_RANGE.match(header)
        total = None if m is None or m.group(3) == "*" else int(m.group(3))
        if m is None or int(m.group(1)) != self.offset:
            reason = f"bad Content-Range {header!r} for offset {self.offset}"
        elif total is not None and self.total is not None and total != self.total:
            reason = f"object size changed from {self.total} to {total}"
        else:
            reason = ""
        if reason:
            # Resuming cannot be trusted here: the next attempt fetches the whole object.
            self._start_over()
            raise _RetryableError(f"{reason}; starting over")
        if self.total is None:
            self._set_total(total)

    def _set_total(self, total: int | None) -> None:
        self.total = total
        if self.on_total is not None:
            self.on_total(total)

    def _unsatisfiable(self, resp: http.client.HTTPResponse) -> bool:
        m = _CONTENT_RANGE_UNSAT.match(resp.getheader("Content-Range", ""))
        if m is not None and int(m.group(1)) == self.offset and self.total in {None, self.offset}:
            return True  # the connection dropped after the last byte: we have it all
        self._start_over()
        raise _RetryableError("range not satisfiable; starting over")

    def _start_over(self) -> None:
        if self.offset > 0:
            self.restarts += 1
        self.offset = 0
        self.total = None
        self.validator = None
        if self.hasher is not None:
            self.hasher = hashlib.sha256()
        try:
            self.sink.restart()
        except BaseException as exc:
            raise _SinkError(exc) from exc

    def _remember_validators(self, resp: http.client.HTTPResponse) -> None:
        etag = resp.getheader("ETag")
        modified = resp.getheader("Last-Modified")
        if etag or modified:
            self.etag, self.last_modified = etag, modified
            if self.on_validators is not None:
                self.on_validators(etag, modified)
        if etag and not etag.startswith("W/"):
            self.validator = etag
        elif modified:
            self.validator = modified


def _tls() -> ssl.SSLContext:
    """The default TLS context, built on first use (loading the CA store takes tens of ms)."""
    global _ssl_context  # one per process
    if _ssl_context is None:
        import ssl  # only https URLs pay for it

        _ssl_context = ssl.create_default_context()
    return _ssl_context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _RetryableError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"{type(exc).__name__}: read timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)  # type: ignore[no-any-return]


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    raw = resp.getheader("Retry-After", "")
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None


def _error_detail(resp: http.client.HTTPResponse) -> str:
    """` (error: message)` from a Supabase/S3 error body, redacted and on one line."""
    try:
        raw = resp.read(4096)
    except _RETRYABLE_ERRORS:
        return ""
    text = raw.decode("utf-8", "replace")
    try:
        doc: Any = json.loads(text)
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
