"""Publishing a staged snapshot: converge the project directory to it and record it.

`SnapshotWriter` (sidecar/snapshot/writer.py) decodes and verifies a stream into a private
staging directory; `publish_staged` then moves that tree into the project directory, removes
what the previous snapshot had and this one has not, fixes modes, and records the new tree
through the `ProjectTree`. An older snapshot never rolls a path back (sidecar/tree/project.py
`snapshot_keeps`). `verify_tree` re-checks a published tree against the state.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.errors import SidecarError
from sidecar.snapshot.frames import DECOMPRESS_CHUNK
from sidecar.snapshot.manifest import Manifest
from sidecar.tree.paths import STATE_DIR_NAME, check_rel_path, is_reserved
from sidecar.tree.project import ProjectTree, snapshot_keeps
from sidecar.tree.state import FileState, StateStore

__all__ = ["META_DIRS", "PublishResult", "StagedTree", "publish_staged", "verify_tree"]

log = structlog.get_logger(component="extract")

_SYMLINK_MODE = stat.S_IFLNK | 0o777  # FileState.mode marker for symlinks
# State meta: the directories of the published snapshot (the file rows do not imply the empty
# ones), so that the next publish can remove those the new snapshot no longer has.
META_DIRS = "snapshot_dirs"


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What `publish_staged` (`SnapshotWriter.publish`) changed in the project directory."""

    manifest: Manifest
    written: int  # files and symlinks moved into place
    unchanged: int  # files already holding the right bytes (at most a mode fix)
    removed: int  # paths of the previous tree deleted
    removed_dirs: int  # directories of the previous snapshot deleted (empty, not in this one)
    bytes_written: int
    seconds: float
    kept: int = 0  # paths the state knows at a newer version than the snapshot's


@dataclass(slots=True)
class StagedTree:
    """A complete, verified staging directory as `SnapshotWriter.publish` hands it over."""

    project_dir: Path
    staging_dir: Path
    manifest: Manifest
    kinds: dict[str, str]  # path -> "d" | "f" | "l" as staged
    unchanged: set[str]  # files already on disk with the right bytes (not in staging)
    reserved_top: str | None  # the project's top-level entry holding staging, if inside
    manifest_sha256: str
    snapshot_sha256: str | None  # of the compressed stream, when it was checked
    bytes_written: int


def publish_staged(
    staged: StagedTree,
    tree: ProjectTree,
    meta: Mapping[str, object] | None,
    *,
    moved: Callable[[], None],
) -> PublishResult:
    """Converge project_dir to the staged tree, record it through `tree`, remove staging.

    `moved` is called once the staged tree is in place, before the state rows are built (the
    writer then marks itself published and drops its own bookkeeping).

    The caller holds `tree.lock` (sidecar/snapshot/hydrate.py does). Each file appears by
    one atomic rename; files of the previous tree (per the state) that the snapshot no
    longer has are deleted, and so are the directories the previous snapshot had
    (`state.meta(META_DIRS)`) and this one has not, once empty; untracked files are left
    alone unless they are in the way (a directory holding one stays). `.sidecar` is never
    touched. `meta` is recorded in the same transaction as the tree. A path whose recorded
    version is newer than the snapshot's (or a tombstone as new), or that was created
    after the snapshot's seq, is kept as it is (sidecar/tree/project.py `snapshot_keeps`):
    an older snapshot never rolls a path back.
    """
    manifest = staged.manifest
    files = manifest.files
    t0 = time.monotonic()
    state = tree.state
    project = staged.project_dir
    project.mkdir(parents=True, exist_ok=True)
    new_dirs = sorted(p for p, k in staged.kinds.items() if k == "d")
    snap_seq = manifest.seq
    # Only a path the state has can be kept: walk its rows, not every staged path (a first
    # hydration has none, and 25,000 calls cost about 12 ms of the publish).
    kinds = staged.kinds
    kept = {
        p
        for p, known in state.items()
        if kinds.get(p, "d") != "d" and snapshot_keeps(known, files[p].version, snap_seq)
    }
    written = unchanged = removed = removed_dirs = 0
    # Write-ahead: the state knows every directory this publish may create before it creates
    # one, so that a publish killed half-way leaves none that a later one cannot remove.
    recorded = state.meta(META_DIRS)
    known = {d for d in recorded if isinstance(d, str)} if isinstance(recorded, list) else set()
    if not known.issuperset(new_dirs):
        state.update(meta={META_DIRS: sorted(known.union(new_dirs))})
    if not kept and _project_is_empty(project, staged.reserved_top):
        # Fresh project: moving the top-level entries moves the whole tree.
        for entry in sorted(staged.staging_dir.iterdir()):
            entry.rename(project / entry.name)
        written = sum(1 for k in staged.kinds.values() if k != "d")
    else:
        for d in new_dirs:
            _ensure_real_dir(project / d)
        for path, kind in staged.kinds.items():
            if kind == "d":
                continue
            dst = project / path
            if path in kept:
                continue
            if path in staged.unchanged:
                unchanged += 1
                try:
                    st = dst.lstat()
                except FileNotFoundError:
                    log.warning("extract.unchanged_file_vanished", path=path)
                    continue
                mode = files[path].mode
                if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                    dst.chmod(mode)
                continue
            _clear_dir(dst)
            _move(staged.staging_dir / path, dst)
            written += 1
        removed = _remove_stale(staged, state, snap_seq)
        removed_dirs = _remove_stale_dirs(staged, state.meta(META_DIRS))
    # The staged tree has been moved: drop the bookkeeping before building the state rows
    # (lower peak memory; a second publish() is refused anyway).
    moved()
    staged.kinds, staged.unchanged = {}, set()
    _record(tree, staged, kept, {**(meta or {}), META_DIRS: new_dirs})
    del new_dirs
    shutil.rmtree(staged.staging_dir, ignore_errors=True)
    seconds = round(time.monotonic() - t0, 3)
    log.info(
        "extract.published",
        snapshot_id=manifest.snapshot_id,
        written=written,
        unchanged=unchanged,
        removed=removed,
        removed_dirs=removed_dirs,
        kept=len(kept),
        seconds=seconds,
    )
    return PublishResult(
        manifest=manifest,
        written=written,
        unchanged=unchanged,
        removed=removed,
        removed_dirs=removed_dirs,
        bytes_written=staged.bytes_written,
        seconds=seconds,
        kept=len(kept),
    )


def _project_is_empty(project: Path, reserved_top: str | None) -> bool:
    reserved = {STATE_DIR_NAME, reserved_top}
    with os.scandir(project) as it:
        return all(e.name in reserved for e in it)


def _remove_stale(staged: StagedTree, state: StateStore, snap_seq: int | None) -> int:
    files, kinds, project = staged.manifest.files, staged.kinds, staged.project_dir
    removed = 0
    prune: set[str] = set()
    for path, known in state.live().items():
        if path in files or kinds.get(path) == "d" or is_reserved(path):
            continue
        if snapshot_keeps(known, None, snap_seq):
            continue  # created after the snapshot was made
        if not _parents_are_dirs(project, path):
            continue  # an ancestor was replaced by a file or symlink: already gone
        dst = project / path
        try:
            if stat.S_ISDIR(dst.lstat().st_mode):
                continue
            dst.unlink()
            removed += 1
        except FileNotFoundError:
            continue
        parent = path.rpartition("/")[0]
        while parent and parent not in prune:
            prune.add(parent)
            parent = parent.rpartition("/")[0]
    for d in sorted(prune, key=lambda p: p.count("/"), reverse=True):
        if kinds.get(d) == "d" or is_reserved(d):
            continue
        try:
            (project / d).rmdir()
        except OSError:
            pass  # not empty (untracked files) or already gone
    return removed


def _remove_stale_dirs(staged: StagedTree, old: object) -> int:
    """rmdir the previous snapshot's directories that this one does not have, deepest first;
    one still holding anything (an untracked file) stays, and so do its parents."""
    if not isinstance(old, list):
        return 0  # a state from before directories were recorded
    kinds, top, removed = staged.kinds, staged.reserved_top, 0
    project = staged.project_dir
    stale = [d for d in old if isinstance(d, str) and d not in kinds]
    for d in sorted(stale, key=lambda p: p.count("/"), reverse=True):
        if is_reserved(d) or d.partition("/")[0] == top:
            continue
        if not _parents_are_dirs(project, d):
            continue  # an ancestor is now a file or symlink: d is already gone
        try:
            (project / d).rmdir()  # a symlink is refused (ENOTDIR): never followed
        except OSError:
            continue  # not empty, already gone, or not a directory
        removed += 1
    return removed


def _record(
    tree: ProjectTree,
    staged: StagedTree,
    kept: set[str],
    extra: Mapping[str, object],
) -> None:
    manifest = staged.manifest
    files = manifest.files
    state = tree.state
    seq = manifest.seq
    old_items = state.items()  # taken now, before replace_all swaps the mirror

    def rows() -> Iterator[tuple[str, FileState]]:
        # A generator: replace_all builds its own dict, so no second copy of the tree.
        for path, e in files.items():
            old = state.get(path) if path in kept else None
            if old is not None:
                yield path, old
                continue
            mode = _SYMLINK_MODE if e.target is not None else e.mode
            yield path, FileState(e.version, e.sha256, e.size, mode, seq)
        for path, old in old_items:
            if path in files:
                continue
            if old.deleted or snapshot_keeps(old, None, seq):
                yield path, old
            else:
                yield path, FileState(old.version, None, 0, old.mode, seq)

    meta: dict[str, object] = {
        "snapshot_id": manifest.snapshot_id,
        "project_id": manifest.project_id,
        "created_at": manifest.created_at,
        "manifest_sha256": staged.manifest_sha256,
        **extra,
    }
    if staged.snapshot_sha256 is not None:
        meta["snapshot_sha256"] = staged.snapshot_sha256
    tree.record_snapshot(rows(), meta, seq)


def _ensure_real_dir(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        path.mkdir(0o755)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    path.unlink()  # a file or symlink where the snapshot has a directory
    path.mkdir(0o755)


def _clear_dir(path: Path) -> None:
    """Remove a real directory that stands where a file or symlink must go."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)


def _move(src: Path, dst: Path) -> None:
    try:
        src.replace(dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Staging on another filesystem: copy next to the target, then rename atomically.
        tmp = dst.with_name(f".{dst.name}.sidecar-{os.urandom(4).hex()}")
        if src.is_symlink():
            tmp.symlink_to(src.readlink())
        else:
            shutil.copy2(src, tmp)
        tmp.replace(dst)
        src.unlink()


def _parents_are_dirs(root: Path, rel: str) -> bool:
    cur = root
    for part in rel.split("/")[:-1]:
        cur = cur / part
        try:
            if not stat.S_ISDIR(cur.lstat().st_mode):
                return False
        except FileNotFoundError:
            return False
    return True


def verify_tree(project_dir: Path, state: StateStore, *, workers: int = 2) -> list[str]:
    """Paths that `state` says exist but are missing or differ on disk (type, size, mode, sha256).

    A file reached through a symlinked directory counts as damaged. Hashing runs on `workers`
    threads (hashlib and reads release the GIL).
    """
    items = sorted(state.live().items())
    root = str(project_dir) + "/"
    real_dirs: set[str] = set()

    def parents_ok(path: str) -> bool:
        parent = path.rpartition("/")[0]
        if not parent or parent in real_dirs:
            return True
        cur = ""
        for part in parent.split("/"):
            cur = f"{cur}/{part}" if cur else part
            if cur not in real_dirs:
                if not stat.S_ISDIR(os.lstat(root + cur).st_mode):
                    return False
                real_dirs.add(cur)
        return True

    def is_bad(path: str, known: FileState) -> bool:
        try:
            check_rel_path(path)
            if not parents_ok(path):
                return True
            full = root + path
            st = os.lstat(full)
            if stat.S_ISLNK(known.mode):
                if not stat.S_ISLNK(st.st_mode):
                    return True
                target = os.fsencode(Path(full).readlink())
                return hashlib.sha256(target).hexdigest() != known.sha256
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_size != known.size
                or stat.S_IMODE(st.st_mode) != known.mode & 0o7777
            ):
                return True
            return _file_sha256(full, st.st_size) != known.sha256
        except (OSError, SidecarError):
            return True

    def run(part: list[tuple[str, FileState]]) -> list[str]:
        return [path for path, known in part if is_bad(path, known)]

    n = max(1, min(workers, len(items) // 64 or 1))
    if n == 1:
        return run(items)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sidecar-verify") as pool:
        parts = list(pool.map(run, [items[i::n] for i in range(n)]))
    return sorted(p for part in parts for p in part)


def _file_sha256(path: str, size: int) -> str:
    """sha256 of a regular file, read without following a symlink at the last component."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if size <= DECOMPRESS_CHUNK:
            return hashlib.sha256(os.read(fd, size + 1)).hexdigest()
        h = hashlib.sha256()
        while chunk := os.read(fd, DECOMPRESS_CHUNK):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)
