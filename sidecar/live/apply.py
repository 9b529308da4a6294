"""Applies delta events to PROJECT_DIR: delta rules 1 (versions), 2 (hashes), 3 (no-op writes)
and 6 (bulks all-or-nothing) of `sidecar/live/__init__.py`, with quotas, safe paths and atomic or
in-place writes.

Coordination with the watcher (two-way sync): the state's sha256 is the source of truth for
"the sidecar wrote this". Every write and its state record happen together while the
ProjectTree's lock is held (sidecar/tree/project.py), so a watcher that takes the same lock before
hashing a file and comparing it with the state never mistakes one of our writes for a local
change. Temp files (`fsio.is_temp_name`) are ours too and must be ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import structlog

from sidecar.config import Limits
from sidecar.errors import (
    EnvironmentFaultError,
    QuotaExceededError,
    SidecarError,
    UnsafePathError,
    environment_fault,
)
from sidecar.live.events import DeltaEvent, FileChange, InvalidEventError
from sidecar.metrics import Metrics
from sidecar.redact import redact_url
from sidecar.tree import fsio
from sidecar.tree.paths import is_reserved, resolve_inside
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState

__all__ = ["DEFAULT_FETCH_CAP", "Applier", "ApplyResult", "Outcome", "ResyncNeeded"]

log = structlog.get_logger(component="apply")

Outcome = Literal[
    "applied", "noop", "duplicate", "stale", "ignored", "rejected", "environment_fault"
]
# The log event of each outcome that is not a refusal, spelled out so that grep finds them.
_EVENTS: dict[Outcome, str] = {
    "applied": "apply.applied",
    "noop": "apply.noop",
    "duplicate": "apply.duplicate",
    "stale": "apply.stale",
    "ignored": "apply.ignored",
}
WriteMode = Literal["atomic", "inplace"]

DEFAULT_FETCH_CAP = 256 * 1024 * 1024  # content_url bodies when SIDECAR_MAX_FILE_BYTES is unset
THREAD_THRESHOLD = 512 * 1024  # disk work above this size goes through asyncio.to_thread
NOOP_HASH_LIMIT = 1024 * 1024  # hash an untracked file on disk (rule 3) only when this small
_CHUNK = 256 * 1024


class ResyncNeeded(SidecarError):
    """Raised inside the Applier when a change cannot be applied safely; `Applier.apply` turns
    it into an ApplyResult whose `resync_reason` tells the engine to re-converge on a snapshot.

    `reason` is a short label for metrics: hash_mismatch, content_url, content_fetch,
    path_conflict, publish_failed.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one `Applier.apply` did. The sync engine counts it (sidecar/live/engine.py); the
    Applier counts nothing but quota refusals.

    outcome: "applied" (something written or deleted), "noop", "duplicate", "stale",
        "ignored" (outbound), "rejected" (nothing written), "environment_fault".
    paths: the paths written or deleted (only when applied).
    reason: why it was rejected: quota, invalid, or the resync reason.
    resync_reason: set when only a snapshot can repair it (hash_mismatch, content_url,
        content_fetch, path_conflict, publish_failed, apply_failed).
    fault: the environment refused (disk full, read-only...): the engine stalls and retries
        the same event instead of giving it up to a resync (sidecar/errors.py).
    error: one line for /status last_error.
    """

    outcome: Outcome
    paths: tuple[str, ...] = ()
    reason: str | None = None
    resync_reason: str | None = None
    fault: EnvironmentFaultError | None = None
    error: str | None = None


@dataclass(slots=True)
class _Item:
    """One change that passed rule 1, on its way through staging to publication."""

    change: FileChange
    target: Path
    old: FileState | None
    blocker: str | None  # a parent path that is a file, not a directory
    parent_exists: bool
    noop: bool = False
    size: int = 0
    mode: int = 0o644
    data: bytes | None = field(default=None, repr=False)
    tmp: Path | None = None  # staged bytes (atomic mode, or fetched from content_url)
    chmod: bool = False  # noop whose mode must still change


class Applier:
    """Applies DeltaEvents to the tree's directory and records what it did through the tree.

    `apply` calls are serialised internally. The tree's lock is held while files are
    published and recorded; a watcher takes it before deciding whether a file on disk is a
    local change (its sha256 differs from the state's).
    """

    def __init__(
        self,
        tree: ProjectTree,
        metrics: Metrics,
        *,
        write_mode: WriteMode = "atomic",
        http: aiohttp.ClientSession | None = None,
        fsync: bool = False,
        fetch_retries: int = 3,
        fetch_timeout: float = 30.0,
        fetch_backoff: float = 0.25,
        before_publish: Callable[[Sequence[FileChange]], Awaitable[set[str]]] | None = None,
        stage_dir: Path | None = None,
        fetch_body: Callable[[FileChange], Awaitable[bytes]] | None = None,
    ) -> None:
        if write_mode not in ("atomic", "inplace"):
            raise ValueError(f"write_mode must be atomic or inplace, not {write_mode!r}")
        self.tree = tree
        self.project_dir = tree.root
        self.state = tree.state  # reads only: every write goes through tree.commit
        self.limits: Limits = tree.limits
        self.metrics = metrics
        self.write_mode: WriteMode = write_mode
        self.fsync = fsync
        self.fetch_retries = fetch_retries
        self.fetch_timeout = fetch_timeout
        self.fetch_backoff = fetch_backoff
        self.before_publish = before_publish
        # Staged writes and content_url downloads live in the state directory (same filesystem,
        # sidecar/tree/preflight.py; swept on start), so PROJECT_DIR never shows a partial file.
        self.stage_dir = Path(
            stage_dir if stage_dir is not None else tree.state.path.parent / fsio.STAGE_DIR_NAME
        ).absolute()
        self.fetch_body = fetch_body
        self.lock = tree.lock
        self._serial = asyncio.Lock()
        self._http = http
        self._own_http = False
        self._root_s = str(self.project_dir)

    async def close(self) -> None:
        """Close the HTTP session if the Applier created it."""
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None
            self._own_http = False

    async def apply(self, ev: DeltaEvent, *, record_seq: bool = True) -> ApplyResult:
        """Apply one event and say what happened; every refusal is a result, not an exception.

        When `record_seq` and `ev.seq` is greater than the recorded one, it is saved as state
        meta "seq" in the same transaction. A rejected event wrote nothing (a publish that
        failed half-way records what is in place and asks for a resync). Quota refusals are
        counted in quota_refusals{source="remote"}.

        Raises:
            ValueError: for snapshot:ready, which the sync engine handles.
        """
        if ev.outbound:
            return ApplyResult("ignored")
        if not ev.changes:
            raise ValueError(f"{ev.event} carries no file changes; the sync engine handles it")
        async with self._serial:
            try:
                outcome, changed = await self._apply(ev, record_seq)
            except QuotaExceededError as exc:
                self.metrics.inc(self.metrics.quota_refusals, "remote")
                return self._rejected(ev, exc, "quota")
            except ResyncNeeded as exc:
                cause = exc.__cause__
                fault = environment_fault(cause) if cause is not None else None
                if fault is not None:
                    return ApplyResult("environment_fault", fault=fault, error=str(fault))
                return self._rejected(ev, exc, exc.reason, resync=True)
            except InvalidEventError as exc:
                return self._rejected(ev, exc, "invalid")
            except (OSError, SidecarError) as exc:
                fault = environment_fault(exc)
                if fault is not None:
                    # A full disk, a read-only mount: not the event's fault (sidecar/errors.py).
                    return ApplyResult("environment_fault", fault=fault, error=str(fault))
                # Any other refusal: the tree may now differ from the state.
                return self._rejected(ev, exc, "apply_failed", resync=True)
        lag_ms = None
        if outcome == "applied" and ev.timestamp is not None:
            lag_ms = round(max(0.0, time.time() - ev.timestamp) * 1000, 1)
        # Every write is an info line (path, version, outcome, lag); skips are debug.
        emit = log.info if outcome == "applied" else log.debug
        emit(
            _EVENTS[outcome],
            event_type=ev.event,
            path=ev.changes[0].path,
            files=len(ev.changes),
            version=ev.changes[0].version,
            seq=ev.seq,
            lag_ms=lag_ms,
        )
        return ApplyResult(outcome, tuple(changed))

    def _rejected(
        self, ev: DeltaEvent, exc: Exception, reason: str, *, resync: bool = False
    ) -> ApplyResult:
        error = str(exc) if reason != "apply_failed" else f"{type(exc).__name__}: {exc}"
        log.warning(
            "apply.rejected",
            event_type=ev.event,
            path=ev.changes[0].path,
            version=ev.changes[0].version,
            seq=ev.seq,
            reason=reason,
            error=error,
        )
        return ApplyResult(
            "rejected", reason=reason, resync_reason=reason if resync else None, error=error
        )

    # -- the steps --

    async def _apply(self, ev: DeltaEvent, record_seq: bool) -> tuple[Outcome, list[str]]:
        seq = ev.seq if record_seq else None
        # Rule 1: only versions newer than what we know (tombstones included).
        items: list[_Item] = []
        skipped: list[Outcome] = []
        placed: dict[str, FileState] = {}
        for c in ev.changes:
            old = self.state.get(c.path)
            if old is not None and c.version <= old.version:
                skipped.append("duplicate" if c.version == old.version else "stale")
                if c.version == old.version and old.seq is None and ev.seq is not None:
                    # The echo of our own push (LocalSync records it without a seq): now the
                    # row can be placed against snapshots (tree/project.py snapshot_keeps).
                    placed[c.path] = FileState(old.version, old.sha256, old.size, old.mode, ev.seq)
                continue
            target, blocker, parent_exists = self._walk(c.path)
            items.append(_Item(c, target, old, blocker, parent_exists))
        if not items:
            self.tree.commit(placed, seq=seq)
            return ("duplicate" if all(s == "duplicate" for s in skipped) else "stale"), []
        deleting = {it.change.path for it in items if it.change.action == "delete"}
        await self._fetch_bodies(items)
        try:
            for it in items:
                if it.change.action == "update":
                    self._check_update(it, deleting)
            await self._fetch_all([it for it in items if it.change.content_url and not it.noop])
            self._check_quota(items)
            await self._stage(items)
            async with self.lock:
                if self.before_publish is not None:
                    # Two-way sync decides conflicts with local edits under the same lock, so a
                    # local write cannot slip in between its check and our publish. It returns
                    # the paths it handled (kept local, or already recorded at a newer version).
                    handled = await self.before_publish([it.change for it in items])
                    items = [it for it in items if it.change.path not in handled]
                changed, records = await self._publish(items, ev.seq) if items else ([], {})
                self.tree.commit(placed | records, seq=seq)
        finally:
            for it in items:
                if it.tmp is not None:
                    _unlink_quietly(it.tmp)
        return ("applied" if changed else "noop"), changed

    def _walk(self, rel: str) -> tuple[Path, str | None, bool]:
        """Check the parents of rel: (target, first parent that is not a directory, all exist).

        Real directories are lstat-ed one by one; a symlinked directory is allowed only when
        paths.resolve_inside agrees that it stays inside the project.
        """
        parts = rel.split("/")
        d = self._root_s
        for i in range(len(parts) - 1):
            d = f"{d}/{parts[i]}"
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                return Path(f"{self._root_s}/{rel}"), None, False
            if stat.S_ISDIR(st.st_mode):
                continue
            prefix = "/".join(parts[: i + 1])
            if stat.S_ISLNK(st.st_mode):
                self._check_link(rel)
                try:
                    if stat.S_ISDIR(Path(d).stat().st_mode):
                        continue
                except OSError:
                    pass
            return Path(f"{self._root_s}/{rel}"), prefix, False
        return Path(f"{self._root_s}/{rel}"), None, True

    def _check_link(self, rel: str) -> None:
        """A path through a symlinked directory must stay inside and out of .sidecar."""
        try:
            target = resolve_inside(self.project_dir, rel)
        except UnsafePathError as exc:
            raise InvalidEventError(str(exc)) from None
        real_root = os.path.realpath(self.project_dir)
        real = Path(os.path.realpath(target.parent)) / target.name
        if is_reserved(os.path.relpath(real, real_root)):
            raise InvalidEventError(f"path leads into the sidecar's state: {rel!r}")

    def _check_update(self, it: _Item, deleting: set[str]) -> None:
        """Parents and target shape, rule 2 for inline bytes, rule 3 (already on disk), mode."""
        c = it.change
        # A file where a parent directory must go is only fine if this event deletes it.
        if it.blocker is not None and it.blocker not in deleting:
            raise ResyncNeeded(
                f"{c.path!r}: {it.blocker!r} is a file, not a directory", "path_conflict"
            )
        try:
            cur = os.lstat(it.target)
        except (FileNotFoundError, NotADirectoryError):
            cur = None
        if cur is not None and stat.S_ISDIR(cur.st_mode):
            raise ResyncNeeded(f"{c.path!r} is a directory on disk", "path_conflict")
        regular = cur is not None and stat.S_ISREG(cur.st_mode)
        if c.mode is not None:
            it.mode = c.mode
        elif cur is not None and regular:
            it.mode = stat.S_IMODE(cur.st_mode)
        if c.content is not None:
            digest = hashlib.sha256(c.content).hexdigest()
            if digest != c.content_hash:
                raise ResyncNeeded(
                    f"{c.path!r} v{c.version}: content_hash does not match "
                    f"the bytes (got {digest[:12]}...)",
                    "hash_mismatch",
                )
            it.data = c.content
            it.size = len(c.content)
        # Rule 3: the file already holds those bytes.
        old = it.old
        if cur is not None and regular:
            if (
                old is not None
                and old.sha256 == c.content_hash
                and cur.st_size == old.size
                and (c.content is None or cur.st_size == it.size)
            ):
                it.noop, it.size = True, old.size
            elif (
                c.content is not None
                and cur.st_size == it.size
                and it.size <= NOOP_HASH_LIMIT
                and (old is None or old.deleted or cur.st_size != old.size)
                and _file_sha256(it.target) == c.content_hash
            ):
                it.noop = True
            if it.noop:
                it.chmod = stat.S_IMODE(cur.st_mode) != it.mode

    def _check_quota(self, items: list[_Item]) -> None:
        quota = self.tree.quota
        d_bytes = d_files = 0
        for it in items:
            old_live = it.old is not None and not it.old.deleted
            old_size = it.old.size if it.old is not None and old_live else 0
            if it.change.action == "delete":
                d_bytes -= old_size
                d_files -= 1 if old_live else 0
                continue
            too_big = quota.file_too_big(it.change.path, it.size)
            if too_big is not None:
                raise QuotaExceededError(too_big)
            d_bytes += it.size - old_size
            d_files += 0 if old_live else 1
        reason = quota.over(d_bytes, d_files)
        if reason is not None:
            raise QuotaExceededError(reason)

    async def _stage(self, items: list[_Item]) -> None:
        """Atomic mode: write every inline update to a temp file before publishing any."""
        if self.write_mode != "atomic":
            return
        for it in items:
            if it.data is None or it.noop or it.tmp is not None:
                continue
            stage_dir = self._stage_dir(it.target)
            args = (stage_dir, it.target.name, it.data, it.mode)
            if it.size > THREAD_THRESHOLD:
                it.tmp = await asyncio.to_thread(fsio.write_temp, *args, fsync=self.fsync)
            else:
                it.tmp = fsio.write_temp(*args, fsync=self.fsync)

    async def _publish(
        self, items: list[_Item], seq: int | None
    ) -> tuple[list[str], dict[str, FileState]]:
        """Deletes first (a file may become a directory), then writes; return what changed."""
        changed: list[str] = []
        records: dict[str, FileState] = {}
        emptied: list[Path] = []
        current = items[0].change.path
        try:
            for it in items:
                c = it.change
                current = c.path
                if c.action != "delete":
                    continue
                if fsio.remove_file(it.target):
                    changed.append(c.path)
                    emptied.append(it.target.parent)
                records[c.path] = FileState(c.version, None, 0, 0, seq)
            for it in items:
                c = it.change
                current = c.path
                if c.action != "update":
                    continue
                if it.noop:
                    if it.chmod:
                        it.target.chmod(it.mode)  # a regular file (lstat in _check_update)
                else:
                    await self._publish_one(it)
                    changed.append(c.path)
                records[c.path] = FileState(c.version, c.content_hash, it.size, it.mode, seq)
            # Pruned only now: an update in the same bulk may live in a directory a delete emptied.
            for parent in emptied:
                fsio.prune_empty_dirs(parent, self.project_dir)
        except OSError as exc:
            # Checks passed but the disk refused: record what is in place, then resync.
            self.tree.commit(records)
            raise ResyncNeeded(
                f"writing {current!r} failed: {exc.strerror}", "publish_failed"
            ) from exc
        return changed, records

    async def _publish_one(self, it: _Item) -> None:
        parent = it.target.parent
        if not it.parent_exists:
            parent.mkdir(parents=True, exist_ok=True)
        if self.write_mode == "atomic":
            assert it.tmp is not None  # staged by _stage or _fetch
            it.tmp.replace(it.target)
            it.tmp = None
            if self.fsync:
                fsio.fsync_dir(parent)
            return
        big = it.size > THREAD_THRESHOLD
        if big:
            await asyncio.to_thread(
                fsio.write_inplace, it.target, it.data, it.mode, source=it.tmp, fsync=self.fsync
            )
        else:
            fsio.write_inplace(it.target, it.data, it.mode, source=it.tmp, fsync=self.fsync)

    # -- bodies the event does not carry (large content) --

    async def _fetch_bodies(self, items: list[_Item]) -> None:
        """Fetch the bytes of body-less updates (get_project_file at the event's version).

        A path whose state already holds those bytes (our own push coming back) needs none:
        rule 3 records it without a write.
        """
        for it in items:
            c = it.change
            if not c.needs_body or (it.old is not None and it.old.sha256 == c.content_hash):
                continue
            if self.fetch_body is None:
                raise ResyncNeeded(
                    f"{c.path!r} v{c.version}: the event carries no body and there is no "
                    "database to fetch it from (SUPABASE_URL is not set)",
                    "content_fetch",
                )
            if c.size is not None and (too_big := self.tree.quota.file_too_big(c.path, c.size)):
                raise QuotaExceededError(too_big)
            try:
                data = await self.fetch_body(c)
            except SidecarError as exc:
                raise ResyncNeeded(
                    f"{c.path!r} v{c.version}: fetching the body failed: {exc}", "content_fetch"
                ) from exc
            it.change = dataclasses.replace(c, content=data)
            log.debug("apply.body_fetched", path=c.path, version=c.version, size=len(data))

    # -- content_url --

    async def _fetch_all(self, items: list[_Item]) -> None:
        if not items:
            return
        sem = asyncio.Semaphore(4)

        async def one(it: _Item) -> None:
            async with sem:
                await self._fetch(it)

        results = await asyncio.gather(*(one(it) for it in items), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _fetch(self, it: _Item) -> None:
        """Download content_url into a temp file next to the target, checking size and hash."""
        c = it.change
        assert c.content_url is not None  # the caller filters
        url, shown = c.content_url, redact_url(c.content_url)
        cap = self.limits.max_file_bytes or DEFAULT_FETCH_CAP
        session = self._session()
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.fetch_timeout, sock_read=self.fetch_timeout
        )
        stage_dir = self._stage_dir(it.target)
        problem = "no attempt"
        for attempt in range(self.fetch_retries + 1):
            if attempt:
                delay = self.fetch_backoff * 2 ** (attempt - 1)
                await asyncio.sleep(delay * (0.5 + random.random()))  # jitter
                log.info(
                    "apply.fetch_retry", path=c.path, url=shown, attempt=attempt, problem=problem
                )
            try:
                async with session.get(url, timeout=timeout) as resp:
                    if resp.status >= 500:
                        problem = f"HTTP {resp.status}"
                        continue
                    if resp.status != 200:
                        raise ResyncNeeded(
                            f"{c.path!r}: content_url {shown} answered HTTP {resp.status}",
                            "content_url",
                        )
                    if resp.content_length is not None and resp.content_length > cap:
                        raise _too_big(c.path, resp.content_length, self.limits)
                    await self._receive(it, resp, stage_dir, cap)
                    return
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
                if it.tmp is not None:
                    _unlink_quietly(it.tmp)
                    it.tmp = None
        raise ResyncNeeded(
            f"{c.path!r}: content_url {shown} failed after "
            f"{self.fetch_retries + 1} attempts ({problem})",
            "content_url",
        )

    async def _receive(
        self, it: _Item, resp: aiohttp.ClientResponse, stage_dir: Path, cap: int
    ) -> None:
        c = it.change
        h = hashlib.sha256()
        size = 0
        tmp, fd = fsio.create_temp(stage_dir, it.target.name)
        it.tmp = tmp
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise _too_big(c.path, size, self.limits)
                h.update(chunk)
                fsio.write_all(fd, chunk)
            os.fchmod(fd, it.mode)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if h.hexdigest() != c.content_hash:
            raise ResyncNeeded(
                f"{c.path!r} v{c.version}: content_hash does not match the bytes from content_url",
                "hash_mismatch",
            )
        it.size = size

    def _stage_dir(self, target: Path) -> Path:
        self.stage_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.stage_dir

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
            self._own_http = True
        return self._http


def _too_big(path: str, size: int, limits: Limits) -> QuotaExceededError:
    if limits.max_file_bytes:
        return QuotaExceededError(
            f"{path!r} is over SIDECAR_MAX_FILE_BYTES={limits.max_file_bytes} ({size}+ bytes)"
        )
    return QuotaExceededError(f"{path!r} is over the {DEFAULT_FETCH_CAP}-byte download cap")


def _file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
