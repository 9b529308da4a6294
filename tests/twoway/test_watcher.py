"""The local-change watcher: ignore rules, decisions by content, and exact echo suppression."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.live.apply import Applier
from sidecar.live.events import parse_event
from sidecar.metrics import Metrics
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState, StateStore
from sidecar.twoway.localsync import LocalSync
from sidecar.twoway.watcher import IgnoreRules, Watcher, examine


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record(state: StateStore, rel: str, data: bytes, version: int = 1) -> None:
    state.update({rel: FileState(version, sha(data), len(data), 0o644)})


@dataclass
class Running:
    """A watcher consumed by a background task; batches land in a queue."""

    watcher: Watcher
    batches: asyncio.Queue[set[str]] = field(default_factory=asyncio.Queue)
    seen: list[set[str]] = field(default_factory=list)

    async def next(self, timeout: float = 5.0) -> set[str]:
        batch = await asyncio.wait_for(self.batches.get(), timeout)
        return batch

    async def until(self, path: str, timeout: float = 5.0) -> list[set[str]]:
        """Batches up to and including the first that names path."""
        out: list[set[str]] = []
        async with asyncio.timeout(timeout):
            while True:
                batch = await self.batches.get()
                out.append(batch)
                if path in batch:
                    return out


@contextlib.asynccontextmanager
async def running(watcher: Watcher) -> AsyncIterator[Running]:
    r = Running(watcher)

    async def consume() -> None:
        async for verdicts in watcher:
            batch = set(verdicts)
            r.seen.append(batch)
            r.batches.put_nowait(batch)

    task = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(10):
            await watcher.ready.wait()
        yield r
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def state(tmp_path: Path) -> StateStore:
    """A StateStore under project/.sidecar."""
    (tmp_path / "project").mkdir()
    return StateStore(tmp_path / "project" / ".sidecar")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The project directory (its .sidecar holds the state)."""
    return tmp_path / "project"


def test_ignore_rules() -> None:
    """State dir, temp files, editor swap files and configured patterns are ignored."""
    rules = IgnoreRules(
        ["node_modules", ".git", "docs/_build", "*.log"], extra_prefixes=["var/state"]
    )
    ignored = [
        ".sidecar",
        ".sidecar/state.db",
        "node_modules/x/index.js",
        "a/node_modules/b",
        ".git/HEAD",
        "docs/_build/index.html",
        "server.log",
        "src/.app.ts.sidecar-tmp-1a2b",
        "src/.app.ts.swp",
        "src/app.ts~",
        "src/.#app.ts",
        "src/#app.ts#",
        "4913",
        "var/state/x",
        "a.sync-conflict-20250101-000000-s.txt",
    ]
    kept = [
        "src/app.ts",
        "docs/index.md",
        "nodemodules/x",
        "gitignore",
        ".github/ci.yml",
        "var/other",
        "sidecar-tmp-notours",
        "docs/_buildx/a",
    ]
    assert [p for p in ignored if not rules(p)] == []
    assert [p for p in kept if rules(p)] == []


def test_examine_decides_by_content(project: Path, state: StateStore) -> None:
    """Same bytes: no change; other bytes, new file, missing file: a change of that kind."""
    (project / "same.txt").write_bytes(b"v1")
    record(state, "same.txt", b"v1")
    assert examine(project, "same.txt", state) is None
    (project / "same.txt").write_bytes(b"v2")
    ch = examine(project, "same.txt", state)
    assert ch is not None
    assert (ch.kind, ch.data, ch.sha256, ch.known) == (
        "modified",
        b"v2",
        sha(b"v2"),
        state.get("same.txt"),
    )
    (project / "new.txt").write_bytes(b"n")
    ch = examine(project, "new.txt", state)
    assert ch is not None
    assert ch.kind == "created"
    record(state, "gone.txt", b"g")
    ch = examine(project, "gone.txt", state)
    assert ch is not None
    assert ch.kind == "deleted"
    assert ch.data is None
    state.update({"tomb.txt": FileState(4, None)})
    assert examine(project, "tomb.txt", state) is None
    (project / "tomb.txt").write_bytes(b"back")
    ch = examine(project, "tomb.txt", state)
    assert ch is not None
    assert ch.kind == "created"
    os.symlink("same.txt", project / "link")
    assert examine(project, "link", state) is None
    (project / "big.bin").write_bytes(b"x" * 100)
    ch = examine(project, "big.bin", state, max_read=10)
    assert ch is not None
    assert (ch.data, ch.sha256, ch.size) == (None, sha(b"x" * 100), 100)


async def test_reports_a_local_edit_and_not_an_unchanged_write(
    project: Path, state: StateStore
) -> None:
    """Rewriting the synced bytes is no change; a real edit is reported once armed."""
    (project / "a.txt").write_bytes(b"synced")
    record(state, "a.txt", b"synced")
    async with running(Watcher(ProjectTree(project, state), state_dir=project / ".sidecar")) as r:
        (project / "a.txt").write_bytes(b"synced")  # same bytes: an echo
        (project / ".sidecar" / "junk").write_bytes(b"ignored")
        (project / "b.txt").write_bytes(b"new")
        batches = await r.until("b.txt")
        assert all(b == {"b.txt"} for b in batches)
        (project / "a.txt").write_bytes(b"edited")
        assert await r.next() == {"a.txt"}
        assert r.watcher.echoes >= 1


async def test_directories_expand_to_files(project: Path, state: StateStore) -> None:
    """A new directory reports its files; a removed directory reports its known files."""
    for rel in ("lib/x.ts", "lib/sub/y.ts"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes(rel.encode())
        record(state, rel, rel.encode())
    async with running(Watcher(ProjectTree(project, state))) as r:
        shutil.rmtree(project / "lib")
        found: set[str] = set()
        async with asyncio.timeout(5):
            while found != {"lib/x.ts", "lib/sub/y.ts"}:
                found |= await r.next()
        staging = project.parent / "staging"
        (staging / "deep").mkdir(parents=True)
        (staging / "deep" / "z.ts").write_bytes(b"z")
        (staging / "node_modules").mkdir()
        (staging / "node_modules" / "m.js").write_bytes(b"m")
        staging.rename(project / "pkg")  # one event for a whole tree
        batches = await r.until("pkg/deep/z.ts")
        assert set().union(*batches) == {"pkg/deep/z.ts"}


async def test_initial_scan_reports_offline_changes(project: Path, state: StateStore) -> None:
    """Changes made while nothing watched are reported right after arming."""
    (project / "kept.txt").write_bytes(b"k")
    record(state, "kept.txt", b"k")
    (project / "edited.txt").write_bytes(b"new")
    record(state, "edited.txt", b"old")
    record(state, "removed.txt", b"r")
    (project / "node_modules").mkdir()
    (project / "node_modules" / "dep.js").write_bytes(b"d")
    w = Watcher(ProjectTree(project, state), initial_scan=True)
    async with running(w) as r:
        assert await r.next() == {"edited.txt", "removed.txt"}


@pytest.mark.parametrize("write_mode", ["atomic", "inplace"])
async def test_echo_suppression_under_a_storm(
    project: Path, state: StateStore, write_mode: str
) -> None:
    """1,000 remote updates applied while the watcher runs produce zero local-change events.

    1. LocalSync runs on a watcher sharing the Applier's lock; 2. 1,000 file:update events
    (20 paths, growing versions, some new files) go through Applier.apply (its before_publish
    hook wired to LocalSync), as the app does; 3. a sentinel local edit is made; 4. the sentinel is the only
    file:local-change ever sent, no conflict was seen, and the watcher did drop echoes.
    """
    metrics = Metrics()
    ptree = ProjectTree(project, state)
    applier = Applier(ptree, metrics, write_mode=write_mode)  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []
    got_sentinel = asyncio.Event()

    async def send(event: str, payload: dict[str, Any]) -> None:
        sent.append(payload)
        if payload["path"] == "sentinel.txt":
            got_sentinel.set()

    ls = LocalSync(ptree, project / ".sidecar", metrics, send=send)
    applier.before_publish = ls.before_publish
    w = ls.watcher()
    task = asyncio.create_task(ls.run(w))
    try:
        async with asyncio.timeout(10):
            await w.ready.wait()
        for i in range(1000):
            rel = f"src/f{i % 20}.ts" if i % 7 else f"gen/n{i}.ts"
            data = f"// update {i}\n".encode() * (1 + i % 5)
            payload = {
                "file_path": rel,
                "content": data.decode(),
                "content_hash": sha(data),
                "version": i + 1,
            }
            ev = parse_event("file:update", payload, None)
            assert (await applier.apply(ev)).outcome == "applied"
        (project / "sentinel.txt").write_bytes(b"local")
        async with asyncio.timeout(20):
            await got_sentinel.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [p["path"] for p in sent] == ["sentinel.txt"]
    assert ls.conflicts_total == 0
    assert w.echoes > 0
    assert w.reported == 1


async def test_local_edit_gives_one_local_change_with_a_diff(
    project: Path, state: StateStore
) -> None:
    """LocalSync fed by the watcher broadcasts exactly one file:local-change with the diff."""
    (project / "app.ts").write_bytes(b"line 1\nline 2\nline 3\n")
    record(state, "app.ts", b"line 1\nline 2\nline 3\n", version=7)
    sent: list[tuple[str, dict[str, Any]]] = []

    async def send(event: str, payload: dict[str, Any]) -> None:
        sent.append((event, payload))

    ptree = ProjectTree(project, state)
    ls = LocalSync(
        ptree,
        project / ".sidecar",
        Metrics(),
        send=send,
        session_id="s1",
    )
    w = ls.watcher()
    task = asyncio.create_task(ls.run(w))
    try:
        async with asyncio.timeout(10):
            await w.ready.wait()
        (project / "app.ts").write_bytes(b"line 1\nline two\nline 3\n")
        (project / "app.ts").write_bytes(b"line 1\nline two\nline 3\n")  # same bytes again
        async with asyncio.timeout(5):
            while not sent:
                await asyncio.sleep(0.01)
        (project / "other.txt").write_bytes(b"sentinel\n")
        async with asyncio.timeout(5):
            while not any(p["path"] == "other.txt" for _, p in sent):
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    mine = [p for e, p in sent if e == "file:local-change" and p["path"] == "app.ts"]
    assert len(mine) == 1
    p = mine[0]
    assert p["diff"] == (
        "--- a/app.ts\n+++ b/app.ts\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n+line two\n line 3\n"
    )
    assert (p["action"], p["base_version"], p["new_hash"], p["session_id"]) == (
        "modify",
        7,
        sha(b"line 1\nline two\nline 3\n"),
        "s1",
    )
    assert isinstance(p["timestamp"], int)


@pytest.mark.parametrize("files", [2_000, 8_000])
async def test_resync_of_thousands_of_files_reports_no_local_change(
    tmp_path: Path, project: Path, state: StateStore, snapshot_server: Any, files: int
) -> None:
    """A snapshot published at run time (a resync) is the sidecar's own write: zero
    file:local-change while LocalSync and its watcher run, as `sidecar run` wires them.

    1. hydrate snapshot A (files paths), then start LocalSync on a watcher with initial_scan;
    2. hydrate snapshot B in place: every file rewritten, a tenth removed, a tenth new;
    3. a sentinel local edit is made; 4. it is the only file:local-change ever sent. Before
    the publish step took the tree's lock, 2,000 files gave 186 reports and 8,000 gave 1,478.
    """
    from sidecar.config import Settings
    from sidecar.snapshot.build import build_snapshot
    from sidecar.snapshot.hydrate import hydrate
    from sidecar.snapshot.progress import Progress

    metrics = Metrics()
    ptree = ProjectTree(project, state, None, metrics)
    settings = Settings(project_id="p1", project_dir=project, state_dir=project / ".sidecar")

    def publish(name: str, tree: dict[str, bytes], seq: int) -> str:
        src = tmp_path / f"src-{name}"
        for rel, data in tree.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        out = tmp_path / f"{name}.tar.zst"
        versions = dict.fromkeys(tree, seq)
        build_snapshot(src, out, project_id="p1", snapshot_id=name, seq=seq, versions=versions)
        snapshot_server.add(f"{name}.tar.zst", out.read_bytes())
        url: str = snapshot_server.url_for(f"{name}.tar.zst")
        return url

    a = {f"src/d{i % 40}/f{i}.ts": f"export const a{i} = 1;\n".encode() for i in range(files)}
    b = {p: d + b"// b\n" for i, (p, d) in enumerate(a.items()) if i % 10}
    b |= {f"new/n{i}.ts": b"new\n" for i in range(files // 10)}
    url_a, url_b = publish("a", a, 1), publish("b", b, 2)
    await hydrate(settings, ptree, metrics, url=url_a, progress=Progress(enabled=False))

    sent: list[dict[str, Any]] = []
    got_sentinel = asyncio.Event()

    async def send(event: str, payload: dict[str, Any]) -> None:
        sent.append(payload)
        if payload["path"] == "sentinel.txt":
            got_sentinel.set()

    ls = LocalSync(ptree, project / ".sidecar", metrics, send=send)
    w = ls.watcher(initial_scan=True)
    task = asyncio.create_task(ls.run(w))
    try:
        async with asyncio.timeout(20):
            await w.ready.wait()
        await hydrate(settings, ptree, metrics, url=url_b, progress=Progress(enabled=False))
        (project / "sentinel.txt").write_bytes(b"local")
        async with asyncio.timeout(60):
            await got_sentinel.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [p["path"] for p in sent] == ["sentinel.txt"]
    assert ls.conflicts_total == 0


async def test_localsync_uses_the_watchers_verdict(project: Path, state: StateStore) -> None:
    """Each change is read once: LocalSync reports what the watcher examined without reading
    the file again (report-only: no push, so no re-check either)."""
    sent: list[dict[str, Any]] = []
    got = asyncio.Event()

    async def send(_event: str, payload: dict[str, Any]) -> None:
        sent.append(payload)
        got.set()

    ls = LocalSync(ProjectTree(project, state), project / ".sidecar", Metrics(), send=send)
    reads: list[str] = []
    examine = ls._examine

    async def spy(rel: str, **kwargs: Any) -> Any:
        reads.append(rel)
        return await examine(rel, **kwargs)

    ls._examine = spy  # type: ignore[method-assign]
    w = ls.watcher()
    task = asyncio.create_task(ls.run(w))
    try:
        async with asyncio.timeout(10):
            await w.ready.wait()
        (project / "new.txt").write_bytes(b"hello\n")
        async with asyncio.timeout(10):
            await got.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [p["path"] for p in sent] == ["new.txt"]
    assert sent[0]["new_hash"] == sha(b"hello\n")
    assert reads == []
