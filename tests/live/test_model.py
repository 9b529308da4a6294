"""The sync engine and the applier against a reference model of the database (hypothesis).

The database is a dict of versioned paths with a gap-free seq and its broadcast log; the
network between it and the sidecar duplicates, reorders and drops messages; a rejoin replays
the latest 25 of the log; a `snapshot:request` may be answered by a snapshot of any seq the
database has had (older than what the sidecar applied, equal, newer), late and more than once;
hostile copies of events (a content_hash that does not match) make the sidecar ask for one;
the sidecar restarts. The resync path is the real one: `hydrate()` downloads the snapshot from
a Storage-style server on loopback and publishes it through the tree.

Invariants after every step: no path ever holds an older version than one it held before
(monotonic per path), and the bytes on disk are the database's bytes of the version the state
records. At the end, once the network is drained and requests answered, the tree is the
database's head.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from sidecar.config import Settings, SnapshotSettings
from sidecar.live.apply import Applier
from sidecar.live.engine import SyncEngine, SyncTuning
from sidecar.metrics import Metrics
from sidecar.snapshot.build import build_snapshot
from sidecar.snapshot.hydrate import hydrate
from sidecar.snapshot.manifest import Manifest
from sidecar.snapshot.progress import Progress
from sidecar.testing.snapshot_server import SnapshotServer
from sidecar.tree.fsio import is_temp_name
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import StateStore

Msg = tuple[str, dict[str, Any], dict[str, Any]]
PATHS = ("a.txt", "d/b.txt", "d/c.txt", "e.txt")
TEXTS = st.sampled_from(["", "x", "yy\n", "hello\n", "zzz zzz\n"])
FAST = SyncTuning(reorder_wait=0.01, replay_wait=0.05, request_wait=5.0, replay_margin=1.0)
REPLAY_LIMIT = 25


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelDb:
    """project_files (every version of every path), the seq, the log and the tree at each seq."""

    def __init__(self) -> None:
        self.head: dict[str, tuple[int, bytes | None]] = {}
        self.versions: dict[tuple[str, int], bytes | None] = {}
        self.log: list[Msg] = []
        self.trees: list[dict[str, tuple[int, bytes | None]]] = [{}]  # index = seq

    @property
    def seq(self) -> int:
        return len(self.trees) - 1

    def live(self) -> dict[str, bytes]:
        return {p: d for p, (_v, d) in self.head.items() if d is not None}

    def write(self, changes: dict[str, bytes | None]) -> Msg:
        """One transaction: the changed paths get their next version and share one seq."""
        files: list[dict[str, Any]] = []
        for path, data in changes.items():
            ver = self.head.get(path, (0, None))[0] + 1
            self.head[path] = (ver, data)
            self.versions[(path, ver)] = data
            if data is None:
                files.append({"action": "delete", "file_path": path, "version": ver})
            else:
                files.append(
                    {
                        "action": "update",
                        "file_path": path,
                        "version": ver,
                        "content": data.decode(),
                        "content_hash": sha(data),
                    }
                )
        self.trees.append(dict(self.head))
        common = {"seq": self.seq, "timestamp": int(time.time() * 1000)}
        if len(files) > 1:
            msg: Msg = ("bulk:apply", {"files": files, **common}, {"id": f"row-{self.seq}"})
        else:
            f = dict(files[0])
            event = "file:delete" if f.pop("action") == "delete" else "file:update"
            msg = (event, {**f, **common}, {"id": f"row-{self.seq}"})
        self.log.append(msg)
        return msg


class Sidecar:
    """One run of the engine + applier over a project directory (rebuilt by a restart)."""

    def __init__(self, project: Path, server: SnapshotServer, link: Link) -> None:
        self.metrics = Metrics("p1", "s1")
        self.state = StateStore(project / ".sidecar")
        self.tree = ProjectTree(project, self.state, None, self.metrics)
        self.applier = Applier(self.tree, self.metrics)
        settings = Settings(
            project_id="p1",
            project_dir=project,
            state_dir=project / ".sidecar",
            snapshot=SnapshotSettings(retries=1, backoff_initial=0.001, backoff_max=0.01),
        )

        async def resync(url: str, sha256: str | None) -> Manifest:
            return await hydrate(
                settings,
                self.tree,
                self.metrics,
                url=url,
                sha256=sha256,
                progress=Progress(enabled=False),
            )

        self.engine = SyncEngine(
            self.applier, self.metrics, link=link, resync=resync, session_id="s1", tuning=FAST
        )
        self.task = asyncio.get_running_loop().create_task(self.engine.run())

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        await self.applier.close()
        self.state.close()


class Link:
    """The subscription as the engine sees it: records requests and rejoins."""

    def __init__(self) -> None:
        self.requests = 0
        self.rejoins = 0

    async def send(self, event: str, payload: dict[str, Any]) -> None:
        if event == "snapshot:request":
            self.requests += 1

    def rejoin(self, since_ms: int) -> None:
        self.rejoins += 1

    def set_replay_since(self, ms: int, *, rejoin: bool = False) -> None:
        pass


def disk(project: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for root, dirs, files in os.walk(project):
        if Path(root) == project:
            dirs[:] = [d for d in dirs if d != ".sidecar"]
        for name in files:
            if not is_temp_name(name):
                p = Path(root, name)
                out[p.relative_to(project).as_posix()] = p.read_bytes()
    return out


class SyncAgainstDatabase(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="sidecar-model-"))
        self.project = self.tmp / "project"
        self.project.mkdir()
        self.db = ModelDb()
        self.link = Link()
        self.pending: list[Msg] = []  # in flight, in the order the database sent them
        self.readies: list[Msg] = []  # every snapshot:ready sent so far
        self.held_max: dict[str, int] = {}  # the newest version each path ever held
        self.snapshots = itertools.count(1)
        self.server = SnapshotServer()
        self.run(self.server.__aenter__())
        self.sidecar = self.run(self._start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _start(self) -> Sidecar:
        sc = Sidecar(self.project, self.server, self.link)
        sc.engine.mark_hydrated(Manifest("p1", "empty", 0, {}, seq=0))
        await self._settle(sc)
        return sc

    async def _settle(self, sc: Sidecar | None = None) -> None:
        sc = sc or self.sidecar
        async with asyncio.timeout(30):
            await sc.engine.wait_idle()
        await asyncio.sleep(0)

    def deliver(self, msg: Msg, *, replayed: bool = False) -> None:
        event, payload, meta = msg
        meta = {**meta, "replayed": True} if replayed else dict(meta)
        self.sidecar.engine.on_message(event, dict(payload), meta)
        self.run(self._settle())

    # -- the database --

    @rule(path=st.sampled_from(PATHS), text=TEXTS)
    def db_update(self, path: str, text: str) -> None:
        self.pending.append(self.db.write({path: text.encode()}))

    @precondition(lambda self: bool(self.db.live()))
    @rule(data=st.data())
    def db_delete(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.db.live())))
        self.pending.append(self.db.write({path: None}))

    @rule(
        changes=st.dictionaries(
            st.sampled_from(PATHS), st.one_of(st.none(), TEXTS), min_size=2, max_size=4
        )
    )
    def db_bulk(self, changes: dict[str, str | None]) -> None:
        self.pending.append(
            self.db.write({p: None if t is None else t.encode() for p, t in changes.items()})
        )

    # -- the network --

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), duplicate=st.booleans())
    def deliver_one(self, data: st.DataObject, duplicate: bool) -> None:
        """Any message in flight arrives (reordering); a duplicate stays in flight."""
        i = data.draw(st.integers(0, len(self.pending) - 1))
        msg = self.pending[i] if duplicate else self.pending.pop(i)
        self.deliver(msg)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def drop_one(self, data: st.DataObject) -> None:
        self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))

    @precondition(lambda self: any(m[0] == "file:update" for m in self.pending))
    @rule(data=st.data())
    def hostile_copy(self, data: st.DataObject) -> None:
        """An update arrives with bytes that do not match its content_hash (and the genuine
        one is lost): the sidecar must ask for a snapshot."""
        updates = [i for i, m in enumerate(self.pending) if m[0] == "file:update"]
        event, payload, meta = self.pending.pop(data.draw(st.sampled_from(updates)))
        self.deliver((event, {**payload, "content": payload["content"] + "!"}, meta))

    @rule()
    def rejoin_replays(self) -> None:
        """A rejoin (asked for by the engine or not) replays the latest 25 of the log."""
        self.link.rejoins = 0
        for msg in self.db.log[-REPLAY_LIMIT:]:
            self.deliver(msg, replayed=True)

    @rule(data=st.data())
    def snapshot_ready(self, data: st.DataObject) -> None:
        """A snapshot:ready for a snapshot of any seq the database has had."""
        seq = data.draw(st.integers(0, self.db.seq))
        msg = self.run(self._publish_snapshot(seq))
        self.readies.append(msg)
        self.deliver(msg)

    @precondition(lambda self: bool(self.readies))
    @rule(data=st.data())
    def late_snapshot_ready(self, data: st.DataObject) -> None:
        self.deliver(data.draw(st.sampled_from(self.readies)))

    @rule()
    def restart(self) -> None:
        self.run(self.sidecar.stop())
        self.sidecar = self.run(self._restarted())

    async def _restarted(self) -> Sidecar:
        sc = Sidecar(self.project, self.server, self.link)
        sc.engine.mark_hydrated(None)  # the tree in place is what the state records
        await self._settle(sc)
        return sc

    async def _publish_snapshot(self, seq: int) -> Msg:
        n = next(self.snapshots)
        src = self.tmp / f"src-{n}"
        src.mkdir()
        tree = self.db.trees[seq]
        for path, (_ver, data) in tree.items():
            if data is not None:
                (src / path).parent.mkdir(parents=True, exist_ok=True)
                (src / path).write_bytes(data)
        out = self.tmp / f"snap-{n}.tar.zst"
        versions = {p: v for p, (v, d) in tree.items() if d is not None}
        build_snapshot(
            src, out, project_id="p1", snapshot_id=f"snap-{n}", seq=seq, versions=versions
        )
        blob = out.read_bytes()
        self.server.add(f"p1/snap-{n}.tar.zst", blob)
        payload = {
            "snapshot_url": self.server.url_for(f"p1/snap-{n}.tar.zst"),
            "snapshot_id": f"snap-{n}",
            "sha256": sha(blob),
            "seq": seq,
            "timestamp": int(time.time() * 1000),
        }
        return ("snapshot:ready", payload, {"id": f"ready-{n}"})

    # -- invariants --

    @invariant()
    def monotonic_per_path_and_disk_matches_state(self) -> None:
        on_disk = disk(self.project)
        for path in set(PATHS) | set(on_disk):
            known = self.sidecar.tree.get(path)
            version = known.version if known is not None else 0
            assert version >= self.held_max.get(path, 0), (
                f"{path} went back from v{self.held_max.get(path)} to v{version}"
            )
            self.held_max[path] = version
            if known is None or known.deleted:
                # A snapshot does not carry tombstones: one recorded from a snapshot keeps the
                # last version known, and the database deleted the path at that one or later.
                assert path not in on_disk, f"{path}: on disk but recorded as deleted"
                assert known is None or any(
                    d is None
                    for (p, v), d in self.db.versions.items()
                    if p == path and v >= version
                ), f"{path}: recorded as deleted at v{version}, never deleted from then on"
            else:
                expected = self.db.versions.get((path, known.version))
                assert on_disk.get(path) == expected, f"{path}: disk differs from v{version}"

    def teardown(self) -> None:
        try:
            self.run(self._quiesce())
            assert disk(self.project) == self.db.live()
        finally:
            self.run(self.sidecar.stop())
            self.run(self.server.__aexit__(None, None, None))
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _quiesce(self) -> None:
        """Drain the network, then one more edit (it reveals any gap); serve what the engine
        asks for (rejoins replay, requests get the head snapshot) until it has converged."""
        self.pending.append(self.db.write({"z.txt": b"end"}))
        for msg in self.pending:
            self.sidecar.engine.on_message(msg[0], dict(msg[1]), dict(msg[2]))
        self.pending.clear()
        async with asyncio.timeout(60):
            while True:
                await self._settle()
                sc = self.sidecar
                if disk(self.project) == self.db.live() and sc.engine.last_seq == self.db.seq:
                    return
                if self.link.rejoins:
                    self.link.rejoins = 0
                    for msg in self.db.log[-REPLAY_LIMIT:]:
                        sc.engine.on_message(msg[0], dict(msg[1]), {**msg[2], "replayed": True})
                elif sc.engine.status().snapshot_requested:
                    msg = await self._publish_snapshot(self.db.seq)
                    sc.engine.on_message(msg[0], dict(msg[1]), dict(msg[2]))
                await asyncio.sleep(0.02)


SyncAgainstDatabase.TestCase.settings = settings(
    max_examples=int(os.environ.get("SIDECAR_MODEL_EXAMPLES", "30")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_sync_against_database = pytest.mark.timeout(900)(SyncAgainstDatabase.TestCase)
