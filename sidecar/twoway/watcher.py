"""Watches PROJECT_DIR for local changes (watchfiles) and decides them by content.

A path is a local change when its bytes differ from what the StateStore says the sidecar last
synced: its sha256 differs from the state's, or it exists while the state knows no live file
there, or it is gone while the state knows one. The comparison is made while the tree lock is
held, and the Applier writes a file and records its sha256 under that same lock, so the
sidecar's own writes are never mistaken for local changes, however many arrive at once.

Ignored: the state directory (`.sidecar`), the sidecar's temp files (`.*.sidecar-tmp-*`),
editor swap/backup files, and the configured patterns (TwoWaySettings.ignore: node_modules, .git,
dist, build caches...). Symlinks are never synced back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fnmatch
import hashlib
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog

from sidecar.config import TwoWaySettings
from sidecar.tree import fsio
from sidecar.tree.paths import STATE_DIR_NAME
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState, StateStore

if TYPE_CHECKING:  # imported when watching starts: the child need not wait for it
    import watchfiles

__all__ = [
    "EDITOR_TEMP_PATTERNS",
    "IgnoreRules",
    "LocalChange",
    "Watcher",
    "compare",
    "examine",
]

log = structlog.get_logger(component="watcher")

# Swap, backup and lock files of common editors (vim, emacs, JetBrains, macOS, browsers).
EDITOR_TEMP_PATTERNS: tuple[str, ...] = (
    "*.swp",
    "*.swo",
    "*.swx",
    "*.swpx",
    "*~",
    ".#*",
    "#*#",
    "4913",
    "*___jb_tmp___",
    "*___jb_old___",
    ".DS_Store",
    "*.crdownload",
    "*.sync-conflict-*",
)
THREAD_THRESHOLD = 512 * 1024  # files above this size are read in a worker thread

Kind = Literal["created", "modified", "deleted"]


@dataclass(frozen=True, slots=True)
class LocalChange:
    """A path whose bytes differ from the last synced version.

    `data` holds the file's bytes (None for a delete, or when the file is over `max_read`);
    `known` is the state's record (None: a path the sidecar never synced).
    """

    path: str
    kind: Kind
    data: bytes | None = field(repr=False)
    sha256: str | None
    size: int
    mode: int
    known: FileState | None

    @property
    def deleted(self) -> bool:
        return self.kind == "deleted"


class IgnoreRules:
    """Which project-relative paths the watcher never reports.

    A pattern without "/" matches any path component (fnmatch: `node_modules`, `*.log`); a
    pattern with "/" matches the path or one of its leading directories (`docs/_build`).
    """

    def __init__(
        self,
        patterns: Iterable[str] = TwoWaySettings().ignore,
        *,
        extra_prefixes: Iterable[str] = (),
    ) -> None:
        self.component: list[str] = [*EDITOR_TEMP_PATTERNS]
        self.anchored: list[str] = []
        for raw in patterns:
            pat = raw.strip().strip("/")
            if not pat:
                continue
            (self.anchored if "/" in pat else self.component).append(pat)
        self.prefixes = tuple(p.strip("/") for p in extra_prefixes if p.strip("/"))

    def __call__(self, rel: str) -> bool:
        """True when rel must be ignored."""
        parts = rel.split("/")
        if parts[0] == STATE_DIR_NAME:
            return True
        for prefix in self.prefixes:
            if rel == prefix or rel.startswith(prefix + "/"):
                return True
        if fsio.is_temp_name(parts[-1]):
            return True
        for part in parts:
            for pat in self.component:
                if fnmatch.fnmatchcase(part, pat):
                    return True
        for pat in self.anchored:
            for i in range(1, len(parts) + 1):
                if fnmatch.fnmatchcase("/".join(parts[:i]), pat):
                    return True
        return False


def examine(
    project_dir: Path, rel: str, state: StateStore, *, max_read: int = 0
) -> LocalChange | None:
    """Compare one path on disk with the state; None when it holds what was last synced.

    Blocking (reads and hashes the file); call it with the tree lock held. `max_read` > 0:
    files larger than that are hashed in chunks and reported with `data=None`.
    """
    return _compare(project_dir, rel, state, max_read)[0]


async def compare(
    project_dir: Path, rel: str, state: StateStore, max_read: int
) -> tuple[LocalChange | None, bytes | None]:
    """examine(), plus the bytes read when the file matched the state (the caller keeps them
    as the base); large files are read in a worker thread."""
    try:
        size = os.lstat(project_dir / rel).st_size
    except OSError:
        size = 0
    if size > THREAD_THRESHOLD:
        return await asyncio.to_thread(_compare, project_dir, rel, state, max_read)
    return _compare(project_dir, rel, state, max_read)


def _compare(
    project_dir: Path, rel: str, state: StateStore, max_read: int
) -> tuple[LocalChange | None, bytes | None]:
    known = state.get(rel)
    target = project_dir / rel
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    live = known is not None and not known.deleted
    if st is None or not stat.S_ISREG(st.st_mode):
        if (st is not None and stat.S_ISLNK(st.st_mode)) or not live:
            return None, None  # symlinks are not synced back
        return LocalChange(rel, "deleted", None, None, 0, 0, known), None
    data: bytes | None = None
    try:
        if max_read and st.st_size > max_read:
            with open(target, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            size = st.st_size
        else:
            with open(target, "rb") as f:
                data = f.read()
            digest = hashlib.sha256(data).hexdigest()
            size = len(data)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        if not live:
            return None, None
        return LocalChange(rel, "deleted", None, None, 0, 0, known), None
    if live and known is not None and known.sha256 == digest:
        return None, data
    return LocalChange(
        rel, "modified" if live else "created", data, digest, size, stat.S_IMODE(st.st_mode), known
    ), None


class Watcher:
    """Yields sets of project-relative paths that hold local changes (decided by content).

    Args:
        tree: the tree to watch; its state is what the sidecar last synced (sha256 per path)
            and its lock is held while a path is compared, so no write of ours is misread.
        state_dir: ignored when it lies inside project_dir (besides `.sidecar`).
        ignore: TwoWaySettings.ignore patterns.
        debounce_ms: how long a burst of events may be grouped before it is reported.
        step_ms: quiet time that ends a burst early. watchfiles wakes every step to look at
            its stop event, even when nothing changes: 50 ms (its own default) keeps an idle
            sidecar near 0.1 % of a core; 10 ms cost 0.5 % (scripts/bench_idle).
        max_read: files above this size are hashed without being kept in memory (0: no cap).
        on_synced: called with (path, bytes, sha256) when a file read for a check holds
            exactly the synced bytes (LocalSync keeps them as the base for diffs and merges).
        initial_scan: once armed, also report every local change made while nothing watched.
    """

    def __init__(
        self,
        tree: ProjectTree,
        *,
        state_dir: Path | None = None,
        ignore: Iterable[str] = TwoWaySettings().ignore,
        debounce_ms: int = 50,
        step_ms: int = 50,
        max_read: int = 0,
        on_synced: Callable[[str, bytes, str], None] | None = None,
        initial_scan: bool = False,
        force_polling: bool | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        self.tree = tree
        self.project_dir = tree.root
        self.state = tree.state
        self.lock = tree.lock
        extra: list[str] = []
        if state_dir is not None:
            sd = Path(state_dir).absolute()
            if sd != self.project_dir and sd.is_relative_to(self.project_dir):
                extra.append(sd.relative_to(self.project_dir).as_posix())
        self.ignored = IgnoreRules(ignore, extra_prefixes=extra)
        self.debounce_ms = debounce_ms
        self.step_ms = min(step_ms, debounce_ms)
        self.max_read = max_read
        self.on_synced = on_synced
        self.initial_scan = initial_scan
        self.force_polling = force_polling
        self.ready_timeout = ready_timeout
        self.ready = asyncio.Event()
        self.echoes = 0  # events whose bytes matched the state (the sidecar's own writes)
        self.reported = 0  # paths reported as local changes
        self.batches = 0
        self._root = str(self.project_dir)
        self._probe: str | None = None
        self._probe_seen = asyncio.Event()

    # -- decisions --

    def relative(self, abs_path: str) -> str | None:
        """The project-relative path of abs_path, or None outside the project."""
        if not abs_path.startswith(self._root + os.sep):
            return None
        return abs_path[len(self._root) + 1 :].replace(os.sep, "/")

    def accepts(self, _change: watchfiles.Change, abs_path: str) -> bool:
        """watchfiles filter: False for ignored paths (and the readiness probe)."""
        if abs_path == self._probe:
            self._probe_seen.set()
            return False
        rel = self.relative(abs_path)
        return rel is not None and bool(rel) and not self.ignored(rel)

    async def examine(self, rel: str) -> LocalChange | None:
        """Take the lock and compare rel with the state (see `examine`)."""
        async with self.lock:
            return await self.examine_locked(rel)

    async def examine_locked(self, rel: str) -> LocalChange | None:
        """Compare rel with the state; the caller holds `lock`."""
        change, data = await compare(self.project_dir, rel, self.state, self.max_read)
        if change is None:
            self.echoes += 1
            known = self.state.get(rel)
            if self.on_synced is not None and data is not None and known is not None:
                self.on_synced(rel, data, str(known.sha256))
        return change

    async def filter_changed(self, paths: Iterable[str]) -> dict[str, LocalChange]:
        """The paths (expanded through directories) that hold local changes, with the verdict
        (bytes and sha256) LocalSync uses instead of reading them again."""
        out: dict[str, LocalChange] = {}
        for rel in sorted(self._expand(paths)):
            change = await self.examine(rel)
            if change is not None:
                out[rel] = change
        self.reported += len(out)
        return out

    async def scan(self) -> dict[str, LocalChange]:
        """Compare the whole tree with the state; the paths that hold local changes."""
        candidates = set(await asyncio.to_thread(self._walk, ""))
        candidates.update(p for p, s in self.state.items() if not s.deleted)
        return await self.filter_changed(candidates)

    # -- watching --

    def __aiter__(self) -> AsyncIterator[dict[str, LocalChange]]:
        return self.changes()

    async def changes(self) -> AsyncIterator[dict[str, LocalChange]]:
        """Watch until cancelled; yield each non-empty batch of local changes (path: verdict).

        `ready` is set once events are flowing (a probe file was seen). Raises whatever
        watchfiles raises (the project directory vanished, ...).
        """
        queue: asyncio.Queue[set[str] | BaseException] = asyncio.Queue()
        stop = asyncio.Event()
        reader = asyncio.create_task(self._read(queue, stop), name="watcher-read")
        try:
            await self._arm(reader)
            if self.initial_scan:
                found = await self.scan()
                if found:
                    yield found
            while True:
                batch = await queue.get()
                if isinstance(batch, BaseException):
                    raise batch
                while not queue.empty():  # coalesce what piled up while we were busy
                    more = queue.get_nowait()
                    if isinstance(more, BaseException):
                        raise more
                    batch |= more
                found = await self.filter_changed(batch)
                if found:
                    yield found
        finally:
            stop.set()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.ready.clear()

    async def _read(
        self, queue: asyncio.Queue[set[str] | BaseException], stop: asyncio.Event
    ) -> None:
        try:
            import watchfiles  # here, not at the top: see the TYPE_CHECKING import

            async for raw in watchfiles.awatch(
                self.project_dir,
                watch_filter=self.accepts,
                debounce=self.debounce_ms,
                step=self.step_ms,
                stop_event=stop,
                force_polling=self.force_polling,
                poll_delay_ms=max(self.debounce_ms, 50),
                ignore_permission_denied=True,
            ):
                rels = {r for _, p in raw if (r := self.relative(p))}
                if rels:
                    self.batches += 1
                    queue.put_nowait(rels)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            queue.put_nowait(exc)

    async def _arm(self, reader: asyncio.Task[None]) -> None:
        """Write a probe file until the watcher reports it: from then on no event is missed."""
        state_dir = self.project_dir / STATE_DIR_NAME
        name = f".watch-probe{fsio.TMP_MARKER}{secrets.token_hex(4)}"
        probe = (state_dir if state_dir.is_dir() else self.project_dir) / name
        self._probe = str(probe)
        self._probe_seen.clear()
        deadline = time.monotonic() + self.ready_timeout
        try:
            while not self._probe_seen.is_set():
                if reader.done():
                    return  # the reader failed; the consumer sees its exception
                if time.monotonic() > deadline:
                    log.warning("watcher.not_confirmed", timeout=self.ready_timeout)
                    break
                probe.write_bytes(secrets.token_bytes(8))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._probe_seen.wait(), timeout=max(0.05, 3 * self.debounce_ms / 1000)
                    )
        finally:
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()
        self.ready.set()
        log.info("watcher.ready", project_dir=str(self.project_dir), debounce_ms=self.debounce_ms)

    # -- helpers --

    def _expand(self, paths: Iterable[str]) -> set[str]:
        """Directories become the files under them, plus known files under them (deletes)."""
        out: set[str] = set()
        known: list[str] | None = None
        for rel in paths:
            if not rel or self.ignored(rel):
                continue
            target = self.project_dir / rel
            try:
                st = os.lstat(target)
            except OSError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                out.update(self._walk(rel))
            elif st is not None or self.state.get(rel) is not None:
                out.add(rel)
                continue
            else:
                out.add(rel)
            # A directory appeared or vanished: its known files may have gone with it.
            if known is None:
                known = sorted(p for p, s in self.state.items() if not s.deleted)
            prefix = rel + "/"
            i = bisect.bisect_left(known, prefix)
            while i < len(known) and known[i].startswith(prefix):
                out.add(known[i])
                i += 1
        return out

    def _walk(self, rel_dir: str) -> list[str]:
        found: list[str] = []
        base = self.project_dir / rel_dir if rel_dir else self.project_dir
        for dirpath, dirnames, filenames in os.walk(base):
            rel_base = os.path.relpath(dirpath, self._root).replace(os.sep, "/")
            rel_base = "" if rel_base == "." else rel_base
            dirnames[:] = [
                d for d in dirnames if not self.ignored(f"{rel_base}/{d}" if rel_base else d)
            ]
            for name in filenames:
                rel = f"{rel_base}/{name}" if rel_base else name
                if not self.ignored(rel):
                    found.append(rel)
        return found
