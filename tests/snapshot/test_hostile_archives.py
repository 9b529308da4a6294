"""A corpus of hostile and broken snapshots: each is refused with the right error, nothing lands
outside staging, and the project directory is exactly as it was."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.config import Limits
from sidecar.errors import ExitCode, QuotaExceededError, SnapshotInvalidError, UnsafePathError
from sidecar.snapshot.writer import SnapshotWriter, new_staging_dir
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import StateStore

from .archives import EOA, Snap, gnu_long, header, member, pad, pax, sha, zst

GOOD = {"ok.txt": b"fine\n", "dir/inner.txt": b"inner\n"}


@dataclass(frozen=True)
class Case:
    """One hostile snapshot: the compressed bytes, the error it must raise, and the limits."""

    blob: bytes
    error: type[Exception] = SnapshotInvalidError
    match: str | None = None
    limits: Limits = field(default_factory=Limits)
    expected_sha256: str | None = None


def snap(**kw: object) -> Snap:
    kw.setdefault("files", dict(GOOD))
    return Snap(**kw)  # type: ignore[arg-type]


def with_members(*members: bytes, s: Snap | None = None) -> bytes:
    """A valid snapshot of GOOD plus extra raw members before the end marker."""
    return zst((s or snap()).tar(extra=b"".join(members)))


def traversal(name: str) -> bytes:
    return with_members(member(name, b"pwned"))


def manifest_with(entries: list[dict[str, object]], members: bytes) -> bytes:
    s = snap()
    return zst(s.manifest_member(s.manifest(s.entries() + entries)) + s.members() + members + EOA)


def _bomb() -> bytes:
    # A tiny manifest, then ~200 MiB of zeros: compresses to a few KiB.
    s = snap()
    cctx_input = s.tar()[:-1024] + bytes(200 * 1024 * 1024)
    return zst(cctx_input, level=1)


def _pax_bomb() -> bytes:
    # Legal-looking directory members, each behind eight 60 KiB pax comments: ~50 MiB of
    # headers that compress to almost nothing.
    comment = pax({"comment": "c" * 60_000})
    dirs = b"".join(comment * 8 + member(f"d{i}/", typeflag=b"5") for i in range(100))
    return with_members(dirs)


def _member_longer_than_declared() -> bytes:
    s = snap(files={"a.txt": b"hello"})
    body = header("a.txt", size=5) + pad(b"hello" + b"A" * 700)
    return zst(s.manifest_member() + body + EOA)


def _symlink_then_write_through() -> bytes:
    s = snap(symlinks={"lnk": "dir"})
    return zst(s.tar(extra=member("lnk/inner.txt", b"pwned")))


def _symlink_then_dir_through() -> bytes:
    s = snap(symlinks={"lnk": "dir"})
    return zst(s.tar(extra=member("lnk/sub/", typeflag=b"5")))


def _duplicate() -> bytes:
    return with_members(member("ok.txt", b"fine\n"))


def _manifest_size_mismatch() -> bytes:
    s = snap()
    entries = [e if e["path"] != "ok.txt" else {**e, "size": 4} for e in s.entries()]
    return zst(s.manifest_member(s.manifest(entries)) + s.members() + EOA)


def _manifest_hash_mismatch() -> bytes:
    s = snap()
    entries = [e if e["path"] != "ok.txt" else {**e, "sha256": sha(b"other")} for e in s.entries()]
    return zst(s.manifest_member(s.manifest(entries)) + s.members() + EOA)


def _missing_from_archive() -> bytes:
    s = snap()
    return zst(
        s.manifest_member(
            s.manifest(
                [
                    *s.entries(),
                    {"path": "promised.txt", "size": 1, "sha256": sha(b"p"), "mode": 420},
                ]
            )
        )
        + s.members()
        + EOA
    )


def _no_manifest() -> bytes:
    return zst(snap().members() + EOA)


def _manifest_not_first() -> bytes:
    s = snap()
    return zst(member("dir/", typeflag=b"5") + s.manifest_member() + s.members() + EOA)


def _truncated_tar() -> bytes:
    return zst(snap().tar()[:-1024])


def _truncated_mid_member() -> bytes:
    s = snap(files={"big.bin": os.urandom(5000)})
    return zst(s.tar()[: -1024 - 3000])


def _bad_checksum() -> bytes:
    s = snap()
    return zst(
        s.manifest_member() + header("ok.txt", size=5, bad_checksum=True) + pad(b"fine\n") + EOA
    )


def _corrupt_zstd() -> bytes:
    blob = bytearray(snap(files={"f": os.urandom(20000)}).zst())
    for i in range(40, 60):
        blob[len(blob) // 2 + i] ^= 0xFF
    return bytes(blob)


def _hardlink() -> bytes:
    return with_members(member("hl", typeflag=b"1", linkname="ok.txt"))


def _file_and_dir() -> bytes:
    return with_members(member("ok.txt/", typeflag=b"5"))


def _nul_in_name() -> bytes:
    return with_members(pax({"path": "a\x00b"}), member("placeholder", b"x"))


def _pax_traversal() -> bytes:
    return with_members(pax({"path": "../sentinel/pwned"}), member("harmless.txt", b"pwned"))


def _gnu_longname_traversal() -> bytes:
    return with_members(gnu_long("../" * 40 + "sentinel/pwned"), member("harmless", b"pwned"))


def _symlink_not_in_manifest() -> bytes:
    return with_members(member("esc", typeflag=b"2", linkname="../sentinel"))


def _symlink_escape_in_manifest() -> bytes:
    return manifest_with(
        [
            {
                "path": "esc",
                "size": 11,
                "sha256": sha(b"../sentinel"),
                "mode": 0o777,
                "type": "symlink",
                "target": "../sentinel",
            }
        ],
        member("esc", typeflag=b"2", linkname="../sentinel"),
    )


def _absolute_symlink_in_manifest() -> bytes:
    return manifest_with(
        [
            {
                "path": "esc",
                "size": 1,
                "sha256": sha(b"/"),
                "mode": 0o777,
                "type": "symlink",
                "target": "/",
            }
        ],
        member("esc", typeflag=b"2", linkname="/"),
    )


def _symlink_chain_escape() -> bytes:
    # Each link is inside on its own; followed together, l2 leaves the root.
    links = {"dir/l1": "..", "l2": "dir/l1/.."}
    entries = [
        {
            "path": p,
            "size": len(t),
            "sha256": sha(t.encode()),
            "mode": 0o777,
            "type": "symlink",
            "target": t,
        }
        for p, t in links.items()
    ]
    members = b"".join(member(p, typeflag=b"2", linkname=t) for p, t in links.items())
    return manifest_with(entries, members)


def _manifest_traversal() -> bytes:
    return manifest_with(
        [{"path": "../pwned", "size": 5, "sha256": sha(b"pwned"), "mode": 0o644}],
        member("../pwned", b"pwned"),
    )


def _huge_manifest_header() -> bytes:
    return zst(header(".snapshot.json", size=1 << 40) + bytes(4096))


def _trailing_garbage() -> bytes:
    return zst(snap().tar() + b"\x01" * 100)


def _reserved() -> bytes:
    return with_members(member(".sidecar/state.db", b"pwned"))


def _sparse() -> bytes:
    return with_members(member("ok2.txt", b"x", typeflag=b"S"))


def _global_pax_path() -> bytes:
    return with_members(pax({"path": "../x"}, typeflag=b"g"), member("a", b"1"))


_CASES: dict[str, Callable[[], Case]] = {
    "dotdot": lambda: Case(traversal("../sentinel/pwned"), UnsafePathError),
    "inner_dotdot": lambda: Case(traversal("dir/../../sentinel/pwned"), UnsafePathError),
    "dot_dotdot": lambda: Case(traversal("./../sentinel/pwned"), UnsafePathError),
    "double_slash_absolute": lambda: Case(traversal("//tmp/pwned"), UnsafePathError),
    "absolute": lambda: Case(traversal("/tmp/sidecar-pwned"), UnsafePathError),
    "backslash": lambda: Case(traversal("..\\..\\sentinel\\pwned"), UnsafePathError),
    "empty_name": lambda: Case(traversal(""), UnsafePathError),
    "reserved_state_dir": lambda: Case(_reserved(), UnsafePathError),
    "nul_in_name": lambda: Case(_nul_in_name(), UnsafePathError, "NUL"),
    "pax_path_traversal": lambda: Case(_pax_traversal(), UnsafePathError),
    "gnu_longname_traversal": lambda: Case(_gnu_longname_traversal(), UnsafePathError),
    "manifest_path_traversal": lambda: Case(_manifest_traversal(), UnsafePathError),
    "symlink_escape_in_manifest": lambda: Case(_symlink_escape_in_manifest(), UnsafePathError),
    "absolute_symlink_in_manifest": lambda: Case(_absolute_symlink_in_manifest(), UnsafePathError),
    "symlink_chain_escape": lambda: Case(_symlink_chain_escape(), UnsafePathError, "resolves"),
    "symlink_not_in_manifest": lambda: Case(_symlink_not_in_manifest(), match="not in the manif"),
    "write_through_symlink": lambda: Case(
        _symlink_then_write_through(), match="not in the manifest"
    ),
    "dir_through_symlink": lambda: Case(
        _symlink_then_dir_through(), UnsafePathError, "through the symlink"
    ),
    "hard_link": lambda: Case(_hardlink(), match="hard link"),
    "char_device": lambda: Case(with_members(member("cdev", typeflag=b"3")), match="chardev"),
    "block_device": lambda: Case(with_members(member("bdev", typeflag=b"4")), match="blockdev"),
    "fifo": lambda: Case(with_members(member("fifo", typeflag=b"6")), match="fifo"),
    "contiguous": lambda: Case(with_members(member("c7", b"x", typeflag=b"7")), match="type"),
    "gnu_sparse": lambda: Case(_sparse(), match="sparse"),
    "global_pax_path": lambda: Case(_global_pax_path(), match="global pax"),
    "duplicate_file": lambda: Case(_duplicate(), match="duplicate"),
    "file_and_dir": lambda: Case(_file_and_dir(), match="both a file and a directory"),
    "size_disagrees": lambda: Case(_manifest_size_mismatch(), match="manifest says 4"),
    "hash_disagrees": lambda: Case(_manifest_hash_mismatch(), match="sha256"),
    "file_not_in_manifest": lambda: Case(traversal("extra.txt"), match="not in the manifest"),
    "file_missing_from_archive": lambda: Case(_missing_from_archive(), match="missing"),
    "no_manifest": lambda: Case(_no_manifest(), match="first archive member"),
    "manifest_not_first": lambda: Case(_manifest_not_first(), match="first archive member"),
    "manifest_not_json": lambda: Case(zst(snap().tar(manifest=b"{nope")), match="JSON"),
    "huge_manifest": lambda: Case(_huge_manifest_header(), match="over 64 MiB"),
    "truncated_zstd": lambda: Case(snap().zst()[:-7], match="truncated"),
    "corrupt_zstd": lambda: Case(_corrupt_zstd(), match="corrupt"),
    "not_zstd": lambda: Case(snap().tar(), match="not a zstd"),
    "empty_stream": lambda: Case(b"", match="empty"),
    "truncated_tar": lambda: Case(_truncated_tar(), match="truncated"),
    "truncated_mid_member": lambda: Case(_truncated_mid_member(), match="truncated"),
    "bad_header_checksum": lambda: Case(_bad_checksum(), match="checksum"),
    "member_longer_than_declared": lambda: Case(_member_longer_than_declared(), match="checksum"),
    "trailing_garbage": lambda: Case(_trailing_garbage(), match="after the end-of-archive"),
    "decompression_bomb": lambda: Case(_bomb(), match="padding"),
    "header_bomb": lambda: Case(_pax_bomb(), match="exceeds what the manifest declares"),
    "quota_max_bytes": lambda: Case(
        snap().zst(), QuotaExceededError, "MAX_BYTES", Limits(max_bytes=8)
    ),
    "quota_max_files": lambda: Case(
        snap().zst(), QuotaExceededError, "MAX_FILES", Limits(max_files=1)
    ),
    "quota_max_file_bytes": lambda: Case(
        snap().zst(), QuotaExceededError, "MAX_FILE_BYTES", Limits(max_file_bytes=5)
    ),
    "wrong_snapshot_sha256": lambda: Case(
        snap().zst(), match="SNAPSHOT_SHA256", expected_sha256="ab" * 32
    ),
}


def fingerprint(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Everything observable about a tree except `.sidecar`: type, mode, inode, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != ".sidecar"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            content = ""
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_ino, st.st_mtime_ns, content)
    return out


def consume(w: SnapshotWriter, blob: bytes, chunk: int, state: StateStore) -> None:
    """Feed the blob in chunks, finish and publish, as hydration does."""
    for i in range(0, len(blob), chunk):
        w.feed(blob[i : i + chunk])
    w.finish()
    w.publish(ProjectTree(w.project_dir, state))


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path, StateStore]:
    """A published project (with a sentinel dir beside it) to attack."""
    project = tmp_path / "project"
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (project / "dir").mkdir(parents=True)
    (project / "ok.txt").write_bytes(b"previous\n")
    (project / "dir" / "inner.txt").write_bytes(b"previous inner\n")
    (project / "keep.txt").write_bytes(b"untracked\n")
    state = StateStore(project / ".sidecar")
    return project, sentinel, state


@pytest.mark.parametrize("name", sorted(_CASES))
@pytest.mark.parametrize(("chunk", "write_thread"), [(1 << 16, True), (4093, False)])
def test_hostile_snapshot_is_refused(
    name: str, chunk: int, write_thread: bool, world: tuple[Path, Path, StateStore]
) -> None:
    """The snapshot is refused with its error; nothing changes inside or outside the project."""
    project, sentinel, state = world
    case = _CASES[name]()
    before = fingerprint(project)
    outside_before = sorted(p.name for p in project.parent.iterdir())
    w = SnapshotWriter(
        project,
        new_staging_dir(project / ".sidecar"),
        case.limits,
        state=state,
        expected_sha256=case.expected_sha256,
        write_thread=write_thread,
    )
    with pytest.raises(case.error, match=case.match) as info:
        consume(w, case.blob, chunk, state)
    w.abort()
    err = info.value
    assert isinstance(err, SnapshotInvalidError | QuotaExceededError)
    assert err.exit_code in (ExitCode.SNAPSHOT_INVALID, ExitCode.QUOTA_EXCEEDED)
    assert "\n" not in str(err)
    assert w.bytes_out < 32 * 1024 * 1024  # the bomb was stopped early
    assert list(sentinel.iterdir()) == []
    assert sorted(p.name for p in project.parent.iterdir()) == outside_before
    assert not Path("/tmp/sidecar-pwned").exists()
    assert fingerprint(project) == before
    assert not list((project / ".sidecar").glob("staging-*"))
    assert state.live() == {}
    state.close()


def test_corpus_is_large_enough() -> None:
    """The corpus keeps at least 25 distinct hostile snapshots."""
    assert len(_CASES) >= 25


def test_setuid_and_setgid_bits_are_dropped(world: tuple[Path, Path, StateStore]) -> None:
    """Manifest modes with setuid/setgid/sticky and tar header modes never reach the disk."""
    project, _, state = world
    s = Snap(files={"suid": b"#!/bin/sh\n", "sgid": b"x"})
    entries = [{**e, "mode": 0o4755 if e["path"] == "suid" else 0o2644} for e in s.entries()]
    members = member("suid", b"#!/bin/sh\n", mode=0o6777) + member("sgid", b"x", mode=0o7777)
    blob = zst(s.manifest_member(s.manifest(entries)) + members + EOA)
    w = SnapshotWriter(project, new_staging_dir(project / ".sidecar"), Limits(), state=state)
    w.feed(blob)
    w.publish(ProjectTree(project, state))
    assert stat.S_IMODE((project / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((project / "sgid").stat().st_mode) == 0o644
    st = state.get("suid")
    assert st is not None
    assert st.mode == 0o755
    state.close()
