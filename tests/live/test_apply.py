"""Tests for sidecar.live.apply: delta rules 1, 2, 3 and 6 (sidecar/live/__init__.py) on real files, with a real HTTP server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar.config import Limits
from sidecar.live.apply import THREAD_THRESHOLD, Applier, ApplyResult
from sidecar.live.events import DeltaEvent, InvalidEventError, parse_event
from sidecar.metrics import Metrics
from sidecar.tree import fsio
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState, StateStore

IDS = {"project_id": "local", "session_id": "local"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def item_update(path: str, data: bytes, version: int, **extra: Any) -> dict[str, Any]:
    return {
        "file_path": path,
        "content_b64": base64.b64encode(data).decode(),
        "content_hash": sha(data),
        "version": version,
        **extra,
    }


def upd(path: str, data: bytes, version: int, **extra: Any) -> DeltaEvent:
    payload = item_update(path, data, version, **extra)
    payload.setdefault("timestamp", 1_700_000_000_000)
    return parse_event("file:update", payload, None)


def url_upd(path: str, url: str, data: bytes, version: int, **extra: Any) -> DeltaEvent:
    payload = {"file_path": path, "content_url": url, "content_hash": sha(data), "version": version}
    return parse_event("file:update", payload | extra, None)


def dele(path: str, version: int, **extra: Any) -> DeltaEvent:
    return parse_event("file:delete", {"file_path": path, "version": version, **extra}, None)


def bulk(*items: dict[str, Any], seq: int | None = None) -> DeltaEvent:
    payload: dict[str, Any] = {"files": list(items), "timestamp": 1_700_000_000_000}
    if seq is not None:
        payload["seq"] = seq
    return parse_event("bulk:apply", payload, None)


def b_upd(path: str, data: bytes, version: int) -> dict[str, Any]:
    return {"action": "update", **item_update(path, data, version)}


def b_del(path: str, version: int) -> dict[str, Any]:
    return {"action": "delete", "file_path": path, "version": version}


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root (the reserved .sidecar dir excluded) -> bytes."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".sidecar"]
        for name in filenames:
            p = Path(dirpath, name)
            out[os.path.normpath(os.path.join(rel_dir, name))] = p.read_bytes()
    return out


def temps(root: Path) -> list[str]:
    return [
        os.path.join(d, n) for d, _, names in os.walk(root) for n in names if fsio.is_temp_name(n)
    ]


def empty_dirs(root: Path) -> list[str]:
    return [
        d
        for d, dirs, names in os.walk(root)
        if Path(d) != root and not dirs and not names and ".sidecar" not in d
    ]


def count(env: Env, event: str, outcome: str) -> int:
    """How many applies of `event` ended in `outcome` (the engine counts them in production)."""
    return sum(1 for e, r in env.results if e == event and r.outcome == outcome)


class Recording(Applier):
    """An Applier that keeps every result, so tests can count outcomes as the engine does."""

    results: list[tuple[str, ApplyResult]]

    async def apply(self, ev: DeltaEvent, *, record_seq: bool = True) -> ApplyResult:
        result = await super().apply(ev, record_seq=record_seq)
        self.results.append((ev.event, result))
        return result


@dataclass
class Env:
    """A project dir, a sentinel dir outside it, and a factory for Appliers on them."""

    root: Path
    outside: Path
    metrics: Metrics
    state: StateStore
    appliers: list[Applier] = field(default_factory=list)
    results: list[tuple[str, ApplyResult]] = field(default_factory=list)

    def applier(self, **kw: Any) -> Applier:
        limits = kw.pop("limits", Limits())
        kw.setdefault("fetch_backoff", 0.0)
        ap = Recording(ProjectTree(self.root, self.state, limits, self.metrics), self.metrics, **kw)
        ap.results = self.results
        self.appliers.append(ap)
        return ap

    def outside_untouched(self) -> bool:
        return tree(self.outside) == {"secret.txt": b"do not touch"}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    root = tmp_path / "project"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"do not touch")
    e = Env(root, outside, Metrics(), StateStore(root / ".sidecar"))
    yield e
    for ap in e.appliers:
        await ap.close()
    e.state.close()


@dataclass
class Blobs:
    """A real HTTP server on 127.0.0.1 serving blobs and scripted failures."""

    base: str
    blobs: dict[str, bytes]
    hits: dict[str, int]
    failures: dict[str, int]  # name -> number of 500s to answer before the blob

    def url(self, name: str, query: str = "?token=sekrit-signature") -> str:
        return f"{self.base}/{name}{query}"


@pytest.fixture
async def server() -> AsyncIterator[Blobs]:
    blobs: dict[str, bytes] = {}
    hits: dict[str, int] = {}
    failures: dict[str, int] = {}
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        if name == "hang":
            await release.wait()
            return web.Response(status=503)
        if name == "endless":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"x" * 65536)
            return resp
        if name.startswith("status-"):
            return web.Response(status=int(name.removeprefix("status-")))
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            return web.Response(status=502)
        if name not in blobs:
            return web.Response(status=404)
        return web.Response(body=blobs[name])

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield Blobs(f"http://{host}:{port}", blobs, hits, failures)
    release.set()
    await runner.cleanup()


# -- basic writes --------------------------------------------------------------------------------


async def test_update_creates_file_with_parents_and_records_state(env: Env) -> None:
    """An update writes the bytes (parents created, mode 0644) and records version and hash."""
    ap = env.applier()
    assert (await ap.apply(upd("src/deep/a.txt", b"one", 1, seq=5))).outcome == "applied"
    target = env.root / "src/deep/a.txt"
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert env.state.get("src/deep/a.txt") == FileState(1, sha(b"one"), 3, 0o644)
    assert env.state.meta("seq") == 5
    assert count(env, "file:update", "applied") == 1
    reg = env.metrics.registry
    assert reg.get_sample_value("sidecar_project_bytes", IDS) == 3
    assert reg.get_sample_value("sidecar_project_files", IDS) == 1
    assert reg.get_sample_value("sidecar_last_seq", IDS) == 5
    assert temps(env.root) == []


async def test_explicit_mode_is_applied(env: Env) -> None:
    """A mode in the event sets the file's permission bits, whatever the umask."""
    ap = env.applier()
    await ap.apply(upd("run.sh", b"#!/bin/sh\n", 1, mode=0o755))
    assert stat.S_IMODE((env.root / "run.sh").stat().st_mode) == 0o755
    assert env.state.get("run.sh").mode == 0o755  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["atomic", "inplace"])
async def test_rewrite_keeps_existing_mode(env: Env, mode: str) -> None:
    """Without a mode in the event, a rewrite keeps the file's current permission bits."""
    ap = env.applier(write_mode=mode)
    await ap.apply(upd("x.sh", b"a", 1))
    (env.root / "x.sh").chmod(0o750)
    await ap.apply(upd("x.sh", b"b", 2))
    assert stat.S_IMODE((env.root / "x.sh").stat().st_mode) == 0o750


async def test_atomic_mode_changes_the_inode(env: Env) -> None:
    """Atomic writes replace the file (new inode) and leave no temp file."""
    ap = env.applier(write_mode="atomic")
    await ap.apply(upd("a.txt", b"one", 1))
    before = (env.root / "a.txt").stat().st_ino
    await ap.apply(upd("a.txt", b"two", 2))
    assert (env.root / "a.txt").stat().st_ino != before
    assert (env.root / "a.txt").read_bytes() == b"two"
    assert temps(env.root) == []


async def test_inplace_mode_keeps_the_inode(env: Env) -> None:
    """In-place writes truncate and rewrite the same inode, shorter or longer."""
    ap = env.applier(write_mode="inplace")
    await ap.apply(upd("a.txt", b"a longer first version", 1))
    before = (env.root / "a.txt").stat().st_ino
    await ap.apply(upd("a.txt", b"short", 2))
    assert (env.root / "a.txt").stat().st_ino == before
    assert (env.root / "a.txt").read_bytes() == b"short"
    await ap.apply(upd("a.txt", b"x" * 10_000, 3))
    assert (env.root / "a.txt").stat().st_ino == before
    assert (env.root / "a.txt").read_bytes() == b"x" * 10_000


@pytest.mark.parametrize("mode", ["atomic", "inplace"])
async def test_large_inline_content_goes_through_a_thread(env: Env, mode: str) -> None:
    """Content above the thread threshold is written correctly in both modes, with fsync on."""
    ap = env.applier(write_mode=mode, fsync=True)
    data = os.urandom(THREAD_THRESHOLD + 1)
    assert (await ap.apply(upd("big.bin", data, 1))).outcome == "applied"
    assert (env.root / "big.bin").read_bytes() == data
    assert temps(env.root) == []


# -- rule 1: versions, tombstones ----------------------------------------------------------------


async def test_same_version_is_duplicate_and_lower_is_stale(env: Env) -> None:
    """Rule 1: an equal version is a duplicate, a lower one stale; neither touches the file."""
    ap = env.applier()
    await ap.apply(upd("a.txt", b"v5", 5))
    ino = (env.root / "a.txt").stat().st_ino
    assert (await ap.apply(upd("a.txt", b"other", 5))).outcome == "duplicate"
    assert (await ap.apply(upd("a.txt", b"older", 4))).outcome == "stale"
    assert (await ap.apply(dele("a.txt", 3))).outcome == "stale"
    assert (env.root / "a.txt").read_bytes() == b"v5"
    assert (env.root / "a.txt").stat().st_ino == ino
    assert count(env, "file:update", "duplicate") == 1
    assert count(env, "file:update", "stale") == 1
    assert count(env, "file:delete", "stale") == 1


async def test_tombstone_prevents_resurrection_across_restart(env: Env) -> None:
    """A delete leaves a tombstone (kept across a restart) that a late update cannot pass."""
    ap = env.applier()
    await ap.apply(upd("a.txt", b"v1", 1))
    assert (await ap.apply(dele("a.txt", 3))).outcome == "applied"
    assert not (env.root / "a.txt").exists()
    assert env.state.get("a.txt") == FileState(3, None, 0, 0)
    env.state.close()
    env.state = StateStore(env.root / ".sidecar")
    ap2 = env.applier()
    assert (await ap2.apply(upd("a.txt", b"v2", 2))).outcome == "stale"
    assert not (env.root / "a.txt").exists()
    assert (await ap2.apply(upd("a.txt", b"v4", 4))).outcome == "applied"
    assert (env.root / "a.txt").read_bytes() == b"v4"


async def test_delete_prunes_empty_parents_but_not_the_root(env: Env) -> None:
    """A delete removes the file and now-empty parents, keeping non-empty ones and the root."""
    ap = env.applier()
    await ap.apply(upd("a/b/c/x.txt", b"x", 1))
    await ap.apply(upd("a/keep.txt", b"k", 1))
    await ap.apply(dele("a/b/c/x.txt", 2))
    assert not (env.root / "a/b").exists()
    assert (env.root / "a/keep.txt").exists()
    await ap.apply(dele("a/keep.txt", 2))
    assert not (env.root / "a").exists()
    assert env.root.is_dir()
    assert (env.root / ".sidecar").is_dir()


async def test_delete_of_missing_file_records_tombstone_as_noop(env: Env) -> None:
    """Deleting a path with nothing on disk writes nothing but still records the tombstone."""
    ap = env.applier()
    assert (await ap.apply(dele("never.txt", 2))).outcome == "noop"
    assert env.state.get("never.txt") == FileState(2, None, 0, 0)
    assert (await ap.apply(upd("never.txt", b"late", 1))).outcome == "stale"
    assert not (env.root / "never.txt").exists()


# -- rule 2: hashes ------------------------------------------------------------------------------


async def test_hash_mismatch_is_rejected_before_touching_disk(env: Env) -> None:
    """Rule 2: bytes that do not match content_hash raise ResyncNeeded and change nothing."""
    ap = env.applier()
    await ap.apply(upd("a.txt", b"good", 1))
    payload = item_update("a.txt", b"evil", 2) | {"content_hash": sha(b"something else")}
    info = await ap.apply(parse_event("file:update", payload, None))
    assert info.outcome == "rejected"
    assert info.resync_reason == "hash_mismatch"
    assert (env.root / "a.txt").read_bytes() == b"good"
    assert env.state.get("a.txt").version == 1  # type: ignore[union-attr]
    assert count(env, "file:update", "rejected") == 1
    assert temps(env.root) == []


# -- rule 3: already there -----------------------------------------------------------------------


async def test_same_bytes_record_version_without_writing(env: Env) -> None:
    """Rule 3: when the file already holds the bytes, only the version is recorded."""
    ap = env.applier(write_mode="atomic")
    await ap.apply(upd("a.txt", b"same", 1))
    ino = (env.root / "a.txt").stat().st_ino
    assert (await ap.apply(upd("a.txt", b"same", 2))).outcome == "noop"
    assert (env.root / "a.txt").stat().st_ino == ino
    assert env.state.get("a.txt").version == 2  # type: ignore[union-attr]
    assert count(env, "file:update", "noop") == 1


async def test_untracked_file_with_same_bytes_is_adopted(env: Env) -> None:
    """Rule 3 also holds for a file the state does not know yet (hashed on disk)."""
    (env.root / "a.txt").write_bytes(b"already")
    ino = (env.root / "a.txt").stat().st_ino
    ap = env.applier()
    assert (await ap.apply(upd("a.txt", b"already", 1, mode=0o600))).outcome == "noop"
    assert (env.root / "a.txt").stat().st_ino == ino
    assert stat.S_IMODE((env.root / "a.txt").stat().st_mode) == 0o600
    assert env.state.get("a.txt") == FileState(1, sha(b"already"), 7, 0o600)


async def test_locally_modified_file_is_rewritten(env: Env) -> None:
    """A file whose size no longer matches the state is rewritten, not treated as a no-op."""
    ap = env.applier()
    await ap.apply(upd("a.txt", b"v1", 1))
    (env.root / "a.txt").write_bytes(b"local edit")
    assert (await ap.apply(upd("a.txt", b"v1", 2))).outcome == "applied"
    assert (env.root / "a.txt").read_bytes() == b"v1"


# -- rule 6: bulks -------------------------------------------------------------------------------


async def test_bulk_applies_as_one_unit(env: Env) -> None:
    """A bulk applies updates and deletes together, with one state record and seq."""
    ap = env.applier()
    await ap.apply(upd("old.txt", b"old", 1))
    ev = bulk(b_upd("a.txt", b"a", 1), b_upd("d/b.txt", b"b", 1), b_del("old.txt", 2), seq=3)
    assert (await ap.apply(ev)).outcome == "applied"
    assert tree(env.root) == {"a.txt": b"a", "d/b.txt": b"b"}
    assert env.state.get("old.txt") == FileState(2, None, 0, 0)
    assert env.state.meta("seq") == 3
    assert count(env, "bulk:apply", "applied") == 1


@pytest.mark.parametrize("mode", ["atomic", "inplace"])
async def test_bulk_writes_into_a_directory_its_delete_emptied(env: Env, mode: str) -> None:
    """A bulk that deletes the last file of a directory and writes a new one there succeeds."""
    ap = env.applier(write_mode=mode)
    await ap.apply(upd("d/e/c.txt", b"c", 1))
    assert (
        await ap.apply(bulk(b_del("d/e/c.txt", 2), b_upd("d/b.txt", b"b", 1)))
    ).outcome == "applied"
    assert tree(env.root) == {"d/b.txt": b"b"}
    assert empty_dirs(env.root) == []


async def test_bulk_turns_a_file_into_a_directory(env: Env) -> None:
    """A bulk may delete file "a" and create "a/b" (deletes are published first)."""
    ap = env.applier()
    await ap.apply(upd("a", b"file", 1))
    assert (await ap.apply(bulk(b_upd("a/b", b"nested", 1), b_del("a", 2)))).outcome == "applied"
    assert tree(env.root) == {"a/b": b"nested"}
    assert temps(env.root) == []


async def test_bulk_with_one_bad_hash_changes_nothing(env: Env) -> None:
    """Rule 6: one bad hash in a bulk means no file, directory or state entry changes."""
    ap = env.applier()
    await ap.apply(upd("keep.txt", b"keep", 1))
    before_tree, before_state = tree(env.root), dict(env.state.items())
    bad = b_upd("z.txt", b"z", 1) | {"content_hash": sha(b"not z")}
    ev = bulk(b_upd("a.txt", b"a", 1), b_upd("new/dir/b.txt", b"b", 1), b_del("keep.txt", 2), bad)
    assert (await ap.apply(ev)).resync_reason is not None
    assert tree(env.root) == before_tree
    assert dict(env.state.items()) == before_state
    assert not (env.root / "new").exists()
    assert temps(env.root) == []
    assert count(env, "bulk:apply", "rejected") == 1


async def test_bulk_with_a_failing_url_changes_nothing(env: Env, server: Blobs) -> None:
    """Rule 6: a bulk whose content_url fails leaves the tree and state as they were."""
    ap = env.applier(fetch_retries=0)
    await ap.apply(upd("keep.txt", b"keep", 1))
    before = tree(env.root)
    missing = {
        "action": "update",
        "file_path": "big.bin",
        "content_url": server.url("nope"),
        "content_hash": sha(b"x"),
        "version": 1,
    }
    assert (
        await ap.apply(bulk(b_upd("a.txt", b"a", 1), b_del("keep.txt", 2), missing))
    ).resync_reason is not None
    assert tree(env.root) == before
    assert env.state.get("a.txt") is None
    assert temps(env.root) == []


async def test_bulk_outcome_when_nothing_is_new(env: Env) -> None:
    """A bulk whose changes are all already known is a duplicate (or stale) as a whole."""
    ap = env.applier()
    await ap.apply(bulk(b_upd("a", b"a", 2), b_upd("b", b"b", 2)))
    assert (await ap.apply(bulk(b_upd("a", b"a", 2), b_upd("b", b"b", 2)))).outcome == "duplicate"
    assert (await ap.apply(bulk(b_upd("a", b"a", 2), b_upd("b", b"b", 1)))).outcome == "stale"
    assert (await ap.apply(bulk(b_upd("a", b"a", 3), b_upd("b", b"b", 1)))).outcome == "noop"


# -- quota ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "event"),
    [
        (Limits(max_file_bytes=10), upd("big.txt", b"x" * 11, 1)),
        (Limits(max_bytes=20), upd("c.txt", b"x" * 11, 1)),
        (Limits(max_files=2), upd("c.txt", b"x", 1)),
        (Limits(max_files=2), bulk(b_upd("c.txt", b"x", 1), b_upd("d.txt", b"y", 1))),
    ],
    ids=["file-bytes", "total-bytes", "files", "bulk-files"],
)
async def test_quota_refuses_and_writes_nothing(
    env: Env, limits: Limits, event: DeltaEvent
) -> None:
    """An event that would break a limit raises QuotaExceededError, counted, nothing written."""
    ap = env.applier(limits=limits)
    await ap.apply(upd("a.txt", b"x" * 5, 1))
    await ap.apply(upd("b.txt", b"x" * 5, 1))
    before = tree(env.root)
    assert (await ap.apply(event)).reason == "quota"
    assert tree(env.root) == before
    assert temps(env.root) == []
    labels = {**IDS, "source": "remote"}
    assert env.metrics.registry.get_sample_value("sidecar_quota_refusals_total", labels) == 1
    assert count(env, event.event, "rejected") == 1


async def test_quota_counts_replacements_and_deletes(env: Env) -> None:
    """Replacing a file counts the size difference, and a delete frees room."""
    ap = env.applier(limits=Limits(max_bytes=20, max_files=2))
    await ap.apply(upd("a.txt", b"x" * 10, 1))
    await ap.apply(upd("b.txt", b"x" * 10, 1))
    assert (await ap.apply(upd("a.txt", b"y" * 10, 2))).outcome == "applied"
    await ap.apply(dele("b.txt", 2))
    assert (await ap.apply(upd("c.txt", b"z" * 10, 1))).outcome == "applied"
    assert env.metrics.registry.get_sample_value("sidecar_project_bytes", IDS) == 20


# -- hostile events and the filesystem -----------------------------------------------------------


async def test_symlinked_directory_pointing_outside_is_not_written_through(env: Env) -> None:
    """A symlink planted in the project that leads outside is refused as a parent."""
    (env.root / "link").symlink_to(env.outside, target_is_directory=True)
    ap = env.applier()
    for ev in (upd("link/secret.txt", b"pwned", 1), upd("link/new.txt", b"pwned", 1)):
        assert (await ap.apply(ev)).reason == "invalid"
    assert (
        await ap.apply(bulk(b_upd("ok.txt", b"ok", 1), b_upd("link/x.txt", b"pwned", 1)))
    ).reason == "invalid"
    assert env.outside_untouched()
    assert not (env.root / "ok.txt").exists()
    assert count(env, "file:update", "rejected") == 2


async def test_delete_through_a_symlinked_directory_outside_is_refused(env: Env) -> None:
    """A delete cannot reach a file outside the project through a planted symlink."""
    (env.root / "link").symlink_to(env.outside, target_is_directory=True)
    ap = env.applier()
    assert (await ap.apply(dele("link/secret.txt", 1))).reason == "invalid"
    assert env.outside_untouched()
    assert count(env, "file:delete", "rejected") == 1


async def test_symlink_into_the_state_dir_is_refused(env: Env) -> None:
    """A symlink inside the project pointing at .sidecar cannot be used to reach the state."""
    (env.root / "s").symlink_to(".sidecar", target_is_directory=True)
    db = (env.root / ".sidecar/state.db").read_bytes()
    ap = env.applier()
    assert (await ap.apply(upd("s/state.db", b"garbage", 1))).reason == "invalid"
    assert (env.root / ".sidecar/state.db").read_bytes() == db


async def test_delete_under_a_file_is_a_noop(env: Env) -> None:
    """Deleting "a/b" while "a" is a file removes nothing and records the tombstone."""
    ap = env.applier()
    await ap.apply(upd("a", b"file", 1))
    assert (await ap.apply(dele("a/b", 1))).outcome == "noop"
    assert tree(env.root) == {"a": b"file"}


async def test_symlinked_directory_inside_the_project_is_allowed(env: Env) -> None:
    """A symlinked directory that stays inside the project may be written through."""
    (env.root / "real").mkdir()
    (env.root / "alias").symlink_to("real", target_is_directory=True)
    ap = env.applier()
    assert (await ap.apply(upd("alias/f.txt", b"ok", 1))).outcome == "applied"
    assert (env.root / "real/f.txt").read_bytes() == b"ok"


@pytest.mark.parametrize("mode", ["atomic", "inplace"])
async def test_symlinked_file_is_replaced_not_followed(env: Env, mode: str) -> None:
    """A symlink at the target path is replaced by a regular file; its target is untouched."""
    (env.root / "evil.txt").symlink_to(env.outside / "secret.txt")
    ap = env.applier(write_mode=mode)
    assert (await ap.apply(upd("evil.txt", b"mine", 1))).outcome == "applied"
    assert not (env.root / "evil.txt").is_symlink()
    assert (env.root / "evil.txt").read_bytes() == b"mine"
    assert env.outside_untouched()


async def test_delete_of_a_symlink_removes_only_the_link(env: Env) -> None:
    """Deleting a path that is a symlink removes the link, never what it points to."""
    (env.root / "evil.txt").symlink_to(env.outside / "secret.txt")
    ap = env.applier()
    assert (await ap.apply(dele("evil.txt", 1))).outcome == "applied"
    assert not (env.root / "evil.txt").is_symlink()
    assert env.outside_untouched()


@pytest.mark.parametrize(
    "path",
    ["../outside/secret.txt", "/etc/passwd", "a/../../outside/x", ".sidecar/state.db", "a\\..\\x"],
)
async def test_hostile_paths_never_reach_the_disk(env: Env, path: str) -> None:
    """Traversal, absolute and reserved paths are rejected at parsing, counted, not written."""
    payload = item_update("placeholder", b"pwned", 1) | {"file_path": path}
    with pytest.raises(InvalidEventError):
        parse_event("file:update", payload, None)
    assert env.outside_untouched()
    assert tree(env.root) == {}


async def test_file_where_a_directory_is_needed_asks_for_resync(env: Env) -> None:
    """An update under a path that is a file, or onto a directory, is a path conflict."""
    ap = env.applier()
    await ap.apply(upd("a", b"file", 1))
    await ap.apply(upd("d/x", b"x", 1))
    for ev in (upd("a/b", b"b", 1), upd("d", b"d", 1)):
        info = await ap.apply(ev)
        assert info.outcome == "rejected"
        assert info.resync_reason == "path_conflict"
    assert tree(env.root) == {"a": b"file", "d/x": b"x"}


# -- content_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["atomic", "inplace"])
async def test_content_url_is_fetched_and_checked(env: Env, server: Blobs, mode: str) -> None:
    """A content_url is downloaded, hash-checked and written (either write mode)."""
    data = os.urandom(300_000)
    server.blobs["blob"] = data
    ap = env.applier(write_mode=mode)
    assert (await ap.apply(url_upd("bin/blob", server.url("blob"), data, 1))).outcome == "applied"
    assert (env.root / "bin/blob").read_bytes() == data
    assert env.state.get("bin/blob") == FileState(1, sha(data), len(data), 0o644)
    assert temps(env.root) == []


async def test_content_url_not_fetched_when_bytes_already_there(env: Env, server: Blobs) -> None:
    """Rule 3 with content_url: known bytes on disk mean no download at all."""
    data = b"known"
    server.blobs["blob"] = data
    ap = env.applier()
    await ap.apply(upd("f", data, 1))
    assert (await ap.apply(url_upd("f", server.url("blob"), data, 2))).outcome == "noop"
    assert server.hits.get("blob", 0) == 0


async def test_content_url_retries_server_errors(env: Env, server: Blobs) -> None:
    """5xx answers are retried; the file arrives once the server recovers."""
    server.blobs["flaky"] = b"eventually"
    server.failures["flaky"] = 2
    ap = env.applier(fetch_retries=3)
    assert (
        await ap.apply(url_upd("f", server.url("flaky"), b"eventually", 1))
    ).outcome == "applied"
    assert server.hits["flaky"] == 3
    assert (env.root / "f").read_bytes() == b"eventually"


@pytest.mark.parametrize(
    ("name", "hits"), [("status-404", 1), ("status-403", 1), ("status-500", 3), ("hang", 3)]
)
async def test_content_url_failures_ask_for_resync(
    env: Env, server: Blobs, name: str, hits: int
) -> None:
    """4xx fails at once, 5xx and timeouts after retries: ResyncNeeded, counted, nothing written."""
    ap = env.applier(fetch_retries=2, fetch_timeout=0.3)
    with capture_logs() as logs:
        info = await ap.apply(url_upd("f.bin", server.url(name), b"x", 1))
    assert info.resync_reason == "content_url"
    assert "sekrit" not in str(info.error)
    assert "sekrit" not in repr(logs)
    assert server.hits[name] == hits
    assert tree(env.root) == {}
    assert temps(env.root) == []
    assert count(env, "file:update", "rejected") == 1


async def test_content_url_with_wrong_bytes_is_a_hash_mismatch(env: Env, server: Blobs) -> None:
    """Bytes from content_url that do not match content_hash are rejected (rule 2)."""
    server.blobs["blob"] = b"tampered"
    ap = env.applier()
    info = await ap.apply(url_upd("f", server.url("blob"), b"original", 1))
    assert info.outcome == "rejected"
    assert info.resync_reason == "hash_mismatch"
    assert tree(env.root) == {}
    assert temps(env.root) == []


@pytest.mark.parametrize("name", ["endless", "blob"])
async def test_content_url_size_is_bounded(env: Env, server: Blobs, name: str) -> None:
    """A body over SIDECAR_MAX_FILE_BYTES (streamed or announced) is refused as over quota."""
    server.blobs["blob"] = b"x" * 200_000
    ap = env.applier(limits=Limits(max_file_bytes=100_000))
    assert (await ap.apply(url_upd("f", server.url(name), b"x", 1))).reason == "quota"
    assert tree(env.root) == {}
    assert temps(env.root) == []


# -- seq, outbound events, hooks, lock -----------------------------------------------------------


async def test_seq_is_recorded_only_upwards_and_on_request(env: Env) -> None:
    """meta "seq" only grows, also from duplicates, and not when record_seq is False."""
    ap = env.applier()
    await ap.apply(upd("a", b"a", 1, seq=10))
    await ap.apply(upd("b", b"b", 1, seq=4))
    assert env.state.meta("seq") == 10
    await ap.apply(upd("a", b"a", 1, seq=11))  # a duplicate still advances seq
    assert env.state.meta("seq") == 11
    await ap.apply(upd("c", b"c", 1, seq=12), record_seq=False)
    assert env.state.meta("seq") == 11


async def test_outbound_and_snapshot_events_are_not_applied(env: Env) -> None:
    """Outbound events are ignored (not counted); snapshot:ready is the sync engine's job."""
    ap = env.applier()
    assert (await ap.apply(parse_event("file:local-change", {}, None))).outcome == "ignored"
    ready = parse_event("snapshot:ready", {"snapshot_url": "https://x/y", "snapshot_id": "s"}, None)
    with pytest.raises(ValueError, match="sync engine"):
        await ap.apply(ready)


async def test_result_paths_are_the_written_and_deleted_paths(env: Env) -> None:
    """ApplyResult.paths holds the paths each apply wrote or deleted, none for no-ops."""
    ap = env.applier()
    assert (await ap.apply(upd("a", b"a", 1))).paths == ("a",)
    assert (await ap.apply(upd("a", b"a", 2))).paths == ()
    assert (await ap.apply(bulk(b_upd("b", b"b", 1), b_del("a", 3)))).paths == ("a", "b")


async def test_lock_holds_back_publication(env: Env) -> None:
    """While a watcher holds Applier.lock, no write is published; afterwards state matches disk."""
    ap = env.applier()
    async with ap.lock:
        task = asyncio.create_task(ap.apply(upd("a.txt", b"bytes", 1)))
        for _ in range(20):
            await asyncio.sleep(0)  # let the apply run up to the lock
        assert not task.done()
        assert not (env.root / "a.txt").exists()
        assert env.state.get("a.txt") is None
    assert (await task).outcome == "applied"
    assert env.state.get("a.txt").sha256 == sha((env.root / "a.txt").read_bytes())  # type: ignore[union-attr]


# -- Hypothesis: convergence under duplication, reordering, loss+replay and restarts -------------

PATHS = ["a.txt", "d/b.txt", "d/e/c.txt", "x/y.bin"]

op_update = st.tuples(st.just("update"), st.sampled_from(PATHS), st.binary(max_size=24))
op_delete = st.tuples(st.just("delete"), st.sampled_from(PATHS), st.just(b""))
op_bulk = st.lists(
    st.one_of(op_update, op_delete), min_size=1, max_size=4, unique_by=lambda o: o[1]
)
ops = st.lists(st.one_of(op_update, op_delete, op_bulk), min_size=1, max_size=20)


def database_history(
    history: list[Any],
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, bytes], dict[str, int]]:
    """Play ops against a 'database': per-path monotonic versions, a global seq, broadcasts."""
    live: dict[str, bytes] = {}
    versions: dict[str, int] = {}
    events: list[tuple[str, dict[str, Any]]] = []
    seq = 0

    def change(action: str, path: str, data: bytes) -> dict[str, Any] | None:
        if action == "delete" and path not in live:
            return None  # the database emits nothing for a row that does not exist
        versions[path] = versions.get(path, 0) + 1
        if action == "delete":
            del live[path]
            return {"action": "delete", "file_path": path, "version": versions[path]}
        live[path] = data
        return {"action": "update", **item_update(path, data, versions[path])}

    for op in history:
        items = [op] if isinstance(op, tuple) else op
        changes = [c for c in (change(*o) for o in items) if c is not None]
        if not changes:
            continue
        seq += 1
        if isinstance(op, tuple):
            (c,) = changes
            name = "file:update" if c.pop("action") == "update" else "file:delete"
            events.append((name, {**c, "seq": seq, "timestamp": seq}))
        else:
            events.append(("bulk:apply", {"files": changes, "seq": seq, "timestamp": seq}))
    return events, live, versions


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Any], list[int], int, str]:
    history = draw(ops)
    n = len(database_history(history)[0])
    if n == 0:
        return history, [], 0, "atomic"
    first = draw(st.lists(st.integers(0, n - 1), max_size=2 * n))  # reordered, duplicated, lossy
    missing = sorted(set(range(n)) - set(first))
    replay = draw(st.permutations(missing))  # the replay brings every lost event back
    extra = draw(st.lists(st.integers(0, n - 1), max_size=n))  # and replays some twice
    order = first + list(replay) + extra
    restart_at = draw(st.integers(0, len(order)))
    return history, order, restart_at, draw(st.sampled_from(["atomic", "inplace"]))


async def _converge(
    root: Path, history: list[Any], order: list[int], restart_at: int, mode: str
) -> None:
    events, live, versions = database_history(history)
    parsed = [parse_event(name, payload, {"replayed": False}) for name, payload in events]
    metrics = Metrics()
    state = StateStore(root / ".sidecar")
    ap = Applier(ProjectTree(root, state, None, metrics), metrics, write_mode=mode)  # type: ignore[arg-type]
    try:
        for i, idx in enumerate(order):
            if i == restart_at:  # the sidecar restarts: new StateStore on the same directory
                await ap.close()
                state.close()
                state = StateStore(root / ".sidecar")
                ap = Applier(ProjectTree(root, state, None, metrics), metrics, write_mode=mode)  # type: ignore[arg-type]
            assert (await ap.apply(parsed[idx])).outcome != "rejected"
        assert tree(root) == live
        assert temps(root) == []
        assert empty_dirs(root) == []
        for path, version in versions.items():
            assert state.get(path).version == version  # type: ignore[union-attr]
    finally:
        await ap.close()
        state.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_any_delivery_order_converges_to_the_database(
    scenario: tuple[list[Any], list[int], int, str],
) -> None:
    """Duplicated, reordered, lost-then-replayed events with a restart converge to the database."""
    history, order, restart_at, mode = scenario
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "project"
        root.mkdir()
        asyncio.run(_converge(root, history, order, restart_at, mode))


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path: Path) -> Iterator[None]:
    """Nothing is ever written next to tmp_path's project and outside dirs."""
    yield
    assert {p.name for p in tmp_path.iterdir()} <= {"project", "outside"}
