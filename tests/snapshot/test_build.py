"""The reference producer: manifest first, sorted, normalised, deterministic, refuses what the
format cannot carry."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from sidecar.errors import ConfigError, SnapshotInvalidError, UnsafePathError
from sidecar.snapshot.build import build_snapshot, parse_created_at, source_date_epoch_ms
from sidecar.snapshot.manifest import Manifest

CREATED = 1_700_000_123_456


def make_tree(root: Path) -> Path:
    src = root / "src"
    (src / "b" / "empty").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "b" / "z.sh").write_text("#!/bin/sh\n")
    (src / "b" / "z.sh").chmod(0o775)
    (src / "B.txt").write_text("upper")
    (src / "ü.txt").write_text("u")
    (src / "link").symlink_to("b/z.sh")
    (src / ".sidecar").mkdir()
    (src / ".sidecar" / "state.db").write_text("never shipped")
    return src


def members(blob: bytes) -> list[tarfile.TarInfo]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        return tf.getmembers()


def test_manifest_first_then_sorted_members(tmp_path: Path) -> None:
    """The manifest is the first member, then dirs and files depth first in byte order."""
    out = tmp_path / "s.tar.zst"
    build_snapshot(make_tree(tmp_path), out, project_id="p", created_at=CREATED)
    names = [m.name for m in members(out.read_bytes())]
    assert names == [".snapshot.json", "B.txt", "a.txt", "b", "b/empty", "b/z.sh", "link", "ü.txt"]


def test_metadata_is_normalised(tmp_path: Path) -> None:
    """uid/gid 0, no owner names, one mtime, modes 0644/0755, pax format."""
    out = tmp_path / "s.tar.zst"
    build_snapshot(make_tree(tmp_path), out, project_id="p", created_at=CREATED)
    ms = members(out.read_bytes())
    for m in ms:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", CREATED // 1000)
    modes = {m.name: m.mode for m in ms}
    assert modes["b/z.sh"] == 0o755
    assert modes["a.txt"] == 0o644
    assert modes["b"] == 0o755
    assert ms[-1].pax_headers.get("path") == "ü.txt"


def test_manifest_content(tmp_path: Path) -> None:
    """The manifest lists files and symlinks with sizes, hashes, modes and versions."""
    out = tmp_path / "s.tar.zst"
    m = build_snapshot(
        make_tree(tmp_path), out, project_id="p", created_at=CREATED, seq=42, versions={"a.txt": 9}
    )
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.read_bytes())).read()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        f = tf.extractfile(".snapshot.json")
        assert f is not None
        doc = json.loads(f.read())
    assert Manifest.parse(json.dumps(doc).encode()) == m
    assert doc["seq"] == 42
    assert doc["created_at"] == CREATED
    assert doc["project_id"] == "p"
    assert sorted(m.files) == ["B.txt", "a.txt", "b/z.sh", "link", "ü.txt"]
    assert m.files["a.txt"].version == 9
    assert m.files["B.txt"].version == 0
    assert m.files["b/z.sh"].mode == 0o755
    assert m.files["link"].target == "b/z.sh"


def test_output_is_deterministic(tmp_path: Path) -> None:
    """Same tree and arguments give the same bytes, even after mtimes and umask change."""
    src = make_tree(tmp_path)
    a, b = tmp_path / "a.tar.zst", tmp_path / "b.tar.zst"
    build_snapshot(src, a, project_id="p", created_at=CREATED)
    os.utime(src / "a.txt", (1, 1))
    (src / "B.txt").chmod(0o600)
    buf = io.BytesIO()
    build_snapshot(src, buf, project_id="p", created_at=CREATED)
    b.write_bytes(buf.getvalue())
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.tar.zst"
    (src / "a.txt").write_text("changed")
    m = build_snapshot(src, c, project_id="p", created_at=CREATED)
    assert c.read_bytes() != a.read_bytes()
    assert m.snapshot_id.startswith("sha256-")


def test_snapshot_id_and_created_at_defaults(tmp_path: Path) -> None:
    """snapshot_id defaults to a content hash; created_at defaults to now."""
    src = make_tree(tmp_path)
    m1 = build_snapshot(src, io.BytesIO(), project_id="p", created_at=CREATED)
    m2 = build_snapshot(src, io.BytesIO(), project_id="p", created_at=CREATED)
    m3 = build_snapshot(src, io.BytesIO(), project_id="p", snapshot_id="given")
    assert m1.snapshot_id == m2.snapshot_id
    assert m3.snapshot_id == "given"
    assert m3.created_at > CREATED


def test_symlink_leaving_the_tree_is_refused(tmp_path: Path) -> None:
    """A symlink pointing outside the source (relative or absolute) is refused; no output."""
    for target in ("../outside", "/etc/passwd", "b/../../x", "b/up/.."):
        src = make_tree(tmp_path / target.replace("/", "_"))
        (src / "esc").symlink_to(target)
        (src / "b" / "up").symlink_to("..")
        out = tmp_path / "out.tar.zst"
        with pytest.raises(UnsafePathError, match="esc"):
            build_snapshot(src, out, project_id="p")
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_special_files_and_bad_names_are_refused(tmp_path: Path) -> None:
    """FIFOs, backslash names and a top-level .snapshot.json cannot go in a snapshot."""
    src = make_tree(tmp_path)
    os.mkfifo(src / "pipe")
    with pytest.raises(SnapshotInvalidError, match="pipe"):
        build_snapshot(src, io.BytesIO(), project_id="p")
    (src / "pipe").unlink()
    (src / "back\\slash").write_text("x")
    with pytest.raises(UnsafePathError, match="backslash"):
        build_snapshot(src, io.BytesIO(), project_id="p")
    (src / "back\\slash").unlink()
    (src / ".snapshot.json").write_text("{}")
    with pytest.raises(UnsafePathError, match="reserved"):
        build_snapshot(src, io.BytesIO(), project_id="p")


def test_sidecar_dir_is_skipped_only_at_top_level(tmp_path: Path) -> None:
    """The top-level .sidecar is skipped; a nested one is ordinary content."""
    src = make_tree(tmp_path)
    (src / "b" / ".sidecar").mkdir()
    (src / "b" / ".sidecar" / "x").write_text("x")
    m = build_snapshot(src, io.BytesIO(), project_id="p", created_at=CREATED)
    assert "b/.sidecar/x" in m.files
    assert not any(p.startswith(".sidecar") for p in m.files)


def _manifest_bytes(blob: bytes) -> bytes:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        f = tf.extractfile(".snapshot.json")
        assert f is not None
        return f.read()


def _cli_build(src: Path, out: Path, *args: str, env: dict[str, str] | None = None) -> bytes:
    environ = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "snapshot", "build", str(src), "-o", str(out), *args],
        env={**environ, "PROJECT_ID": "p", "LOG_LEVEL": "error", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_cli_builds_with_created_at_or_source_date_epoch_are_byte_for_byte_equal(
    tmp_path: Path,
) -> None:
    """Two `sidecar snapshot build` runs of one tree with the same --created-at (or
    SOURCE_DATE_EPOCH) give the same bytes, though mtimes changed in between; the snapshot_id
    is derived from the content, and --created-at wins over SOURCE_DATE_EPOCH."""
    src = make_tree(tmp_path)
    a = _cli_build(src, tmp_path / "a.tar.zst", "--created-at", str(CREATED))
    os.utime(src / "a.txt", (5, 5))
    b = _cli_build(src, tmp_path / "b.tar.zst", "--created-at", str(CREATED))
    assert a == b
    iso = _cli_build(src, tmp_path / "iso.tar.zst", "--created-at", "2023-11-14T22:15:23.456Z")
    assert iso == a  # the same instant as CREATED
    epoch = {"SOURCE_DATE_EPOCH": str(CREATED // 1000)}
    c = _cli_build(src, tmp_path / "c.tar.zst", env=epoch)
    d = _cli_build(src, tmp_path / "d.tar.zst", env=epoch)
    whole = _cli_build(src, tmp_path / "w.tar.zst", "--created-at", str(CREATED // 1000 * 1000))
    assert c == d == whole
    e = _cli_build(src, tmp_path / "e.tar.zst", "--created-at", str(CREATED + 1000), env=epoch)
    assert e != a
    manifests = [json.loads(_manifest_bytes(x)) for x in (a, e)]
    assert manifests[0]["created_at"] == CREATED
    assert manifests[1]["created_at"] == CREATED + 1000
    assert manifests[0]["snapshot_id"] != manifests[1]["snapshot_id"]
    assert manifests[0]["snapshot_id"].startswith("sha256-")


def test_malformed_source_date_epoch_or_created_at_is_a_config_error(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        source_date_epoch_ms({"SOURCE_DATE_EPOCH": "yesterday"})
    with pytest.raises(ConfigError, match="--created-at"):
        parse_created_at("soon")
    assert parse_created_at("1970-01-01T00:00:01") == 1000
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "snapshot", "build", str(src), "-o", str(tmp_path / "x")],
        env={**os.environ, "PROJECT_ID": "p", "SOURCE_DATE_EPOCH": "-1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    assert "SOURCE_DATE_EPOCH" in proc.stderr
    assert not (tmp_path / "x").exists()
