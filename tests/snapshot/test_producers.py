"""Snapshots made the way real producers make them: shell tar idioms, not `sidecar snapshot build`.

The usual shell producer is `tar -cf - -C mdir .snapshot.json -C tree . | zstd`; GNU tar and
bsdtar then archive the root itself as a `./` directory member and every path as `./…`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from sidecar.config import Limits
from sidecar.errors import SnapshotInvalidError
from sidecar.snapshot.build import build_snapshot
from sidecar.snapshot.publish import verify_tree
from sidecar.snapshot.writer import SnapshotWriter, new_staging_dir
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import StateStore

from .archives import EOA, Snap, member, zst
from .test_extract import make_src, tree

TAR = shutil.which("tar")
BSDTAR = shutil.which("bsdtar")  # Debian: apt-get install libarchive-tools
ZSTD = shutil.which("zstd")


def test_the_producers_tools_are_there_in_ci() -> None:
    """The tests below skip without GNU tar, bsdtar or zstd; CI (scripts/install) has them."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("checked only where CI=true")
    missing = [
        name for name, path in (("tar", TAR), ("bsdtar", BSDTAR), ("zstd", ZSTD)) if not path
    ]
    assert not missing, f"scripts/install should have installed {missing}"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "project" / ".sidecar")
    yield s
    s.close()


def _hydrate(project: Path, blob: bytes, state: StateStore) -> None:
    with SnapshotWriter(project, new_staging_dir(project / ".sidecar"), Limits(), state=state) as w:
        for i in range(0, len(blob), 50_000):
            w.feed(blob[i : i + 50_000])
        w.finish()
        w.publish(ProjectTree(project, state))


def _shell_snapshot(tmp_path: Path, src: Path, argv: list[str]) -> bytes:
    """`argv -cf - -C mdir .snapshot.json -C src . | zstd -q -c` with the manifest of src."""
    manifest = build_snapshot(src, io.BytesIO(), project_id="proj", created_at=1_700_000_000_000)
    mdir = tmp_path / "mdir"
    mdir.mkdir()
    (mdir / ".snapshot.json").write_bytes(manifest.to_bytes())
    assert ZSTD is not None
    tar = subprocess.run(
        [*argv, "-cf", "-", "-C", str(mdir), ".snapshot.json", "-C", str(src), "."],
        capture_output=True,
        check=True,
    )
    return subprocess.run(
        [ZSTD, "-q", "-c"], input=tar.stdout, capture_output=True, check=True
    ).stdout


PRODUCERS = [
    pytest.param(
        [TAR, "--format=posix"],
        id="gnu-tar-posix",
        marks=pytest.mark.skipif(TAR is None, reason="no tar"),
    ),
    pytest.param(
        [TAR, "--format=gnu"],
        id="gnu-tar-gnu",
        marks=pytest.mark.skipif(TAR is None, reason="no tar"),
    ),
    pytest.param(
        [TAR, "--format=ustar"],
        id="gnu-tar-ustar",
        marks=pytest.mark.skipif(TAR is None, reason="no tar"),
    ),
    pytest.param(
        [BSDTAR, "--format", "pax"],
        id="bsdtar-pax",
        marks=pytest.mark.skipif(BSDTAR is None, reason="no bsdtar (libarchive-tools)"),
    ),
    pytest.param(
        [BSDTAR],
        id="bsdtar-default",
        marks=pytest.mark.skipif(BSDTAR is None, reason="no bsdtar (libarchive-tools)"),
    ),
]


@pytest.mark.skipif(ZSTD is None, reason="no zstd")
@pytest.mark.parametrize("argv", PRODUCERS)
def test_tar_c_dir_dot_hydrates_bit_for_bit(
    tmp_path: Path, state: StateStore, argv: list[str]
) -> None:
    """The root member `./` is accepted; every file, mode, symlink and empty dir arrives."""
    src = make_src(tmp_path, 30)
    if "ustar" in argv[-1]:  # ustar cannot carry the 30-level deep path or non-ASCII names
        shutil.rmtree(src / "level0")
        (src / "ünïcødé 文件.txt").unlink()
    blob = _shell_snapshot(tmp_path, src, [str(a) for a in argv])
    project = tmp_path / "project"
    _hydrate(project, blob, state)
    assert tree(project) == tree(src)
    assert verify_tree(project, state) == []


@pytest.mark.parametrize(
    ("name", "typeflag", "data", "linkname"),
    [
        ("./", b"0", b"", ""),  # a regular file named like the root
        (".", b"0", b"x", ""),
        ("./", b"2", b"", "elsewhere"),  # a symlink replacing the root
        (".", b"1", b"", "a.txt"),  # a hard link
    ],
)
def test_root_member_that_is_not_a_directory_is_refused(
    tmp_path: Path, state: StateStore, name: str, typeflag: bytes, data: bytes, linkname: str
) -> None:
    snap = Snap(files={"a.txt": b"a"})
    blob = zst(
        snap.manifest_member()
        + member(name, data, typeflag=typeflag, linkname=linkname)
        + snap.members()
        + EOA
    )
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    with pytest.raises(SnapshotInvalidError, match="names the project root"):
        _hydrate(project, blob, state)
    assert sorted(p.name for p in project.iterdir()) == [".sidecar"]


def test_root_directory_member_before_the_manifest_and_twice(
    tmp_path: Path, state: StateStore
) -> None:
    """`./` may come first (bsdtar -C dir . with the manifest inside dir); twice is refused."""
    snap = Snap(files={"a.txt": b"a", "d/b.txt": b"b"})
    root = member("./", typeflag=b"5", mode=0o755)
    project = tmp_path / "project"
    _hydrate(project, zst(root + snap.tar()[: -len(EOA)] + EOA), state)
    assert (project / "d" / "b.txt").read_bytes() == b"b"
    with pytest.raises(SnapshotInvalidError, match="duplicate"):
        _hydrate(project, zst(root + snap.manifest_member() + root + snap.members() + EOA), state)


@pytest.mark.parametrize("how", ["python-zstandard", "zstd-cli"])
def test_long_window_snapshot_names_the_limit_and_the_fix(
    tmp_path: Path, state: StateStore, how: str
) -> None:
    """A `zstd --long` snapshot (128 MiB window) is refused as unsupported, not as corrupt: the
    reason names the window, the 16 MiB limit and how to recompress it."""
    raw = Snap(files={"a.txt": b"a" * 100_000}).tar()
    if how == "zstd-cli":
        if ZSTD is None:
            pytest.skip("no zstd")
        # From a pipe (size unknown) zstd keeps the full --long=27 window.
        blob = subprocess.run(
            [ZSTD, "--long=27", "-q", "-c"], input=raw, capture_output=True, check=True
        ).stdout
    else:
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, enable_ldm=True)
        buf = io.BytesIO()
        with zstandard.ZstdCompressor(compression_params=params).stream_writer(
            buf, closefd=False
        ) as w:
            w.write(raw)
        blob = buf.getvalue()
    project = tmp_path / "project"
    with pytest.raises(SnapshotInvalidError) as err:
        _hydrate(project, blob, state)
    reason = str(err.value)
    assert "corrupt" not in reason
    assert "128 MiB window" in reason
    assert "16 MiB limit" in reason
    assert "without --long" in reason
    assert sorted(p.name for p in project.iterdir()) == [".sidecar"]
