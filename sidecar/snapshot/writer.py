"""Streaming snapshot extraction: zstd + tar into a private staging dir, verified, then published.

`SnapshotWriter` takes the compressed `.tar.zst` bytes chunk by chunk, checks every member against
the manifest (the first member) and the limits while writing into staging, and `publish()` hands
the staged tree to sidecar/snapshot/publish.py, which converges the project directory to it.
Nothing outside the staging directory is touched before `publish()`. The zstd frame glue is in
sidecar/snapshot/frames.py, the manifest's admission checks in sidecar/snapshot/manifest.py.

`SnapshotWriter` stays one class of about 470 lines: its TarHandler callbacks (`begin`, `whole`,
`data`, `end`) are the per-member hot loop, and they share the parser state (kinds, the
manifest's entries, the batch of file-system ops) through plain attributes; spreading that over
more objects adds an attribute hop per member. They run in the helper thread of `_Pipe`, with
`_FsWriter.execute`, the other half of the hot loop.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
import zstandard

from sidecar.config import Limits
from sidecar.errors import SnapshotInvalidError, UnsafePathError
from sidecar.snapshot.frames import DECOMPRESS_CHUNK, MAX_WINDOW_BYTES, Frames, Sink, window_error
from sidecar.snapshot.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    admit_manifest,
    is_plain_path,
)
from sidecar.snapshot.publish import PublishResult, StagedTree, publish_staged
from sidecar.snapshot.tarstream import BLOCK, MemberType, TarMember, TarReader
from sidecar.tree.paths import check_rel_path, is_reserved
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import StateStore

__all__ = ["ManifestInPlaceError", "SnapshotWriter", "new_staging_dir"]

log = structlog.get_logger(component="extract")
_sha256 = hashlib.sha256

MAX_EXT_BYTES = 64 * 1024  # pax / GNU long-name data per member (paths are at most 4 KiB)
MEMBER_OVERHEAD = 4096  # decompressed bytes allowed per member beyond its data (header, pax)
DIR_OVERHEAD = 2048  # decompressed bytes allowed per directory member
EXTRA_DIRS = 10_000  # directory members allowed beyond the manifest's own parent dirs
QUEUE_DEPTH = 4  # decompressed chunks queued for the parsing and writing thread
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# How `tar -C dir .` names the root (the tar reader strips a directory's trailing slash).
_ROOT_NAMES = frozenset({".", "./"})


def new_staging_dir(state_dir: Path) -> Path:
    """A fresh, not yet existing `state_dir/staging-<random>` path for one SnapshotWriter."""
    return state_dir / f"staging-{os.urandom(6).hex()}"


class ManifestInPlaceError(Exception):
    """The manifest is byte for byte `known_manifest_sha256` (the tree in place): the writer
    stops there, so that the caller can verify the tree instead of downloading it again."""


# File-system operations the parser hands to the writer, as tuples (code, ...):
#   (_WHOLE, path, mode, data, sha256)  check data, create path with it, close it
#   (_OPEN, path, mode, sha256)         create path; (_DATA, data) append; (_CLOSE,) close, check
#   (_MKDIR, path)                      (_SYMLINK, path, target)
_WHOLE, _OPEN, _DATA, _CLOSE, _MKDIR, _SYMLINK = range(6)
_CLOSE_OP = (_CLOSE,)


class _Pipe:
    """Hands decompressed chunks to one helper thread that parses them and does the file work.

    The calling thread downloads and decompresses: http.client's reads and zstd release the GIL
    for long stretches and need it back only once per chunk. The helper parses the tar stream,
    hashes and makes the system calls: it needs the GIL back after every short call (open,
    write, close), so it must be the thread that also runs the Python parser, or it would wait
    behind the parser at each of them (the layout before: a quarter of the helper's time went
    to such waits, and the two threads added up to about one core). The queue is small and
    bounded (QUEUE_DEPTH chunks of at most DECOMPRESS_CHUNK bytes), so memory stays bounded;
    the helper's first error is kept and raised by `check()`/`close()`.
    """

    def __init__(self, execute: Callable[[bytes], None]) -> None:
        self._execute = execute
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        # Free slots as tokens: SimpleQueue blocks in C, cheaper than threading.Semaphore.
        self._slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(QUEUE_DEPTH):
            self._slots.put(None)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._discard = False
        self._stopped = False

    def put(self, batch: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sidecar-extract", daemon=True)
            self._thread.start()
        self._slots.get()
        self._queue.put(batch)

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait until every batch was performed; raise the helper's first error."""
        self.stop(discard=False)
        self.check()

    def stop(self, *, discard: bool = True) -> None:
        if self._thread is not None and not self._stopped:
            self._stopped = True
            self._discard = discard
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        get, release, execute = self._queue.get, self._slots.put, self._execute
        while (batch := get()) is not None:
            if self._error is None and not self._discard:
                try:
                    execute(batch)
                except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                    self._error = exc
            del batch  # drop the chunk references before the producer may queue another
            release(None)


class _FsWriter:
    """Performs the file-system operations the parser emits, in order, and hashes every file it
    writes: content that does not match the manifest's sha256 raises SnapshotInvalidError (a
    whole file before it is created, a file that spans chunks when it is complete).
    """

    def __init__(self, root: str, umask: int) -> None:
        self._root = root
        self._umask = umask
        # The file being written, carried from one batch to the next.
        self._fd = -1
        self._hash: Any = None
        self._path = ""
        self._sha = ""

    def close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def execute(self, batch: list[tuple[Any, ...]]) -> None:
        root, umask, flags, sha256 = self._root, self._umask, _OPEN_FLAGS, _sha256
        write, open_, close = os.write, os.open, os.close
        fd, h = self._fd, self._hash
        path = self._path
        try:
            for op in batch:
                code = op[0]
                if code == _WHOLE:
                    _, path, mode, data, sha = op
                    if sha256(data).hexdigest() != sha:
                        raise _digest_error(path)
                    fd = open_(root + path, flags, mode)
                    if mode & umask:  # the umask took bits the manifest wants
                        os.fchmod(fd, mode)
                    done = write(fd, data)
                    while done < len(data):
                        done += write(fd, data[done:])
                    close(fd)
                    fd = -1
                elif code == _DATA:
                    data = op[1]
                    h.update(data)
                    done = write(fd, data)
                    while done < len(data):
                        done += write(fd, data[done:])
                elif code == _OPEN:
                    _, path, mode, sha = op
                    fd = open_(root + path, flags, mode)
                    if mode & umask:
                        os.fchmod(fd, mode)
                    h = sha256()
                    self._path, self._sha = path, sha
                elif code == _CLOSE:
                    close(fd)
                    fd = -1
                    if h.hexdigest() != self._sha:
                        raise _digest_error(self._path)
                elif code == _MKDIR:
                    path = op[1]
                    os.mkdir(root + path, 0o755)  # noqa: PTH102 - hot loop: no Path objects
                else:
                    path = op[1]
                    os.symlink(op[2], root + path)  # noqa: PTH211 - same
        except OSError as exc:
            if exc.filename is None:  # a write on a descriptor: name the file (ENOSPC...)
                exc.filename = root + path
            raise
        finally:
            self._fd, self._hash = fd, h


def _digest_error(path: str) -> SnapshotInvalidError:
    return SnapshotInvalidError(f"{path!r}: content does not match the manifest sha256")


class _OnDisk:
    """Whether the project already holds a file's bytes: the state says so (same sha256, not
    listed as damaged), its parents are real directories and the file is a regular one of the
    right size. Such a file is hashed from the stream but not rewritten."""

    def __init__(self, project_dir: Path, state: StateStore, damaged: Collection[str]) -> None:
        self._project_dir = project_dir
        self._state = state
        self._damaged = frozenset(damaged)
        self._real_dirs: set[str] = set()  # project dirs checked to be real directories

    def has(self, path: str, entry: FileEntry) -> bool:
        if path in self._damaged:
            return False
        known = self._state.get(path)
        if known is None or known.sha256 != entry.sha256:
            return False
        if not self._real_parents(path):
            return False
        try:
            st = (self._project_dir / path).lstat()
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == entry.size

    def _real_parents(self, path: str) -> bool:
        """True when every parent of path in the project is a real directory (no symlinks)."""
        parent = path.rpartition("/")[0]
        if not parent or parent in self._real_dirs:
            return True
        cur = ""
        for part in parent.split("/"):
            cur = f"{cur}/{part}" if cur else part
            if cur in self._real_dirs:
                continue
            try:
                if not stat.S_ISDIR((self._project_dir / cur).lstat().st_mode):
                    return False
            except OSError:
                return False
            self._real_dirs.add(cur)
        return True


class SnapshotWriter:
    """Consumes the compressed .tar.zst bytes chunk by chunk (sync; run it in a worker thread).

    Decompresses, parses the tar stream, writes regular files into `staging_dir` (same filesystem
    as `project_dir`), hashes every file and checks it against the manifest (the first member);
    enforces `limits` from the manifest before any file body is written, and bounds the
    decompressed bytes by what the manifest declares. Files that `state` says already hold the
    right bytes (and whose size on disk matches) are hashed but not rewritten, unless listed in
    `damaged`. With `known_manifest_sha256` (the manifest of the tree in place), a manifest that
    is byte for byte that one raises ManifestInPlaceError from `feed` (the caller verifies the
    tree instead of downloading it again). `feed`/`finish` raise SnapshotInvalidError (UnsafePathError for paths) or
    QuotaExceededError; after an error the writer is dead and `abort()` removes staging.
    Usable as a context manager: leaving the block without `publish()` aborts.

    Internally the calling thread decompresses (and parses the manifest), while one helper
    thread parses the rest, hashes and performs the system calls (create, write, close, mkdir); an error found there (a refused
    member, a sha256 mismatch, a full disk) surfaces on the next `feed()` or in `finish()`.
    `write_thread=False` does everything in the calling thread. Not thread-safe: call every
    method from one thread (the one feeding it).
    """

    def __init__(
        self,
        project_dir: Path,
        staging_dir: Path,
        limits: Limits,
        *,
        state: StateStore | None = None,
        expected_sha256: str | None = None,
        project_id: str | None = None,
        damaged: Collection[str] = (),
        write_thread: bool = True,
        known_manifest_sha256: str | None = None,
    ) -> None:
        self.project_dir = Path(project_dir)
        self.staging_dir = Path(staging_dir)
        self.limits = limits
        self.manifest: Manifest | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.files_done = 0
        self._expected_sha = expected_sha256.lower() if expected_sha256 else None
        self._project_id = project_id
        self._known_manifest = known_manifest_sha256
        self._sha_in = hashlib.sha256() if expected_sha256 else None
        self._error: BaseException | None = None
        self._finished = False
        self._published = False
        self._started = time.monotonic()

        self.staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(os.scandir(self.staging_dir)):
            raise ValueError(f"staging dir {self.staging_dir} is not empty")
        self._root = str(self.staging_dir) + "/"
        self._reserved_top = _staging_top(self.project_dir, self.staging_dir)

        self._frames = Frames()
        self._tar = TarReader(self, max_ext_bytes=MAX_EXT_BYTES)
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
        sink: Any = Sink(self._on_output)  # anything with write(); typed as IO[bytes] upstream
        self._zw: Any = dctx.stream_writer(sink, write_size=DECOMPRESS_CHUNK)
        self._budget = MAX_MANIFEST_BYTES + 2 * MAX_EXT_BYTES + 4 * BLOCK

        # Parser-side state (the helper thread's, or the calling thread's without one).
        self._files: Mapping[str, FileEntry] = {}
        self._kinds: dict[str, str] = {}  # path -> "d" | "f" | "l" as staged
        self._explicit_dirs: set[str] = set()
        self._unchanged: set[str] = set()
        self._max_dirs = 0
        self._root_seen = False  # a `./` directory member was read
        self._manifest_buf: bytearray | None = None
        self._manifest_sha = ""
        self._in_file = False  # inside a regular file's data (begin/data/end)
        self._skip = False  # ... whose bytes are already on disk: hash here, do not write
        self._hash: Any = None  # ... its running sha256 (only when skipped)
        self._cur: FileEntry | None = None
        # The state knows files: worth asking whether each one is already in place.
        self._on_disk = (
            _OnDisk(self.project_dir, state, damaged)
            if state is not None and any(True for _ in state.items())
            else None
        )
        self._bytes_written = 0
        self._ops: list[tuple[Any, ...]] = []  # file-system work for the current chunk
        self._fs = _FsWriter(self._root, _current_umask())
        self._parsed = 0  # decompressed bytes parsed (bytes_out runs ahead with the helper)
        self._pipe = _Pipe(self._parse) if write_thread else None

    # -- context manager --

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._published:
            self.abort()

    # -- streaming input --

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Consume the next compressed bytes; raises as soon as something is wrong."""
        if self._error is not None:
            raise SnapshotInvalidError("snapshot writer already failed") from self._error
        if self._finished:
            raise SnapshotInvalidError("data after the end of the snapshot stream")
        mv = memoryview(chunk)
        self.bytes_in += len(mv)
        try:
            if self._pipe is not None:
                self._pipe.check()
            if self._sha_in is not None:
                self._sha_in.update(mv)
            self._frames.feed(mv)
            self._zw.write(mv)
        except zstandard.ZstdError as exc:
            self._fail(exc)
            if "too much memory" in str(exc):  # a single-segment frame (window = its size)
                raise window_error(None) from None
            raise SnapshotInvalidError(f"corrupt snapshot: {exc}") from None
        except BaseException as exc:
            self._fail(exc)
            raise

    def finish(self) -> Manifest:
        """End of stream: raise unless the stream was complete and every promised file arrived."""
        if self._error is not None:
            raise SnapshotInvalidError("snapshot writer already failed") from self._error
        if self._finished:
            assert self.manifest is not None
            return self.manifest
        try:
            manifest = self._check_complete()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._finished = True
        log.info(
            "extract.staged",
            files=self.files_done,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            seconds=round(time.monotonic() - self._started, 3),
        )
        return manifest

    def _check_complete(self) -> Manifest:
        if self._pipe is not None:
            self._pipe.close()  # the helper's own error, if any, is the real cause
        self._zw = None  # the stream has ended: free the decoder's window now
        if self.bytes_in == 0:
            raise SnapshotInvalidError("snapshot is empty")
        if not self._frames.at_boundary:
            raise SnapshotInvalidError("snapshot truncated: the zstd stream ends mid-frame")
        self._tar.close()
        if self.manifest is None:
            raise SnapshotInvalidError(f"snapshot has no {MANIFEST_NAME} manifest")
        missing = [
            p
            for p, e in self._files.items()
            if self._kinds.get(p) != ("l" if e.target is not None else "f")
        ]
        if missing:
            raise SnapshotInvalidError(
                f"{len(missing)} file(s) listed in the manifest are missing from the "
                f"archive, first {min(missing)!r}"
            )
        if self._sha_in is not None and self._sha_in.hexdigest() != self._expected_sha:
            raise SnapshotInvalidError("snapshot sha256 does not match SNAPSHOT_SHA256")
        return self.manifest

    def abort(self) -> None:
        """Stop the helper thread and remove the staging dir; the project dir is untouched."""
        self._stop()
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._stop()

    def _stop(self) -> None:
        if self._pipe is not None:
            self._pipe.stop()
        self._fs.close_fd()

    # -- decompressed bytes --

    def _on_output(self, data: bytes) -> None:
        """A decompressed chunk: hand it to the helper thread (or parse it here)."""
        self.bytes_out += len(data)
        pipe = self._pipe
        if pipe is None or self.manifest is None:
            # Until the manifest is known nothing else can be checked, and a manifest that is
            # the one in place must stop the download at once (ManifestInPlaceError): here.
            self._parse(data)
        else:
            pipe.check()  # the helper failed: stop decompressing (a bomb ends here)
            pipe.put(data)

    def _parse(self, data: bytes) -> None:
        """Parse one decompressed chunk and perform the file-system work it implies."""
        self._parsed += len(data)
        if self._parsed > self._budget:
            if self.manifest is None:
                raise SnapshotInvalidError("snapshot does not start with a bounded manifest")
            raise SnapshotInvalidError(
                f"decompressed stream exceeds what the manifest declares ({self._budget} bytes)"
            )
        self._tar.feed(data)
        ops = self._ops
        if ops:
            self._ops = []
            self._fs.execute(ops)

    # -- TarHandler --

    def begin(self, member: TarMember) -> None:
        """TarHandler: a member starts (called by the tar reader)."""
        mtype = member.type
        if member.name in _ROOT_NAMES:
            self._root_member(member)
            return
        if self.manifest is None:
            self._begin_manifest(member)
            return
        if mtype is MemberType.FILE:
            entry = self._files.get(member.name)  # manifest paths are already validated
            if entry is not None and entry.target is None and member.name not in self._kinds:
                self._begin_file(member.name, entry, member.size)
                return
            path = self._checked(member.name)
            if member.name.endswith("/"):
                raise SnapshotInvalidError(f"regular file member with a directory name: {path!r}")
            entry = self._files.get(path)
            if path in self._kinds:
                raise self._clash(path, "f")
            if entry is None or entry.target is not None:
                what = "a symlink" if entry is not None else "not in the manifest"
                raise SnapshotInvalidError(f"archive file {path!r} is {what}")
            self._begin_file(path, entry, member.size)
            return
        path = self._checked(member.name)
        if mtype is MemberType.DIR:
            self._add_dir(path)
        elif mtype is MemberType.SYMLINK:
            self._add_symlink(path, member)
        elif mtype is MemberType.HARDLINK:
            raise SnapshotInvalidError(f"hard link {path!r} -> {member.linkname!r} is not allowed")
        elif mtype in (MemberType.CHARDEV, MemberType.BLOCKDEV, MemberType.FIFO):
            raise SnapshotInvalidError(f"{path!r} is a {mtype.value}; not allowed in a snapshot")
        else:
            raise SnapshotInvalidError(
                f"{path!r} has unsupported tar type {member.typeflag!r}; not allowed"
            )

    def whole(self, member: TarMember, data: memoryview) -> None:
        """TarHandler fast path: a member whose data is all in the current chunk."""
        name = member.name
        entry = self._files.get(name)
        if (
            entry is None
            or member.type is not MemberType.FILE
            or entry.target is not None
            or name in self._kinds
        ):
            self.begin(member)
            self.data(data)
            self.end()
            return
        if not self._claim_file(name, entry, member.size):
            self._ops.append((_WHOLE, entry.path, entry.mode, data, entry.sha256))
        elif _sha256(data).hexdigest() != entry.sha256:  # already on disk: only verify
            raise _digest_error(name)
        self.files_done += 1

    def data(self, chunk: memoryview) -> None:
        """TarHandler: member bytes."""
        if self._in_file:
            if self._hash is not None:
                self._hash.update(chunk)
            if not self._skip:
                self._ops.append((_DATA, chunk))
        elif self._manifest_buf is not None:
            self._manifest_buf += chunk

    def end(self) -> None:
        """TarHandler: the member is complete."""
        if self._in_file:
            self._end_file()
        elif self._manifest_buf is not None:
            raw = self._manifest_buf
            self._manifest_buf = None
            self._set_manifest(raw)

    @staticmethod
    def _checked(name: str) -> str:
        path = name if is_plain_path(name) else check_rel_path(name)
        if is_reserved(path) or path == MANIFEST_NAME:
            raise UnsafePathError(f"archive member uses a reserved path: {path!r}")
        return path

    def _root_member(self, member: TarMember) -> None:
        # `tar -C dir .` (GNU tar, bsdtar) archives the root itself as `./`: a directory member
        # naming the project root says nothing that publishing does not already do. Anything
        # else under that name (a file, a link) could only mean "replace the root": refused.
        if member.type is not MemberType.DIR:
            raise UnsafePathError(
                f"archive member {member.name!r} names the project root and is a "
                f"{member.type.value}, not a directory"
            )
        if self._root_seen:
            raise SnapshotInvalidError("duplicate directory member for the project root '.'")
        self._root_seen = True

    def _begin_manifest(self, member: TarMember) -> None:
        name = member.name.removeprefix("./")
        if name != MANIFEST_NAME or member.type is not MemberType.FILE:
            raise SnapshotInvalidError(
                f"first archive member must be the regular file {MANIFEST_NAME}, "
                f"got {member.name[:200]!r}"
            )
        if member.size > MAX_MANIFEST_BYTES:
            raise SnapshotInvalidError(f"manifest is {member.size} bytes, over 64 MiB")
        self._manifest_buf = bytearray()

    def _set_manifest(self, raw: bytearray) -> None:
        self._manifest_sha = hashlib.sha256(raw).hexdigest()
        if self._manifest_sha == self._known_manifest:
            raise ManifestInPlaceError(self._manifest_sha)
        admitted = admit_manifest(
            raw, self.limits, project_id=self._project_id, reserved_top=self._reserved_top
        )
        manifest = admitted.manifest
        files = manifest.files
        self._max_dirs = admitted.parent_dirs + EXTRA_DIRS
        self._budget = (
            self._parsed
            + admitted.archive_bytes
            + len(files) * MEMBER_OVERHEAD
            + self._max_dirs * DIR_OVERHEAD
            + (1 << 20)
        )
        self._files = files
        self.manifest = manifest
        log.debug(
            "extract.manifest",
            snapshot_id=manifest.snapshot_id,
            files=len(files),
            bytes=admitted.total_bytes,
        )

    def _begin_file(self, path: str, entry: FileEntry, size: int) -> None:
        self._skip = skip = self._claim_file(path, entry, size)
        self._cur = entry
        if skip:  # already on disk: only verify
            self._hash = _sha256()
        else:
            self._hash = None  # the writer hashes what it writes
            self._ops.append((_OPEN, entry.path, entry.mode, entry.sha256))
        self._in_file = True
        if not size:
            self._end_file()

    def _end_file(self) -> None:
        self._in_file = False
        entry = self._cur
        assert entry is not None
        if self._hash is not None and self._hash.hexdigest() != entry.sha256:
            raise _digest_error(entry.path)
        if not self._skip:
            self._ops.append(_CLOSE_OP)
        self.files_done += 1

    def _claim_file(self, path: str, entry: FileEntry, size: int) -> bool:
        """Check a regular file member against its entry; True if the disk already has it."""
        if size != entry.size:
            raise SnapshotInvalidError(
                f"{path!r}: archive has {size} bytes, the manifest says {entry.size}"
            )
        path = entry.path  # the manifest's string: do not keep the archive's copy alive
        parent = path.rpartition("/")[0]
        if parent and self._kinds.get(parent) != "d":
            self._ensure_parents(path)
        self._kinds[path] = "f"
        if self._on_disk is not None and self._on_disk.has(path, entry):
            self._unchanged.add(path)
            return True
        self._bytes_written += size
        return False

    def _add_dir(self, path: str) -> None:
        if path in self._explicit_dirs:
            raise SnapshotInvalidError(f"duplicate directory member {path!r}")
        if path in self._files:
            raise SnapshotInvalidError(f"{path!r} is both a file and a directory")
        kind = self._kinds.get(path)
        if kind is not None and kind != "d":
            raise self._clash(path, "d")
        self._explicit_dirs.add(path)
        if len(self._explicit_dirs) > self._max_dirs:
            raise SnapshotInvalidError("too many directory members for the manifest's files")
        if kind is None:
            self._ensure_parents(path)
            self._ops.append((_MKDIR, path))
            self._kinds[path] = "d"

    def _add_symlink(self, path: str, member: TarMember) -> None:
        entry = self._files.get(path)
        if entry is None or entry.target is None:
            what = "a regular file" if entry is not None else "not in the manifest"
            raise SnapshotInvalidError(f"symlink {path!r} -> {member.linkname!r} is {what}")
        if member.linkname != entry.target:
            raise SnapshotInvalidError(
                f"symlink {path!r} points to {member.linkname!r}, the manifest says "
                f"{entry.target!r}"
            )
        if path in self._kinds:
            raise self._clash(path, "l")
        self._ensure_parents(path)
        self._ops.append((_SYMLINK, path, entry.target))
        self._kinds[path] = "l"
        self.files_done += 1

    def _ensure_parents(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if not parent or self._kinds.get(parent) == "d":
            return
        cur = ""
        for part in parent.split("/"):
            cur = f"{cur}/{part}" if cur else part
            kind = self._kinds.get(cur)
            if kind == "d":
                continue
            if kind == "l":
                raise UnsafePathError(f"{path!r} would be written through the symlink {cur!r}")
            if kind == "f" or cur in self._files:
                raise SnapshotInvalidError(f"{cur!r} is both a file and a directory")
            self._ops.append((_MKDIR, cur))
            self._kinds[cur] = "d"

    def _clash(self, path: str, new: str) -> SnapshotInvalidError:
        old = self._kinds.get(path)
        if old == new:
            return SnapshotInvalidError(f"duplicate archive member {path!r}")
        if "d" in (old, new):
            return SnapshotInvalidError(f"{path!r} is both a file and a directory")
        return SnapshotInvalidError(f"{path!r} appears both as a file and a symlink")

    # -- publishing (sidecar/snapshot/publish.py) --

    def publish(self, tree: ProjectTree, meta: Mapping[str, object] | None = None) -> PublishResult:
        """Converge project_dir to the staged tree, record it through `tree`, remove staging.

        The caller holds `tree.lock`. See `publish_staged` for what is moved, removed and kept
        (an older snapshot never rolls a path back).
        """
        manifest = self.finish()
        if self._published:
            raise RuntimeError("snapshot already published")
        staged = StagedTree(
            project_dir=self.project_dir,
            staging_dir=self.staging_dir,
            manifest=manifest,
            kinds=self._kinds,
            unchanged=self._unchanged,
            reserved_top=self._reserved_top,
            manifest_sha256=self._manifest_sha,
            snapshot_sha256=self._sha_in.hexdigest() if self._sha_in is not None else None,
            bytes_written=self._bytes_written,
        )
        return publish_staged(staged, tree, meta, moved=self._moved)

    def _moved(self) -> None:
        # The staged tree has been moved: drop the bookkeeping before the state rows are built
        # (lower peak memory; a second publish() is refused anyway).
        self._published = True
        self._kinds, self._unchanged, self._explicit_dirs, self._on_disk = {}, set(), set(), None


def _staging_top(project_dir: Path, staging_dir: Path) -> str | None:
    """The project's top-level entry holding staging (the state dir), if it is inside."""
    try:
        rel = staging_dir.absolute().resolve().relative_to(project_dir.absolute().resolve())
    except (ValueError, OSError):
        return None
    return rel.parts[0] if rel.parts else None


def _current_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777  # unknown: always fchmod
