"""Hydration: make PROJECT_DIR the snapshot's tree, streaming download -> zstd -> tar -> staging.

The download runs in the event loop; chunks cross a bounded queue to one worker thread that owns
the SnapshotWriter (it decompresses and parses, and its own helper thread hashes and writes to
staging; then it publishes), so network, CPU and disk overlap while memory stays bounded (about
1 MiB of compressed chunks queued here, 1 MiB of decompressed ones in the writer, the zstd
window (2 MiB at level 3, at most 16 MiB), and the manifest). A restart with the same snapshot
already in place verifies the tree instead of downloading it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import hashlib
import queue
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from sidecar.config import Settings
from sidecar.errors import (
    ConfigError,
    EnvironmentFaultError,
    QuotaExceededError,
    SnapshotExpiredError,
    SnapshotInvalidError,
    SnapshotUnavailableError,
    environment_fault,
)
from sidecar.redact import redact, redact_url
from sidecar.snapshot.download import download
from sidecar.snapshot.extract import PublishResult, SnapshotWriter, new_staging_dir, verify_tree
from sidecar.snapshot.manifest import FileEntry, Manifest
from sidecar.snapshot.progress import Progress
from sidecar.tree.preflight import check_dirs
from sidecar.tree.state import StateStore

if TYPE_CHECKING:  # prometheus_client is not needed by the one-shot `sidecar hydrate`
    from sidecar.metrics import Metrics

__all__ = ["META_MANIFEST", "META_SOURCE", "hydrate", "hydrate_once", "snapshot_source"]

log = structlog.get_logger(component="snapshot")
_cli_log = structlog.get_logger(component="sidecar")  # the line app.hydrate_once used to log

META_SOURCE = "hydrate.source"  # sha256 of the URL without its query + SNAPSHOT_SHA256
META_MANIFEST = "hydrate.manifest"  # the published manifest's header (ids, created_at, seq)
QUEUE_SLOTS = 4  # chunks in flight between the download and the worker thread
CHUNK_SIZE = 256 * 1024  # upper bound per chunk: at most 1 MiB queued

# One hydration per project dir at a time (a resync must not race a running hydration, and a
# new one must not remove the staging dir of one in progress). Entries vanish when unused.
_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


async def hydrate_once(settings: Settings) -> int:
    """`sidecar hydrate`: hydrate and verify PROJECT_DIR, then return 0.

    Lives here rather than in app.py so that the one-shot command imports only the download and
    extraction path (not realtime, pydantic or watchfiles).
    """
    if settings.snapshot.url is None:
        raise ConfigError("SNAPSHOT_URL is required for `sidecar hydrate`")
    # What exists now (modules, settings) outlives the hydration: keep it out of the cyclic
    # GC's full collections, which the manifest's tens of thousands of objects would trigger.
    gc.freeze()
    check_dirs(settings.project_dir, settings.state_dir)
    state = StateStore(settings.state_dir)
    try:
        # No metrics: nothing would ever serve them from a one-shot process.
        manifest = await hydrate(settings, state, None)
    finally:
        state.close()
        gc.unfreeze()
    _cli_log.info("sidecar.hydrated", snapshot_id=manifest.snapshot_id, files=len(manifest.files))
    return 0


def snapshot_source(url: str, sha256: str | None) -> str:
    """A stable id for "this snapshot": the URL without its query (which rotates) + its sha256."""
    parts = urlsplit(url)
    key = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}\n{sha256 or ''}"
    return hashlib.sha256(key.encode()).hexdigest()


async def hydrate(
    settings: Settings,
    state: StateStore,
    metrics: Metrics | None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    session: aiohttp.ClientSession | None = None,
    progress: Progress | None = None,
    snapshot_id: str | None = None,
) -> Manifest:
    """Make settings.project_dir hold the snapshot at url (default SNAPSHOT_URL); return its manifest.

    If the state says this snapshot (same URL path and sha256, and `snapshot_id` when given, as
    from a snapshot:ready event) is in place and the tree verifies, nothing is downloaded.
    Otherwise the snapshot is streamed, checked and published, rewriting only files that differ
    (and those verification found damaged). Hydrations of one project dir run one at a time.
    A progress line is drawn on stderr when it is a TTY. `metrics` may be None (no counters).

    Raises:
        ConfigError: no URL.
        SnapshotExpiredError / SnapshotUnavailableError: the download failed.
        SnapshotInvalidError / QuotaExceededError: the snapshot was refused; nothing published.
    Cancellation: the worker thread stops between chunks, staging is removed and project_dir is
    unchanged (unless publishing had already begun, which then completes first).
    """
    url = url or settings.snapshot.url
    if not url:
        raise ConfigError("SNAPSHOT_URL is required for the first hydration")
    key = str(settings.project_dir.absolute())
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = asyncio.Lock()
    async with lock:
        return await _hydrate(settings, state, metrics, url, sha256, session, progress, snapshot_id)


async def _hydrate(
    settings: Settings,
    state: StateStore,
    metrics: Metrics | None,
    url: str,
    sha256: str | None,
    session: aiohttp.ClientSession | None,
    progress: Progress | None,
    snapshot_id: str | None,
) -> Manifest:
    sha256 = (sha256 or settings.snapshot.sha256 or "").lower() or None
    source = snapshot_source(url, sha256)
    shown = redact_url(url)
    t0 = time.monotonic()
    log.info("snapshot.hydrate_started", url=shown, sha256=sha256)
    outcome = "error"
    failure: Exception | None = None
    try:
        manifest, damaged = await _in_place(settings, state, source, snapshot_id)
        stats: dict[str, Any]
        if manifest is not None:
            outcome, stats = "in_place", {"downloaded": 0}
        else:
            manifest, stats = await _download_and_publish(
                settings,
                state,
                metrics,
                url,
                sha256,
                session,
                progress if progress is not None else Progress(),
                damaged,
            )
            state.update(meta={META_SOURCE: source, META_MANIFEST: _header(manifest)})
            outcome = "ok"
        if metrics is not None:
            metrics.hydration_bytes.inc(stats["downloaded"])
            metrics.hydration_files.inc(len(manifest.files))
        log.info(
            "snapshot.hydrated",
            outcome=outcome,
            snapshot_id=manifest.snapshot_id,
            files=len(manifest.files),
            bytes=manifest.total_bytes,
            seconds=round(time.monotonic() - t0, 3),
            **stats,
        )
        return manifest
    except asyncio.CancelledError:
        outcome = "cancelled"
        log.info("snapshot.hydrate_cancelled", url=shown)
        raise
    except Exception as exc:
        # A full disk or a read-only mount is the environment's fault: name the path (exit
        # NO_SPACE / READ_ONLY / PERMISSION_DENIED), not an internal error.
        fault = environment_fault(exc)
        failure = fault or exc
        outcome = _outcome(failure)
        if fault is not None and fault is not exc:
            raise fault from exc
        raise
    finally:
        if failure is not None:
            log.error(
                "snapshot.hydrate_failed",
                outcome=outcome,
                error=type(failure).__name__,
                reason=redact(str(failure)),
                url=shown,
                seconds=round(time.monotonic() - t0, 3),
            )
        if metrics is not None:
            metrics.hydration_seconds.observe(time.monotonic() - t0)
            metrics.inc(metrics.hydrations, outcome)


def _outcome(exc: Exception) -> str:
    for kind, name in (
        (EnvironmentFaultError, "environment"),
        (SnapshotExpiredError, "expired"),
        (SnapshotUnavailableError, "unavailable"),
        (SnapshotInvalidError, "invalid"),
        (QuotaExceededError, "quota"),
    ):
        if isinstance(exc, kind):
            return name
    return "error"


def _header(m: Manifest) -> dict[str, Any]:
    return {
        "project_id": m.project_id,
        "snapshot_id": m.snapshot_id,
        "created_at": m.created_at,
        "seq": m.seq,
        "format": m.format,
    }


async def _in_place(
    settings: Settings, state: StateStore, source: str, snapshot_id: str | None
) -> tuple[Manifest | None, list[str]]:
    """(manifest, []) if the tree on disk is this snapshot's and verifies; else (None, damaged)."""
    header = state.meta(META_MANIFEST)
    if state.meta(META_SOURCE) != source or not isinstance(header, dict):
        return None, []
    if snapshot_id is not None and header.get("snapshot_id") != snapshot_id:
        return None, []  # same URL path, new content (a producer that overwrites its object)
    damaged = await asyncio.to_thread(verify_tree, settings.project_dir, state)
    if damaged:
        log.warning("snapshot.tree_damaged", files=len(damaged), sample=sorted(damaged)[:10])
        return None, damaged
    files: dict[str, FileEntry] = {}
    for path, known in state.live().items():
        target = None
        if stat.S_ISLNK(known.mode):  # how extract records a symlink; verified just now
            target = str((settings.project_dir / path).readlink())
        files[path] = FileEntry(
            path=path,
            size=known.size,
            sha256=known.sha256 or "",
            mode=stat.S_IMODE(known.mode),
            version=known.version,
            target=target,
        )
    seq = header.get("seq")
    manifest = Manifest(
        project_id=str(header["project_id"]),
        snapshot_id=str(header["snapshot_id"]),
        created_at=int(header["created_at"]),
        files=files,
        seq=seq if isinstance(seq, int) else None,
    )
    return manifest, []


async def _download_and_publish(
    settings: Settings,
    state: StateStore,
    metrics: Metrics | None,
    url: str,
    sha256: str | None,
    session: aiohttp.ClientSession | None,
    progress: Progress,
    damaged: list[str],
) -> tuple[Manifest, dict[str, Any]]:
    settings.project_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(settings.state_dir)

    def make_writer() -> SnapshotWriter:
        # SNAPSHOT_SHA256 is checked by the download (on the event loop thread, in parallel with
        # this worker), so the writer does not hash the compressed bytes a second time.
        return SnapshotWriter(
            settings.project_dir,
            new_staging_dir(settings.state_dir),
            settings.limits,
            state=state,
            damaged=damaged,
        )

    pipe = _Pipeline(make_writer, state, asyncio.get_running_loop())
    totals: dict[str, int | None] = {"total": None}

    def on_chunk(downloaded: int) -> None:
        writer = pipe.writer
        m = writer.manifest if writer is not None else None
        progress.update(
            downloaded=downloaded,
            total=totals["total"],
            files=writer.files_done if writer is not None else 0,
            files_total=len(m.files) if m is not None else None,
        )

    pipe.on_chunk = on_chunk
    pipe.start()
    try:
        result = await download(
            url,
            pipe,
            settings=settings.snapshot,
            metrics=metrics,
            session=session,
            expected_sha256=sha256,
            chunk_size=CHUNK_SIZE,
            on_total=lambda t: totals.__setitem__("total", t),
        )
        manifest, published = await pipe.finish()
    except BaseException:
        await pipe.cancel()
        progress.finish()
        raise
    progress.finish(
        f"hydrated {len(manifest.files):,} files, "
        f"{result.transferred / 1048576:.1f} MiB in {result.seconds:.1f}s"
    )
    return manifest, {
        "downloaded": result.transferred,
        "retries": result.retries,
        "restarts": result.restarts,
        "written": published.written,
        "unchanged": published.unchanged,
        "removed": published.removed,
    }


def _remove_stale_staging(state_dir: Path) -> None:
    # Left behind by a crash (a clean abort removes its own); never published, safe to drop.
    for old in state_dir.glob("staging-*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


class _Signal(Enum):
    RESTART = "restart"
    EOF = "eof"
    STOP = "stop"


class _StoppedError(Exception):
    """The worker stopped on request (cancellation); staging was removed."""


class _Pipeline:
    """A ChunkSink that hands chunks to one worker thread owning the SnapshotWriter.

    At most QUEUE_SLOTS chunks are queued; `write` waits for a free slot (backpressure). The
    worker checks a threading.Event between chunks, so cancel() stops it promptly.
    """

    def __init__(
        self,
        make_writer: Callable[[], SnapshotWriter],
        state: StateStore,
        loop: asyncio.AbstractEventLoop,
        slots: int = QUEUE_SLOTS,
    ) -> None:
        self._make_writer = make_writer
        self._state = state
        self._loop = loop
        self._slots = asyncio.Semaphore(slots)
        self._nslots = slots
        self._queue: queue.SimpleQueue[bytes | _Signal] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._done: asyncio.Future[tuple[Manifest, PublishResult]] = loop.create_future()
        # The worker logs too: give it the caller's context (structlog binds project/session).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._run,),
            name="sidecar-hydrate",
            daemon=True,
        )
        self.writer: SnapshotWriter | None = None
        self.downloaded = 0
        self.on_chunk: Callable[[int], None] | None = None

    def start(self) -> None:
        self._thread.start()

    # -- ChunkSink, event loop side --

    async def write(self, chunk: bytes) -> None:
        await self._slots.acquire()
        self._raise_if_failed()
        self._queue.put(chunk)
        self.downloaded += len(chunk)
        if self.on_chunk is not None:
            self.on_chunk(self.downloaded)

    async def restart(self) -> None:
        self._raise_if_failed()
        self.downloaded = 0
        self._queue.put(_Signal.RESTART)

    async def finish(self) -> tuple[Manifest, PublishResult]:
        """Signal end of stream; wait for finish() and publish() in the worker."""
        self._queue.put(_Signal.EOF)
        return await asyncio.shield(self._done)

    async def cancel(self) -> None:
        """Stop the worker (it aborts the writer) and wait until it is done with the disk."""
        self._stop.set()
        self._queue.put(_Signal.STOP)
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            # Cancelled again while cleaning up: staging must still be gone when we return.
            self._thread.join()
            raise
        except Exception:  # noqa: BLE001, S110 - the caller is already raising the error that matters
            pass
        # The worker settles the future just before it returns: wait for it to be gone too.
        await asyncio.to_thread(self._thread.join)

    def _raise_if_failed(self) -> None:
        if self._done.done():
            exc = self._done.exception()
            raise exc if exc is not None else RuntimeError("hydrate worker ended early")

    # -- worker thread --

    def _run(self) -> None:
        try:
            result = self._work()
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop side
            if self.writer is not None:
                with contextlib.suppress(Exception):
                    self.writer.abort()
            self._settle(exc=exc)
        else:
            self._settle(result=result)

    def _work(self) -> tuple[Manifest, PublishResult]:
        writer = self.writer = self._make_writer()
        while True:
            item = self._queue.get()
            if isinstance(item, bytes):
                self._call_soon(self._slots.release)
            self._check_stop()  # cancel() sets the event before it queues STOP
            if item is _Signal.RESTART:
                writer.abort()
                writer = self.writer = self._make_writer()
            elif item is _Signal.EOF:
                manifest = writer.finish()
                self._check_stop()
                # Publishing is not interrupted: every rename is atomic, and the state records
                # the tree once it is all in place.
                return manifest, writer.publish(self._state)
            elif isinstance(item, bytes):
                writer.feed(item)

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _StoppedError

    def _settle(
        self,
        *,
        result: tuple[Manifest, PublishResult] | None = None,
        exc: BaseException | None = None,
    ) -> None:
        def settle() -> None:
            if self._done.done():
                return
            if exc is not None:
                self._done.set_exception(exc)
            else:
                assert result is not None
                self._done.set_result(result)
            # Wake a producer waiting for a slot so that it sees the failure.
            for _ in range(self._nslots + 1):
                self._slots.release()

        self._call_soon(settle)

    def _call_soon(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            self._loop.call_soon_threadsafe(fn)
