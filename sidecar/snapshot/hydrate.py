"""Hydration: make PROJECT_DIR the snapshot's tree, streaming download -> zstd -> tar -> staging.

One worker thread downloads (stdlib http.client) and feeds the SnapshotWriter directly (it
decompresses, and its own helper thread parses, hashes and writes to staging; then it
publishes), so network, CPU and disk overlap while memory stays bounded (one 1 MiB chunk in
hand, the kernel's socket buffer, 6 MiB of decompressed chunks in the writer, the zstd window
(2 MiB at level 3, at most 16 MiB), and the manifest). No asyncio web stack is involved.

Whether the snapshot at a URL is the tree already in place is decided by what identifies its
content, never by the URL path alone: the `snapshot_id` a snapshot:ready event names, or
SNAPSHOT_SHA256, or else the server (a conditional GET with the ETag / Last-Modified recorded
when the tree was published: 304 means unchanged) and, failing that, the manifest at the start
of the body (byte-equal to the one in place: the download stops there). Then the tree is
verified instead of downloaded, and only damaged files are fetched again.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
from sidecar.snapshot.download import DownloadResult, StopFlag, fetch, run_in_thread
from sidecar.snapshot.manifest import FileEntry, Manifest
from sidecar.snapshot.progress import Progress
from sidecar.snapshot.publish import PublishResult, verify_tree
from sidecar.snapshot.writer import ManifestInPlaceError, SnapshotWriter, new_staging_dir
from sidecar.tree.fsio import STAGE_DIR_NAME, sweep_temp
from sidecar.tree.preflight import check_dirs
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import StateStore

if TYPE_CHECKING:  # prometheus_client and aiohttp are not needed by `sidecar hydrate`
    import aiohttp

    from sidecar.metrics import Metrics

__all__ = ["META_MANIFEST", "META_SOURCE", "hydrate", "hydrate_once", "snapshot_object"]

log = structlog.get_logger(component="snapshot")
_cli_log = structlog.get_logger(component="sidecar")  # the line app.hydrate_once used to log

# Where the tree in place came from: {"object": snapshot_object(url), "sha256": SNAPSHOT_SHA256 or
# None, "etag", "last_modified": the server's validators}; recorded with the tree it describes.
META_SOURCE = "hydrate.source"
META_MANIFEST = "hydrate.manifest"  # the published manifest's header (ids, created_at, seq)
CHUNK_SIZE = 1024 * 1024  # upper bound per read from the network (fewer, larger feeds)


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
    tree = ProjectTree(settings.project_dir, StateStore(settings.state_dir), settings.limits)
    # What a kill of an earlier run left behind (downloads, staged writes of `sidecar run`).
    sweep_temp(
        settings.state_dir / STAGE_DIR_NAME,
        settings.project_dir,
        {p.rpartition("/")[0] for p in tree.state.live()},
    )
    try:
        # No metrics: nothing would ever serve them from a one-shot process.
        manifest = await hydrate(settings, tree, None)
    finally:
        tree.close()
        gc.unfreeze()
    _cli_log.info("sidecar.hydrated", snapshot_id=manifest.snapshot_id, files=len(manifest.files))
    return 0


def snapshot_object(url: str) -> str:
    """The object a URL names: without credentials and query (a signed URL's token rotates).

    It says *where* a snapshot is, not *which* one: a producer may upsert new bytes there.
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


async def hydrate(
    settings: Settings,
    tree: ProjectTree,
    metrics: Metrics | None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    session: aiohttp.ClientSession | None = None,
    progress: Progress | None = None,
    snapshot_id: str | None = None,
) -> Manifest:
    """Make settings.project_dir hold the snapshot at url (default SNAPSHOT_URL); return its manifest.

    If the snapshot at url is the tree in place (see the module docstring for how that is
    decided) and the tree verifies, nothing is downloaded. Otherwise the snapshot is streamed,
    checked and published, rewriting only files that differ (and those verification found
    damaged). Hydrations of one tree run one at a time, and only the publish step holds
    `tree.lock` (the download and staging do not, so deltas keep applying meanwhile): no
    delta, local change or watcher comparison interleaves with a publish. Publishing follows
    the version rule per path (sidecar/tree/project.py `snapshot_keeps`): a snapshot older
    than what was applied never takes a path back. A progress line is drawn on
    stderr when it is a TTY. `metrics` may be None (no counters). `session` is not used (the
    download has its own connection); it stays for callers that pass one.

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
    async with tree.hydrating:
        return await _hydrate(settings, tree, metrics, url, sha256, progress, snapshot_id)


async def _hydrate(
    settings: Settings,
    tree: ProjectTree,
    metrics: Metrics | None,
    url: str,
    sha256: str | None,
    progress: Progress | None,
    snapshot_id: str | None,
) -> Manifest:
    sha256 = (sha256 or settings.snapshot.sha256 or "").lower() or None
    shown = redact_url(url)
    t0 = time.monotonic()
    log.info("snapshot.hydrate_started", url=shown, sha256=sha256)
    outcome = "error"
    failure: Exception | None = None
    try:
        manifest, outcome, stats = await _converge(
            settings,
            tree,
            metrics,
            url,
            sha256,
            snapshot_id,
            progress if progress is not None else Progress(),
        )
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


@dataclass(frozen=True, slots=True)
class _Unchanged:
    """The server said the snapshot at the URL is the tree in place (304, or its manifest)."""

    why: str  # "not_modified" | "same_manifest"
    transferred: int
    etag: str | None
    last_modified: str | None


async def _converge(
    settings: Settings,
    tree: ProjectTree,
    metrics: Metrics | None,
    url: str,
    sha256: str | None,
    snapshot_id: str | None,
    progress: Progress,
) -> tuple[Manifest, str, dict[str, Any]]:
    """(manifest, outcome, stats): the tree verified in place, or downloaded and published."""
    state = tree.state
    header = state.meta(META_MANIFEST)
    placed = isinstance(header, dict)
    placed_id = header.get("snapshot_id") if isinstance(header, dict) else None
    recorded = state.meta(META_SOURCE)
    rec: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    obj = snapshot_object(url)
    # Something that names the content, when the caller has it; None: ask the server.
    same: bool | None = None
    if placed and snapshot_id is not None:
        same = placed_id == snapshot_id
    elif placed and sha256 is not None:
        same = rec.get("sha256") == sha256
    damaged: list[str] = []
    if same:
        manifest, damaged = await _verify_in_place(settings, state)
        if manifest is not None:
            return manifest, "in_place", {"downloaded": 0}
    ask = placed and same is None
    source = {"object": obj, "sha256": sha256}
    got = await _download_and_publish(
        settings,
        tree,
        metrics,
        url,
        sha256,
        progress,
        damaged,
        source,
        etag=rec.get("etag") if ask and rec.get("object") == obj else None,
        last_modified=rec.get("last_modified") if ask and rec.get("object") == obj else None,
        known_manifest=_str_or_none(state.meta("manifest_sha256")) if ask else None,
    )
    if isinstance(got, _Unchanged):
        manifest, damaged = await _verify_in_place(settings, state)
        if manifest is not None:
            validators = {"etag": got.etag, "last_modified": got.last_modified}
            if got.etag or got.last_modified:  # a new object path with the same content
                state.update(meta={META_SOURCE: {**source, **validators}})
            stats = {"downloaded": got.transferred, "unchanged_by": got.why}
            return manifest, "in_place", stats
        got = await _download_and_publish(
            settings, tree, metrics, url, sha256, progress, damaged, source
        )
    assert not isinstance(got, _Unchanged)
    manifest, published, result = got
    progress.finish(
        f"hydrated {len(manifest.files):,} files, "
        f"{result.transferred / 1048576:.1f} MiB in {result.seconds:.1f}s"
    )
    return (
        manifest,
        "ok",
        {
            "downloaded": result.transferred,
            "retries": result.retries,
            "restarts": result.restarts,
            "written": published.written,
            "unchanged": published.unchanged,
            "removed": published.removed,
            "removed_dirs": published.removed_dirs,
        },
    )


def _str_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


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


async def _verify_in_place(
    settings: Settings, state: StateStore
) -> tuple[Manifest | None, list[str]]:
    """(manifest, []) if the tree on disk is what the state records; else (None, damaged)."""
    header = state.meta(META_MANIFEST)
    assert isinstance(header, dict)
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
    tree: ProjectTree,
    metrics: Metrics | None,
    url: str,
    sha256: str | None,
    progress: Progress,
    damaged: list[str],
    source: dict[str, Any],
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    known_manifest: str | None = None,
) -> tuple[Manifest, PublishResult, DownloadResult] | _Unchanged:
    """Stream the snapshot into a writer in a worker thread, then publish it while holding the
    tree's lock; or _Unchanged when the conditional request got 304 or the manifest is
    `known_manifest` (stopped there)."""
    settings.project_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(settings.state_dir)
    stop = StopFlag()

    def make_writer() -> SnapshotWriter:
        # SNAPSHOT_SHA256 is checked by the download, so the writer does not hash the compressed
        # bytes a second time.
        return SnapshotWriter(
            settings.project_dir,
            new_staging_dir(settings.state_dir),
            settings.limits,
            state=tree.state,
            damaged=damaged,
            known_manifest_sha256=known_manifest,
        )

    def work() -> tuple[Manifest, SnapshotWriter, DownloadResult] | _Unchanged:
        sink = _WriterSink(make_writer, progress)
        seen: dict[str, str | None] = {}
        try:
            result = fetch(
                url,
                sink,
                settings=settings.snapshot,
                metrics=metrics,
                expected_sha256=sha256,
                chunk_size=CHUNK_SIZE,
                on_total=sink.set_total,
                on_validators=lambda e, m: seen.update(etag=e, last_modified=m),
                if_none_match=etag,
                if_modified_since=None if etag else last_modified,
                stop=stop,
            )
            if result.not_modified:
                sink.writer.abort()
                return _Unchanged("not_modified", 0, result.etag, result.last_modified)
            manifest = sink.writer.finish()
        except ManifestInPlaceError:
            sink.writer.abort()
            return _Unchanged(
                "same_manifest", sink.downloaded, seen.get("etag"), seen.get("last_modified")
            )
        except BaseException:
            sink.writer.abort()
            raise
        if stop.stopped:  # cancelled: nothing was published yet, so nothing will be
            sink.writer.abort()
            raise SnapshotUnavailableError("hydration stopped before publishing")
        return manifest, sink.writer, result

    try:
        staged = await run_in_thread(work, stop.stop, name="sidecar-hydrate")
    except BaseException:
        progress.finish()
        raise
    if isinstance(staged, _Unchanged):
        return staged
    manifest, writer, result = staged
    # Publishing is not interrupted: every rename is atomic, and the state records the tree
    # (with where it came from) in one transaction once it is all in place.
    validators = {"etag": result.etag, "last_modified": result.last_modified}
    meta = {META_SOURCE: {**source, **validators}, META_MANIFEST: _header(manifest)}

    def publish() -> PublishResult:
        try:
            return writer.publish(tree, meta)
        except BaseException:
            writer.abort()
            raise

    try:
        async with tree.lock:  # run_in_thread waits for the thread even when cancelled
            published = await run_in_thread(publish, lambda: None, name="sidecar-publish")
    except BaseException:
        writer.abort()  # cancelled while waiting for the lock: staging goes (a no-op after)
        progress.finish()
        raise
    return manifest, published, result


class _WriterSink:
    """The download's sink: bytes go straight into the SnapshotWriter (same thread)."""

    def __init__(self, make_writer: Callable[[], SnapshotWriter], progress: Progress) -> None:
        self._make_writer = make_writer
        self._progress = progress
        self.writer = make_writer()
        self.downloaded = 0
        self.total: int | None = None

    def set_total(self, total: int | None) -> None:
        self.total = total

    def write(self, chunk: bytes) -> None:
        writer = self.writer
        writer.feed(chunk)
        self.downloaded += len(chunk)
        progress = self._progress
        if progress.enabled:
            m = writer.manifest
            progress.update(
                downloaded=self.downloaded,
                total=self.total,
                files=writer.files_done,
                files_total=len(m.files) if m is not None else None,
            )

    def restart(self) -> None:
        self.writer.abort()
        self.writer = self._make_writer()
        self.downloaded = 0


def _remove_stale_staging(state_dir: Path) -> None:
    # Left behind by a crash (a clean abort removes its own); never published, safe to drop.
    for old in state_dir.glob("staging-*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
