"""SnapshotWriter and verify_tree on real files: round trips, convergence, state, limits."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from sidecar.config import Limits
from sidecar.errors import QuotaExceededError, SnapshotInvalidError, UnsafePathError
from sidecar.snapshot.build import build_snapshot
from sidecar.snapshot.manifest import Manifest
from sidecar.snapshot.publish import PublishResult, verify_tree
from sidecar.snapshot.writer import SnapshotWriter, new_staging_dir
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState, StateStore

from .archives import EOA, Snap, member, zst


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "project"
    p.mkdir()
    return p


@pytest.fixture
def state(project: Path) -> Iterator[StateStore]:
    s = StateStore(project / ".sidecar")
    yield s
    s.close()


def extract(
    project: Path,
    blob: bytes,
    state: StateStore,
    *,
    limits: Limits | None = None,
    chunk: int = 65536,
    **kw: Any,
) -> PublishResult:
    w = SnapshotWriter(
        project, new_staging_dir(project / ".sidecar"), limits or Limits(), state=state, **kw
    )
    with w:
        for i in range(0, len(blob), chunk):
            w.feed(blob[i : i + chunk])
        w.finish()
        return w.publish(ProjectTree(project, state))


def feed_all(w: SnapshotWriter, blob: bytes) -> Manifest:
    """Feed everything and finish (errors from the helper thread surface here)."""
    w.feed(blob)
    return w.finish()


def manifest_of(w: SnapshotWriter) -> Manifest | None:
    return w.manifest


def tree(root: Path) -> dict[str, tuple[str, object, int]]:
    """path -> (kind, content or target, permission bits), `.sidecar` excluded."""
    out: dict[str, tuple[str, object, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".sidecar"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), 0)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", None, 0)
            else:
                out[rel] = ("f", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def make_src(root: Path, n_files: int = 50) -> Path:
    src = root / "src"
    (src / "empty" / "nested-empty").mkdir(parents=True)
    deep = src.joinpath(*[f"level{i}" for i in range(30)])
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_bytes(b"deep\n")
    (src / "ünïcødé 文件.txt").write_text("héllo wörld\n")
    (src / "empty-file").write_bytes(b"")
    (src / "bin").mkdir()
    (src / "bin" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "bin" / "run.sh").chmod(0o755)
    (src / "link-to-run").symlink_to("bin/run.sh")
    for i in range(n_files):
        d = src / "pkg" / f"m{i % 13}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.js").write_bytes(os.urandom(i * 37 % 3000))
    return src


def build(src: Path, tmp_path: Path, **kw: object) -> bytes:
    out = tmp_path / f"snap-{os.urandom(3).hex()}.tar.zst"
    build_snapshot(src, out, project_id="proj", created_at=1_700_000_000_000, **kw)  # type: ignore[arg-type]
    return out.read_bytes()


def test_round_trip_reproduces_tree(tmp_path: Path, project: Path, state: StateStore) -> None:
    """build -> SnapshotWriter -> publish gives the same tree, bit for bit, with exec bits."""
    src = make_src(tmp_path, 200)
    result = extract(project, build(src, tmp_path), state, chunk=7777)
    assert tree(project) == tree(src)
    assert result.written == len(result.manifest.files)
    assert verify_tree(project, state) == []
    assert not list((project / ".sidecar").glob("staging-*"))


def test_round_trip_thousands_of_files_in_one_feed(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """Thousands of small files arrive intact when the whole blob is fed at once."""
    src = tmp_path / "src"
    for i in range(3000):
        d = src / f"d{i % 40}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.txt").write_text(f"file {i}\n" * (i % 7))
    blob = build(src, tmp_path)
    extract(project, blob, state, chunk=len(blob))
    assert tree(project) == tree(src)


def test_multi_frame_stream(tmp_path: Path, project: Path, state: StateStore) -> None:
    """A snapshot split into several zstd frames extracts like a single frame."""
    snap = Snap(files={f"f{i}": os.urandom(3000) for i in range(20)})
    extract(project, zst(snap.tar(), frames=7), state, chunk=999)
    assert {p: d for p, (_, d, _) in tree(project).items()} == snap.files


def test_state_records_files_versions_and_meta(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """After publish the state knows every file's version, hash, size and mode, and the meta."""
    snap = Snap(files={"a": b"1", "x/y": b"22"}, modes={"x/y": 0o755}, symlinks={"l": "a"})
    extract(project, snap.zst(), state)
    a, y, lnk = state.get("a"), state.get("x/y"), state.get("l")
    assert a is not None
    assert y is not None
    assert lnk is not None
    assert (a.version, a.sha256, a.size, a.mode) == (1, hashlib.sha256(b"1").hexdigest(), 1, 0o644)
    assert (y.size, y.mode) == (2, 0o755)
    assert stat.S_ISLNK(lnk.mode)
    assert state.meta("snapshot_id") == "snap-1"
    assert state.meta("seq") == 7
    assert state.meta("created_at") == snap.created_at
    assert state.meta("project_id") == "proj"
    assert isinstance(state.meta("manifest_sha256"), str)


def test_converge_over_existing_tree(tmp_path: Path, project: Path, state: StateStore) -> None:
    """Changed files are replaced, removed ones deleted, unchanged ones left untouched."""
    v1 = Snap(
        files={
            "same.txt": b"same",
            "change.txt": b"old",
            "gone.txt": b"bye",
            "dir/gone2.txt": b"x",
            "becomes-dir": b"f",
            "becomes-file/inner": b"i",
            "mode.sh": b"#!",
        },
        symlinks={"link": "same.txt"},
    )
    extract(project, v1.zst(), state)
    (project / "untracked.log").write_text("keep me")
    before_same = (project / "same.txt").stat()
    before_mode = (project / "mode.sh").stat()
    v2 = Snap(
        files={
            "same.txt": b"same",
            "change.txt": b"new!",
            "becomes-dir/x": b"now dir",
            "becomes-file": b"now file",
            "new/deep/file": b"n",
            "mode.sh": b"#!",
        },
        modes={"mode.sh": 0o755},
        symlinks={"link": "change.txt"},
        snapshot_id="snap-2",
        version=2,
    )
    result = extract(project, v2.zst(), state)
    got = tree(project)
    assert {p: v[1] for p, v in got.items() if v[0] == "f"} == {
        **v2.files,
        "untracked.log": b"keep me",
    }
    assert got["link"] == ("l", "change.txt", 0)
    assert "gone.txt" not in got
    assert "dir" not in got
    after_same = (project / "same.txt").stat()
    assert (after_same.st_ino, after_same.st_mtime_ns) == (
        before_same.st_ino,
        before_same.st_mtime_ns,
    )
    after_mode = (project / "mode.sh").stat()
    assert after_mode.st_ino == before_mode.st_ino
    assert stat.S_IMODE(after_mode.st_mode) == 0o755
    assert result.unchanged == 2
    assert result.removed >= 2
    gone = state.get("gone.txt")
    assert gone is not None
    assert gone.deleted
    assert gone.version == 1
    assert state.meta("snapshot_id") == "snap-2"
    assert verify_tree(project, state) == []


def test_unchanged_file_with_wrong_bytes_is_rewritten_when_damaged(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """A file listed in `damaged` is rewritten even though state says it is in place."""
    snap = Snap(files={"a.txt": b"good", "b.txt": b"fine"})
    extract(project, snap.zst(), state)
    (project / "a.txt").write_bytes(b"evil")  # same size, different bytes
    assert verify_tree(project, state) == ["a.txt"]
    result = extract(project, snap.zst(), state, damaged=verify_tree(project, state))
    assert (project / "a.txt").read_bytes() == b"good"
    assert (result.written, result.unchanged) == (1, 1)
    assert verify_tree(project, state) == []


def test_verify_tree_finds_damage(tmp_path: Path, project: Path, state: StateStore) -> None:
    """Missing, changed, resized, re-moded and retyped files are all reported."""
    src = make_src(tmp_path, 20)
    extract(project, build(src, tmp_path), state)
    assert verify_tree(project, state) == []
    (project / "empty-file").unlink()
    (project / "bin" / "run.sh").chmod(0o644)
    (project / "ünïcødé 文件.txt").write_text("changed")
    (project / "link-to-run").unlink()
    (project / "link-to-run").write_text("not a link")
    deep = next(p for p in project.rglob("deep.txt"))
    deep.write_bytes(b"DEEP\n")
    assert verify_tree(project, state) == sorted(
        [
            "empty-file",
            "bin/run.sh",
            "ünïcødé 文件.txt",
            "link-to-run",
            str(deep.relative_to(project)),
        ]
    )


def test_limits_checked_against_manifest_before_bodies(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """Quota errors come from the manifest, before any file lands in staging."""
    snap = Snap(files={"a": b"x" * 100, "b": b"y" * 100})
    for limits in (Limits(max_bytes=150), Limits(max_files=1), Limits(max_file_bytes=99)):
        staging = new_staging_dir(project / ".sidecar")
        w = SnapshotWriter(project, staging, limits, state=state)
        blob = snap.zst()
        with pytest.raises(QuotaExceededError):
            feed_all(w, blob)
        assert list(staging.rglob("*")) == []
        w.abort()
        assert not staging.exists()
    assert tree(project) == {}


def test_expected_sha256_of_compressed_bytes(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """The compressed stream's sha256 is checked when SNAPSHOT_SHA256 is given."""
    blob = Snap(files={"a": b"1"}).zst()
    with pytest.raises(SnapshotInvalidError, match="sha256"):
        extract(project, blob, state, expected_sha256="0" * 64)
    assert tree(project) == {}
    extract(project, blob, state, expected_sha256=hashlib.sha256(blob).hexdigest().upper())
    assert (project / "a").read_bytes() == b"1"
    assert state.meta("snapshot_sha256") == hashlib.sha256(blob).hexdigest()


def test_project_id_mismatch_is_refused(project: Path, state: StateStore) -> None:
    """A snapshot for another project is refused when project_id is given."""
    with pytest.raises(SnapshotInvalidError, match="not 'mine'"):
        extract(project, Snap(files={"a": b"1"}).zst(), state, project_id="mine")


def test_progress_counters_and_manifest_property(project: Path, state: StateStore) -> None:
    """bytes_in, bytes_out, files_done and manifest are available while streaming."""
    snap = Snap(files={f"f{i}": b"z" * 1000 for i in range(10)})
    blob = snap.zst()
    with SnapshotWriter(project, new_staging_dir(project / ".sidecar"), Limits()) as w:
        assert w.manifest is None
        w.feed(blob)
        m = w.finish()
        assert isinstance(m, Manifest)
        assert manifest_of(w) is m
        assert (w.bytes_in, w.files_done) == (len(blob), 10)
        assert w.bytes_out >= 10_000
        staging = w.staging_dir
    assert not staging.exists()  # leaving the block without publish aborts
    assert tree(project) == {}


def test_feed_after_error_keeps_failing(project: Path, state: StateStore) -> None:
    """Once a writer failed, every later call fails too and nothing is published."""
    w = SnapshotWriter(project, new_staging_dir(project / ".sidecar"), Limits())
    with pytest.raises(SnapshotInvalidError):
        w.feed(b"not zstd at all")
    with pytest.raises(SnapshotInvalidError, match="already failed"):
        w.feed(b"more")
    with pytest.raises(SnapshotInvalidError, match="already failed"):
        w.publish(ProjectTree(project, state))
    w.abort()
    assert tree(project) == {}


@pytest.mark.slow
def test_file_larger_than_64_mib(tmp_path: Path, project: Path, state: StateStore) -> None:
    """A file over 64 MiB streams through with bounded buffers and the right hash."""
    src = tmp_path / "src"
    src.mkdir()
    block = os.urandom(1 << 20)
    with open(src / "big.bin", "wb") as f:
        f.writelines(block[i:] + block[:i] for i in range(70))
    out = tmp_path / "big.tar.zst"
    build_snapshot(src, out, project_id="p", created_at=0, level=1)
    w = SnapshotWriter(project, new_staging_dir(project / ".sidecar"), Limits(), state=state)
    with open(out, "rb") as f:
        while chunk := f.read(1 << 18):
            w.feed(chunk)
    w.publish(ProjectTree(project, state))
    assert (project / "big.bin").stat().st_size == 70 << 20
    assert verify_tree(project, state) == []


def test_symlink_chains_inside_the_tree_are_kept(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """pnpm-style links through other links round-trip when they stay inside."""
    src = tmp_path / "src"
    real = src / "node_modules" / ".pnpm" / "foo@1" / "node_modules" / "foo" / "bin"
    real.mkdir(parents=True)
    (real / "x").write_text("#!/bin/sh\n")
    (src / "node_modules" / "foo").symlink_to(".pnpm/foo@1/node_modules/foo")
    (src / "node_modules" / ".bin").mkdir()
    (src / "node_modules" / ".bin" / "x").symlink_to("../foo/bin/x")
    extract(project, build(src, tmp_path), state)
    assert tree(project) == tree(src)
    assert (project / "node_modules" / ".bin" / "x").read_text() == "#!/bin/sh\n"


def test_unchanged_file_behind_a_symlinked_dir_is_rewritten(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """A dir swapped for a symlink is not trusted: the file is rewritten in a real dir."""
    snap = Snap(files={"d/a.txt": b"same"})
    extract(project, snap.zst(), state)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_bytes(b"same")
    (project / "d" / "a.txt").unlink()
    (project / "d").rmdir()
    (project / "d").symlink_to(outside)
    result = extract(project, snap.zst(), state)
    assert (result.written, result.unchanged) == (1, 0)
    assert not (project / "d").is_symlink()
    assert (project / "d" / "a.txt").read_bytes() == b"same"
    assert sorted(p.name for p in outside.iterdir()) == ["a.txt"]
    assert verify_tree(project, state) == []


def test_state_dir_with_another_name_inside_project_is_off_limits(tmp_path: Path) -> None:
    """With SIDECAR_STATE_DIR inside the project, snapshot paths may not enter it."""
    project = tmp_path / "project"
    state_dir = project / ".state"
    state = StateStore(state_dir)
    blob = Snap(files={".state/state.db": b"pwned", "ok": b"1"}).zst()
    w = SnapshotWriter(project, new_staging_dir(state_dir), Limits(), state=state)
    with pytest.raises(UnsafePathError, match="state directory"):
        feed_all(w, blob)
    w.abort()
    extract_into = SnapshotWriter(project, new_staging_dir(state_dir), Limits(), state=state)
    extract_into.feed(Snap(files={"ok": b"1"}).zst())
    extract_into.publish(ProjectTree(project, state))
    assert sorted(p.name for p in project.iterdir()) == [".state", "ok"]
    state.close()


@pytest.mark.parametrize(
    "params",
    [
        {"level": 1, "write_checksum": False, "write_content_size": False},
        {"level": 19, "write_checksum": True, "write_content_size": True},
        {"level": 3, "write_checksum": True, "write_content_size": False, "threads": 2},
    ],
)
def test_zstd_frame_variants_and_skippable_frames(
    project: Path, state: StateStore, params: dict[str, Any]
) -> None:
    """Frames with or without checksum/content size, and skippable frames, are all accepted."""
    snap = Snap(files={f"f{i}": os.urandom(100) * (i + 1) for i in range(30)})
    raw = snap.tar()
    cctx = zstandard.ZstdCompressor(**params)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    blob = skippable + cctx.compress(raw[:20000]) + skippable + cctx.compress(raw[20000:])
    for cut in (1, 3, 9, len(blob) // 2):
        w = SnapshotWriter(project, new_staging_dir(project / ".sidecar"), Limits())
        w.feed(blob[:-cut])
        with pytest.raises(SnapshotInvalidError, match="truncated"):
            w.finish()
        w.abort()
    extract(project, blob, state, chunk=5)
    assert {p: d for p, (_, d, _) in tree(project).items()} == snap.files


def test_stale_empty_directories_are_removed_also_after_a_restart(
    tmp_path: Path, project: Path
) -> None:
    """Directories the previous snapshot had and the new one has not go once empty, across a
    restart (a fresh StateStore); one still holding an untracked file stays."""
    v1 = Snap(files={"src/a.js": b"a", "keep/k.txt": b"k", "old/deep/f.txt": b"f"})
    empty = (
        member("empty/", typeflag=b"5")
        + member("x/", typeflag=b"5")
        + member("x/y/", typeflag=b"5")
    )
    state = StateStore(project / ".sidecar")
    extract(project, zst(v1.manifest_member() + v1.members() + empty + EOA), state)
    assert (project / "x" / "y").is_dir()
    assert (project / "empty").is_dir()
    (project / "keep" / "untracked.log").write_text("mine")
    state.close()

    state = StateStore(project / ".sidecar")  # a restart
    v2 = Snap(files={"src/a.js": b"a2", "new/n.txt": b"n"}, snapshot_id="snap-2")
    result = extract(
        project,
        zst(v2.manifest_member() + v2.members() + member("kept-empty/", typeflag=b"5") + EOA),
        state,
    )
    assert sorted(p for p, v in tree(project).items() if v[0] == "d") == [
        "keep",
        "kept-empty",
        "new",
        "src",
    ]
    assert (project / "keep" / "untracked.log").read_text() == "mine"
    assert result.removed_dirs == 3  # empty, x/y, x (old/deep and old went with their file)
    assert state.meta("snapshot_dirs") == ["kept-empty", "new", "src"]
    state.close()

    state = StateStore(project / ".sidecar")
    extract(project, Snap(files={"src/a.js": b"a3"}, snapshot_id="snap-3").zst(), state)
    assert sorted(p for p, v in tree(project).items() if v[0] == "d") == ["keep", "src"]
    state.close()


def test_directories_of_an_interrupted_publish_are_removed_by_the_next_one(
    tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that dies after creating its directories (before the state records its tree)
    has already recorded them: the next publish, after a restart, removes those it lacks."""
    state = StateStore(project / ".sidecar")
    extract(project, Snap(files={"a/x.txt": b"x"}).zst(), state)
    v2 = Snap(files={"a/x.txt": b"x2", "b/y.txt": b"y"}, snapshot_id="snap-2", version=2)
    deep_empty = member("d/", typeflag=b"5") + member("d/e/", typeflag=b"5")

    def killed(src: Path, dst: Path) -> None:
        raise OSError(5, "simulated crash in the middle of publishing")

    monkeypatch.setattr("sidecar.snapshot.publish._move", killed)
    with pytest.raises(OSError, match="simulated crash"):
        extract(project, zst(v2.manifest_member() + v2.members() + deep_empty + EOA), state)
    monkeypatch.undo()
    assert (project / "b").is_dir()
    assert (project / "d" / "e").is_dir()
    assert state.meta("snapshot_id") == "snap-1"  # the tree was not recorded
    state.close()

    state = StateStore(project / ".sidecar")  # the restart
    v3 = Snap(files={"a/x.txt": b"x3"}, snapshot_id="snap-3", version=3)
    extract(project, v3.zst(), state)
    assert sorted(p for p, v in tree(project).items() if v[0] == "d") == ["a"]
    assert state.meta("snapshot_dirs") == ["a"]
    state.close()


def test_older_snapshot_never_takes_a_path_back(
    tmp_path: Path, project: Path, state: StateStore
) -> None:
    """Delta rule 7 (sidecar/live/__init__.py): publishing a snapshot older than what was applied keeps, path by path,
    the newer side. The state (events up to seq 9) knows keep.txt at v5 and gone.txt deleted
    at v4, and new.txt created at seq 8; the snapshot (seq 6) has keep.txt v3, gone.txt v2 and
    old.txt v1, and lacks new.txt and stale.txt (recorded at seq 5: deleted by seq 6)."""
    files = {
        "keep.txt": b"newer\n",
        "new.txt": b"created after the snapshot\n",
        "stale.txt": b"deleted before the snapshot\n",
    }
    for rel, data in files.items():
        (project / rel).write_bytes(data)
    h = {rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()}
    state.update(
        {
            "keep.txt": FileState(5, h["keep.txt"], 6, 0o644, seq=9),
            "gone.txt": FileState(4, None, 0, 0, seq=7),
            "new.txt": FileState(1, h["new.txt"], 27, 0o644, seq=8),
            "stale.txt": FileState(1, h["stale.txt"], 28, 0o644, seq=5),
        },
        {"seq": 9},
    )
    src = tmp_path / "snap-src"
    src.mkdir()
    (src / "keep.txt").write_bytes(b"older\n")
    (src / "gone.txt").write_bytes(b"resurrected?\n")
    (src / "old.txt").write_bytes(b"only in the snapshot\n")
    versions = {"keep.txt": 3, "gone.txt": 2, "old.txt": 1}
    result = extract(project, build(src, tmp_path, seq=6, versions=versions), state)
    assert result.kept == 2  # keep.txt, gone.txt
    assert (project / "keep.txt").read_bytes() == b"newer\n"
    assert not (project / "gone.txt").exists()
    assert (project / "new.txt").read_bytes() == files["new.txt"]
    assert not (project / "stale.txt").exists()
    assert (project / "old.txt").read_bytes() == b"only in the snapshot\n"
    assert [state.get(p).version for p in ("keep.txt", "gone.txt", "new.txt")] == [5, 4, 1]  # type: ignore[union-attr]
    assert state.meta("seq") == 9  # events newer than the snapshot stay applied
