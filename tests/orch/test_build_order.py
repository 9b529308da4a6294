"""`write_files_snapshot` (what publish builds from database rows) against `build_snapshot` of
the same files on disk: for any set of paths, byte for byte the same snapshot, so the order of
members (tree_order) and the directory entries agree with the disk walk; and PostgreSQL's
`order by string_to_array(path, '/') collate "C"` (sidecar/orch/source.py) is that order."""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.snapshot.build import build_snapshot, snapshot_id_for, tree_order, write_files_snapshot
from sidecar.snapshot.manifest import FileEntry, Manifest
from sidecar.testing.postgres import PostgresCluster

# Characters around '/' (0x2f) in byte order, and multi-byte UTF-8, where plain string order
# and the tree walk's order differ.
NAME = st.text(alphabet="-._0aZz\u00e9\u4e2d", min_size=1, max_size=4).filter(
    lambda n: n not in {".", ".."} and n != ".sidecar" and n != ".snapshot.json"
)
PATHS = st.lists(st.lists(NAME, min_size=1, max_size=3).map("/".join), min_size=1, max_size=12)


def consistent(paths: list[str]) -> list[str]:
    """Drop paths that are a directory of another path (a path cannot be both)."""
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        parts = p.split("/")
        prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if prefixes & set(out) or any(q.startswith(p + "/") for q in out):
            continue
        out.append(p)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PATHS)
def test_rows_build_the_same_bytes_as_the_disk(paths: list[str]) -> None:
    files = consistent(paths)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, rel in enumerate(files):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(f"{i}:{rel}\n".encode())
        disk = io.BytesIO()
        versions = {rel: i + 1 for i, rel in enumerate(files)}
        manifest = build_snapshot(
            root, disk, project_id="p", created_at=1_700_000_000_000, seq=7, versions=versions
        )
        entries = {
            rel: FileEntry(
                rel,
                len(data := f"{i}:{rel}\n".encode()),
                hashlib.sha256(data).hexdigest(),
                0o644,
                i + 1,
            )
            for i, rel in enumerate(files)
        }
        sid = snapshot_id_for("p", 1_700_000_000_000, entries, 7)
        assert sid == manifest.snapshot_id
        opened: list[str] = []

        @contextlib.contextmanager
        def open_file(entry: FileEntry) -> Iterator[io.BytesIO]:
            opened.append(entry.path)
            yield io.BytesIO(f"{files.index(entry.path)}:{entry.path}\n".encode())

        rows = io.BytesIO()
        write_files_snapshot(rows, Manifest("p", sid, 1_700_000_000_000, entries, 7), open_file)
        assert rows.getvalue() == disk.getvalue()
        assert opened == sorted(files, key=tree_order)


@pytest.mark.pg
def test_postgres_orders_paths_like_the_tree_walk(pg_cluster: PostgresCluster) -> None:
    paths = consistent(
        ["a.txt", "a/z", "a-b", "a/b/c", "b", "\u00e9", "z/\u4e2d", "Z", "a_b", "a.d/x", "0"]
    )
    with psycopg.connect(pg_cluster.dsn("postgres")) as conn:
        rows = conn.execute(
            "select p from unnest(%s::text[]) p order by string_to_array(p, '/') collate \"C\"",
            (paths,),
        ).fetchall()
    assert [r[0] for r in rows] == sorted(paths, key=tree_order)
