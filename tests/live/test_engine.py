"""SyncEngine: delta rules 4 (buffer until hydrated) and 5 (seq gaps, replay, snapshot:request /
snapshot:ready) of sidecar/live/__init__.py, hostile input, coalescing, and random delivery histories (Hypothesis)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar.config import Limits
from sidecar.live.apply import Applier
from sidecar.live.engine import SyncEngine, SyncTuning
from sidecar.metrics import Metrics
from sidecar.snapshot.manifest import FileEntry, Manifest
from sidecar.tree.fsio import is_temp_name
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState, StateStore

Msg = tuple[str, dict[str, Any], dict[str, Any]]
DB_META = {"id": "row-db"}  # what realtime.send adds: the events below come from the database
FAST = SyncTuning(reorder_wait=0.01, replay_wait=0.05, request_wait=2.0, replay_margin=1.0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a tiny model of the database side: versions, seq, the event stream, snapshots --


@dataclass
class Db:
    """project_files as the database holds it, plus the broadcast log (realtime.messages)."""

    files: dict[str, tuple[int, bytes | None]] = field(default_factory=dict)  # path -> (ver, bytes)
    log: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    seq: int = 0

    def update(self, path: str, text: str, *, with_seq: bool = True) -> Msg:
        ver = self.files.get(path, (0, None))[0] + 1
        data = text.encode()
        self.files[path] = (ver, data)
        payload: dict[str, Any] = {
            "file_path": path,
            "content": text,
            "content_hash": sha(data),
            "version": ver,
            "timestamp": int(time.time() * 1000),
        }
        return self._emit("file:update", payload, with_seq)

    def delete(self, path: str, *, with_seq: bool = True) -> Msg:
        ver = self.files.get(path, (0, None))[0] + 1
        self.files[path] = (ver, None)
        payload: dict[str, Any] = {
            "file_path": path,
            "version": ver,
            "timestamp": int(time.time() * 1000),
        }
        return self._emit("file:delete", payload, with_seq)

    def _emit(self, event: str, payload: dict[str, Any], with_seq: bool) -> Msg:
        if with_seq:
            self.seq += 1
            payload["seq"] = self.seq
        msg = (event, payload, {"id": f"row-{len(self.log)}"})
        self.log.append(msg)
        return msg

    def live(self) -> dict[str, bytes]:
        return {p: d for p, (_v, d) in self.files.items() if d is not None}

    def hydrate_into(self, project: Path, state: StateStore, snapshot_id: str) -> Manifest:
        """Publish the database's current tree the way hydrate() does (in-process stand-in)."""
        entries: dict[str, FileEntry] = {}
        records: list[tuple[str, FileState]] = []
        for path, (ver, data) in self.files.items():
            target = project / path
            if data is None:
                target.unlink(missing_ok=True)
                records.append((path, FileState(ver, None)))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            entries[path] = FileEntry(path, len(data), sha(data), 0o644, ver)
            records.append((path, FileState(ver, sha(data), len(data), 0o644)))
        state.replace_all(records, meta={"seq": self.seq, "snapshot_id": snapshot_id})
        return Manifest("p1", snapshot_id, int(time.time() * 1000), entries, seq=self.seq)


def tree(project: Path) -> dict[str, bytes]:
    """Files under project, without the sidecar's own state dir (staging comes and goes)."""
    out = {}
    for root, dirs, files in os.walk(project):
        if Path(root) == project:
            dirs[:] = [d for d in dirs if d != ".sidecar"]
        for name in files:
            if is_temp_name(name):
                continue  # an atomic write in progress
            p = Path(root, name)
            try:
                out[p.relative_to(project).as_posix()] = p.read_bytes()
            except FileNotFoundError:
                continue  # replaced or removed while we walked
    return out


class Link:
    """The engine's view of the subscription, in process: records sends and rejoins and lets a
    test decide what a rejoin replays (the server keeps the latest 25 of the log)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.rejoins: list[int] = []
        self.since_calls: list[tuple[int, bool]] = []
        self.on_rejoin: Callable[[int], None] | None = None
        self.on_send: Callable[[str, dict[str, Any]], None] | None = None

    async def send(self, event: str, payload: dict[str, Any]) -> None:
        self.sent.append((event, payload))
        if self.on_send is not None:
            self.on_send(event, payload)

    def rejoin(self, since_ms: int) -> None:
        self.rejoins.append(since_ms)
        if self.on_rejoin is not None:
            self.on_rejoin(since_ms)

    def set_replay_since(self, ms: int, *, rejoin: bool = False) -> None:
        self.since_calls.append((ms, rejoin))


@dataclass
class Rig:
    project: Path
    state: StateStore
    metrics: Metrics
    applier: Applier
    engine: SyncEngine
    link: Link
    db: Db

    def feed(self, msg: tuple[str, Any, Any]) -> None:
        self.engine.on_message(*msg)

    async def until(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.005)

    def converged(self) -> bool:
        return tree(self.project) == self.db.live()


@contextlib.asynccontextmanager
async def rig(
    root: Path, *, tuning: SyncTuning = FAST, limits: Limits | None = None, resync: bool = True
) -> AsyncIterator[Rig]:
    project = root / "project"
    project.mkdir()
    state = StateStore(project / ".sidecar")
    metrics = Metrics("p1", "s1")
    applier = Applier(ProjectTree(project, state, limits, metrics), metrics)
    link = Link()
    db = Db()
    snapshots: list[str] = []

    async def do_resync(url: str, sha256: str | None) -> Manifest:
        snapshots.append(url)
        return db.hydrate_into(project, state, url.rsplit("/", 1)[-1])

    engine = SyncEngine(
        applier,
        metrics,
        link=link,
        resync=do_resync if resync else None,
        session_id="s1",
        tuning=tuning,
    )
    task = asyncio.create_task(engine.run())
    try:
        yield Rig(project, state, metrics, applier, engine, link, db)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await applier.close()
        state.close()


def events_total(metrics: Metrics, outcome: str, event: str | None = None) -> float:
    """sidecar_events_total for one outcome (summed over event names unless one is given)."""
    total = 0.0
    for fam in metrics.registry.collect():
        for sample in fam.samples:
            labels = sample.labels
            if (
                sample.name == "sidecar_events_total"
                and labels.get("outcome") == outcome
                and (event is None or labels.get("event") == event)
            ):
                total += sample.value
    return total


def replay(r: Rig) -> None:
    """What a rejoin delivers: the latest 25 rows of the broadcast log."""
    for m in r.db.log[-25:]:
        r.feed(m)


def answer_requests(r: Rig) -> None:
    """Make the fake producer answer snapshot:request with snapshot:ready for the db's head."""

    def on_send(event: str, payload: dict[str, Any]) -> None:
        if event == "snapshot:request":
            r.feed(
                (
                    "snapshot:ready",
                    {
                        "snapshot_url": f"http://snap.test/s/{r.db.seq}",
                        "snapshot_id": f"snap-{r.db.seq}",
                        "seq": r.db.seq,
                        "timestamp": int(time.time() * 1000),
                    },
                    {"id": "x"},
                )
            )

    r.link.on_send = on_send


# -- tests --


async def test_buffered_until_hydrated_then_applied_in_order(tmp_path: Path) -> None:
    """Events before hydration are buffered (nothing written), then applied in seq order."""
    async with rig(tmp_path) as r:
        msgs = [
            r.db.update("a.txt", "one"),
            r.db.update("b.txt", "bee"),
            r.db.update("a.txt", "two"),
            r.db.delete("b.txt"),
        ]
        for m in reversed(msgs):
            r.feed(m)
        await r.until(lambda: r.engine.counts.get("buffered") == 4)
        assert tree(r.project) == {}
        assert r.engine.counts["buffered"] == 4
        manifest = Manifest("p1", "snap-0", int(time.time() * 1000) - 5000, {}, seq=0)
        r.engine.mark_hydrated(manifest)
        await r.until(r.converged)
        await r.until(lambda: r.engine.last_seq == 4)
        assert r.state.meta("seq") == 4
        assert r.link.since_calls == [(manifest.created_at, True)]  # rule 4: replay since it
        assert tree(r.project) == {"a.txt": b"two"}


async def test_snapshot_already_had_them(tmp_path: Path) -> None:
    """Buffered events at or below the snapshot's seq are duplicates and never written."""
    async with rig(tmp_path) as r:
        early = [r.db.update("a.txt", "v1"), r.db.update("a.txt", "v2")]
        manifest = r.db.hydrate_into(r.project, r.state, "snap-2")
        (r.project / "a.txt").write_text("v2")
        late = r.db.update("c.txt", "new")
        for m in [*early, late]:
            r.feed(m)
        r.engine.mark_hydrated(manifest)
        await r.until(r.converged)
        await r.until(lambda: r.engine.counts.get("duplicate", 0) == 2)
        assert r.engine.counts.get("applied") == 1


async def test_gap_filled_by_rejoin_replay(tmp_path: Path) -> None:
    """A seq gap makes the engine rejoin with replay since the last applied event; the replay
    fills it and no snapshot is requested."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        msgs = [r.db.update(f"f{i}.txt", str(i)) for i in range(5)]
        r.link.on_rejoin = lambda _since: replay(r)
        t0 = time.time()
        r.feed(msgs[0])
        await r.until(lambda: r.engine.last_seq == 1)
        for m in msgs[3:]:  # 2 and 3 lost in flight
            r.feed(m)
        await r.until(r.converged)
        assert len(r.link.rejoins) == 1
        assert r.link.rejoins[0] <= int(t0 * 1000)  # since <= receive time of seq 1 - margin
        assert r.link.rejoins[0] >= int((t0 - FAST.replay_margin - 1) * 1000)
        assert not [e for e, _ in r.link.sent if e == "snapshot:request"]
        assert r.engine.status().gap is None
        assert r.engine.last_seq == 5


async def test_gap_not_fillable_requests_snapshot(tmp_path: Path) -> None:
    """When the replay cannot fill the gap the engine sends snapshot:request and re-converges
    on snapshot:ready; held events the snapshot already has are dropped, later ones applied."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        answer_requests(r)
        first = r.db.update("a.txt", "1")
        r.feed(first)
        for i in range(40):  # more than one replay can hold; all lost
            r.db.update(f"lost/{i}.txt", str(i))
        tail = [r.db.update("a.txt", "final"), r.db.update("z.txt", "zz")]
        for m in tail:
            r.feed(m)
        await r.until(r.converged)
        requests = [p for e, p in r.link.sent if e == "snapshot:request"]
        assert requests == [{"session_id": "s1", "reason": "seq_gap", "last_seq": 1}]
        assert r.link.rejoins == []  # 40 missing: a replay (25) cannot fill it
        assert r.engine.resyncs == 1
        assert r.engine.last_seq == r.db.seq
        assert r.state.meta("snapshot_id") == f"{r.db.seq}"


async def test_lost_message_is_recovered_with_a_snapshot(tmp_path: Path) -> None:
    """A message the subscription could not take (over 1 MiB) is reported lost: with no later
    event to reveal a gap, the engine asks for a snapshot that includes the next seq."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        answer_requests(r)
        r.feed(r.db.update("a.txt", "1"))
        await r.until(lambda: r.engine.last_seq == 1)
        r.db.update("big.bin", "too big for realtime-py")  # never delivered
        r.engine.note_lost("message_too_big")
        await r.until(r.converged)
        requests = [p for e, p in r.link.sent if e == "snapshot:request"]
        assert requests == [{"session_id": "s1", "reason": "message_too_big", "last_seq": 1}]
        assert r.engine.last_seq == r.db.seq == 2


async def test_snapshot_ready_without_request_is_ignored_when_old(tmp_path: Path) -> None:
    """An unsolicited snapshot:ready that is not newer than what was applied changes nothing."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        r.feed(r.db.update("a.txt", "1"))
        r.feed(r.db.update("a.txt", "2"))
        await r.until(lambda: r.engine.last_seq == 2)
        r.feed(
            (
                "snapshot:ready",
                {"snapshot_url": "http://x.test/old", "snapshot_id": "old", "seq": 1},
                DB_META,
            )
        )
        r.feed(r.db.update("b.txt", "b"))
        await r.until(r.converged)
        assert r.engine.resyncs == 0


async def test_hostile_events_counted_and_skipped(tmp_path: Path) -> None:
    """Malformed and unsafe events are counted as rejected and the engine keeps going."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        bad: list[tuple[str, Any, Any]] = [
            (
                "file:update",
                {
                    "file_path": "../../etc/passwd",
                    "content": "x",
                    "content_hash": sha(b"x"),
                    "version": 1,
                },
                DB_META,
            ),
            (
                "file:update",
                {"file_path": "/abs", "content": "x", "content_hash": sha(b"x"), "version": 1},
                DB_META,
            ),
            (
                "file:update",
                {
                    "file_path": ".sidecar/state.db",
                    "content": "x",
                    "content_hash": sha(b"x"),
                    "version": 9,
                },
                DB_META,
            ),
            (
                "file:update",
                {"file_path": "a.txt", "content": "x", "content_hash": "nothex", "version": 1},
                DB_META,
            ),
            ("file:delete", {"file_path": "a.txt", "version": "1"}, DB_META),
            ("file:update", [1, 2, 3], DB_META),
            ("evil:event", {"x": 1}, DB_META),
            ("bulk:apply", {"files": "no"}, DB_META),
            (
                "file:update",
                {
                    "file_path": "a.txt",
                    "content": "x",
                    "content_hash": sha(b"x"),
                    "version": 1,
                    "seq": -4,
                },
                DB_META,
            ),
        ]
        for m in bad:
            r.feed(m)
        r.feed(r.db.update("ok.txt", "fine"))
        await r.until(r.converged)
        assert r.engine.counts["rejected"] == len(bad)
        # Counted once, by the engine, in /status counts and sidecar_events alike; unknown
        # names under one label so hostile input cannot grow the label set.
        assert events_total(r.metrics, "rejected") == len(bad)
        assert events_total(r.metrics, "rejected", "unknown") == 1
        assert events_total(r.metrics, "applied") == 1
        assert not (tmp_path / "etc").exists()
        assert r.engine.last_seq == 1


async def test_rejected_event_with_a_seq_is_not_a_gap(tmp_path: Path) -> None:
    """An invalid event still spends its seq: the next one applies without a rejoin or a
    snapshot:request."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        r.feed(r.db.update("a.txt", "1"))
        r.db.seq += 1
        unsafe = {
            "file_path": "../x",
            "content": "x",
            "content_hash": sha(b"x"),
            "version": 1,
            "seq": r.db.seq,
        }
        r.feed(("file:update", unsafe, DB_META))
        r.feed(r.db.update("b.txt", "2"))
        await r.until(lambda: r.converged() and r.engine.last_seq == r.db.seq)
        assert r.engine.counts["rejected"] == 1
        assert r.link.rejoins == []
        assert [e for e, _ in r.link.sent] == []


async def test_hash_mismatch_requests_snapshot(tmp_path: Path) -> None:
    """ResyncNeeded from the Applier (bytes do not match content_hash) leads to a
    snapshot:request and convergence on the answer."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        answer_requests(r)
        event, payload, meta = r.db.update("a.txt", "real bytes")
        forged = dict(payload, content="tampered")
        r.feed((event, forged, meta))
        await r.until(r.converged)
        assert [p["reason"] for e, p in r.link.sent if e == "snapshot:request"] == ["hash_mismatch"]
        assert r.engine.resyncs == 1
        assert r.engine.counts["rejected"] == 1
        assert events_total(r.metrics, "rejected", "file:update") == 1


async def test_events_without_seq_apply_directly(tmp_path: Path) -> None:
    """Events without seq are applied as they come; the version rule keeps order irrelevant."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(None)
        msgs = [r.db.update("a.txt", f"v{i}", with_seq=False) for i in range(5)]
        for m in [msgs[4], msgs[1], msgs[2]]:
            r.feed(m)
        await r.until(r.converged)
        assert r.engine.last_seq is None
        assert r.engine.status().gap is None


async def test_burst_is_coalesced(tmp_path: Path) -> None:
    """A burst of updates to one path writes only the newest version; the rest count as stale
    and seq still advances past them."""
    async with rig(tmp_path) as r:
        for i in range(200):
            r.feed(r.db.update("hot.txt", f"v{i}"))
        r.feed(r.db.update("other.txt", "o"))
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        await r.until(r.converged)
        await r.until(lambda: r.engine.last_seq == 201)
        assert r.engine.counts.get("stale", 0) == 199
        assert r.engine.counts.get("applied") == 2
        assert r.state.meta("seq") == 201


async def test_burst_of_thousands_is_applied_in_order_with_bounded_memory(
    tmp_path: Path,
) -> None:
    """5,000 queued 1 KB events over 100 paths are applied to the database's final state, seq
    advances to the end, and draining them allocates far less than the events themselves."""
    import tracemalloc

    async with rig(tmp_path) as r:
        for i in range(5000):
            r.feed(r.db.update(f"dir{i % 10}/f{i % 100}.txt", f"{i:04d}" + "x" * 1020))
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
            await r.until(lambda: r.converged() and r.engine.last_seq == 5000, timeout=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.state.meta("seq") == 5000
        assert peak - base < 4 * 1024 * 1024  # the 5,000 payloads alone are over 5 MB


async def test_request_snapshot_and_wait(tmp_path: Path) -> None:
    """Before hydration, request_snapshot_and_wait sends snapshot:request and returns the
    snapshot:ready answer; with no answer it times out."""
    async with rig(tmp_path) as r:
        answer_requests(r)
        ev = await r.engine.request_snapshot_and_wait("snapshot_url_expired", timeout=2)
        assert ev.snapshot_url == "http://snap.test/s/0"
        assert r.link.sent[0] == (
            "snapshot:request",
            {"session_id": "s1", "reason": "snapshot_url_expired", "last_seq": None},
        )
        r.link.on_send = None
        with pytest.raises(TimeoutError):
            await r.engine.request_snapshot_and_wait("again", timeout=0.05)
        assert not r.engine.hydrated.is_set()


async def test_on_applied_hook_and_status(tmp_path: Path) -> None:
    """on_applied gets the paths each applied event changed; status reports seq and counts."""
    seen: list[list[str]] = []
    async with rig(tmp_path) as r:
        r.engine.on_applied = seen.append
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        r.feed(r.db.update("a.txt", "1"))
        r.feed(r.db.update("dir/b.txt", "2"))
        await r.until(lambda: len(seen) == 2)
        assert seen == [["a.txt"], ["dir/b.txt"]]
        s = r.engine.status()
        assert s.last_seq == 2
        assert s.counts["applied"] == 2
        assert s.buffered == 0
        assert s.last_event_at is not None
        reg = r.metrics.registry
        ids = {"project_id": "p1", "session_id": "s1"}
        assert events_total(r.metrics, "applied") == 2
        assert reg.get_sample_value("sidecar_apply_lag_seconds_count", ids) == 2
        assert (reg.get_sample_value("sidecar_last_applied_timestamp_seconds", ids) or 0) > 0


async def test_failing_on_applied_hook_does_not_stop_the_sync(tmp_path: Path) -> None:
    """on_applied is a plain sync callback; one that raises is logged and the sync goes on."""
    calls: list[list[str]] = []

    def hook(paths: list[str]) -> None:
        calls.append(paths)
        raise RuntimeError("hook bug")

    async with rig(tmp_path) as r:
        r.engine.on_applied = hook
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        with capture_logs() as logs:
            r.feed(r.db.update("a.txt", "1"))
            r.feed(r.db.update("b.txt", "2"))
            await r.until(lambda: r.converged() and r.engine.last_seq == 2)
        assert calls == [["a.txt"], ["b.txt"]]
        assert [e["event"] for e in logs].count("sync.on_applied_failed") == 2


# -- Hypothesis: any delivery history converges to the database's final state --

PATHS = ["a.txt", "b/c.txt", "d.md"]
op_strategy = st.tuples(st.sampled_from(PATHS), st.booleans(), st.text(max_size=8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op_strategy, min_size=1, max_size=60),
    drop=st.floats(0, 0.6),
    dup=st.floats(0, 0.5),
    window=st.integers(0, 8),
    seed=st.integers(0, 2**32 - 1),
    hydrate_at=st.integers(0, 60),
)
def test_random_histories_converge(
    ops: list[tuple[str, bool, str]],
    drop: float,
    dup: float,
    window: int,
    seed: int,
    hydrate_at: int,
) -> None:
    """Random histories delivered duplicated, reordered and partly dropped (then replayed on
    rejoin or recovered by snapshot) converge to the database's final state."""
    asyncio.run(_history(ops, drop, dup, window, seed, hydrate_at))


async def _history(
    ops: list[tuple[str, bool, str]],
    drop: float,
    dup: float,
    window: int,
    seed: int,
    hydrate_at: int,
) -> None:
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        async with rig(Path(d)) as r:
            answer_requests(r)
            # The server replays the latest 25 of its log on every rejoin.
            r.link.on_rejoin = lambda _since: replay(r)
            base = r.db.hydrate_into(r.project, r.state, "snap-0")
            msgs = []
            for path, delete, text in ops:
                msgs.append(r.db.delete(path) if delete else r.db.update(path, text))
            delivered = []
            for m in msgs:
                if rnd.random() < drop:
                    continue
                delivered.append(m)
                if rnd.random() < dup:
                    delivered.append(m)
            for i in range(len(delivered)):  # local reordering within a window
                j = min(len(delivered) - 1, i + rnd.randint(0, window))
                delivered[i], delivered[j] = delivered[j], delivered[i]
            cut = min(hydrate_at, len(delivered))
            for m in delivered[:cut]:
                r.feed(m)
            r.engine.mark_hydrated(base)
            for m in delivered[cut:]:
                r.feed(m)
            # A reconnect at the end replays the latest 25 (what the subscription does).
            for m in r.db.log[-25:]:
                r.feed(m)
            await r.until(r.converged, timeout=10)
            await r.until(lambda: r.engine.last_seq == r.db.seq, timeout=10)
            for path, (ver, _data) in r.db.files.items():
                known = r.state.get(path)
                assert known is not None
                assert known.version == ver


async def test_gap_converges_on_a_real_snapshot(tmp_path: Path, snapshot_server: Any) -> None:
    """The snapshot:ready answer is a real .tar.zst (snapshot_build) behind a signed URL; the
    resync callback is the real hydrate(), and held events past the snapshot's seq apply."""
    from sidecar.config import Settings
    from sidecar.snapshot.build import build_snapshot
    from sidecar.snapshot.hydrate import hydrate

    async with rig(tmp_path) as r:
        settings = Settings(
            project_id="p1", project_dir=r.project, state_dir=r.project / ".sidecar"
        )

        async def real_resync(url: str, sha256: str | None) -> Manifest:
            return await hydrate(settings, r.applier.tree, r.metrics, url=url, sha256=sha256)

        r.engine.resync_fn = real_resync
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        r.feed(r.db.update("keep.txt", "k"))
        await r.until(lambda: r.engine.last_seq == 1)
        for i in range(30):
            r.db.update(f"src/{i}.ts", f"export const x = {i};")
        r.db.delete("keep.txt")
        snap_seq = r.db.seq
        src = tmp_path / "db-tree"
        for path, data in r.db.live().items():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            (src / path).write_bytes(data)
        out = tmp_path / "snap.tar.zst"
        build_snapshot(
            src,
            out,
            project_id="p1",
            snapshot_id="snap-db",
            seq=snap_seq,
            versions={p: v for p, (v, _d) in r.db.files.items()},
        )
        data = out.read_bytes()
        snapshot_server.add("p1/snap.tar.zst", data)
        url = snapshot_server.url_for("p1/snap.tar.zst")

        def on_send(event: str, payload: dict[str, Any]) -> None:
            if event == "snapshot:request":
                r.feed(
                    (
                        "snapshot:ready",
                        {
                            "snapshot_url": url,
                            "snapshot_id": "snap-db",
                            "sha256": sha(data),
                            "seq": snap_seq,
                        },
                        DB_META,
                    )
                )

        r.link.on_send = on_send
        late = [r.db.update("src/0.ts", "changed after the snapshot"), r.db.update("n.txt", "n")]
        held_dup = r.db.log[snap_seq - 1]  # an event the snapshot already has, seen late
        for m in [*late, held_dup]:
            r.feed(m)
        await r.until(r.converged, timeout=10)
        await r.until(lambda: r.engine.last_seq == r.db.seq)
        assert r.engine.resyncs == 1
        assert r.state.meta("snapshot_id") == "snap-db"
        assert r.state.meta("seq") == r.db.seq
        keep = r.state.get("keep.txt")
        assert keep is not None
        assert keep.deleted


# -- over the network: real RealtimeServer, real realtime-py, real hydrate --


async def test_network_gap_replay_then_snapshot(tmp_path: Path, snapshot_server: Any) -> None:
    """End to end: a lost message is recovered by the rejoin-with-replay the engine asks the
    Subscription for; a loss larger than one replay leads to snapshot:request on the channel,
    and the snapshot:ready answer (a real snapshot) re-converges the tree."""
    from sidecar.config import RealtimeSettings, Settings
    from sidecar.live.subscription import Subscription, SubscriptionTuning
    from sidecar.redact import Secret
    from sidecar.snapshot.build import build_snapshot
    from sidecar.snapshot.hydrate import hydrate
    from sidecar.testing.realtime.server import Knobs, RealtimeServer

    topic = "project:p1"
    project = tmp_path / "project"
    project.mkdir()
    state = StateStore(project / ".sidecar")
    metrics = Metrics("p1", "s1")
    ptree = ProjectTree(project, state)
    applier = Applier(ptree, metrics)
    db = Db()
    settings = Settings(project_id="p1", project_dir=project, state_dir=project / ".sidecar")
    n_snap = 0

    def publish_snapshot() -> tuple[str, str, int]:
        nonlocal n_snap
        n_snap += 1
        src = tmp_path / f"src{n_snap}"
        src.mkdir()
        for path, data in db.live().items():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            (src / path).write_bytes(data)
        out = tmp_path / f"snap{n_snap}.tar.zst"
        build_snapshot(
            src,
            out,
            project_id="p1",
            snapshot_id=f"snap-{n_snap}",
            seq=db.seq,
            versions={p: v for p, (v, _d) in db.files.items()},
        )
        data = out.read_bytes()
        snapshot_server.add(f"p1/snap{n_snap}.tar.zst", data)
        return snapshot_server.url_for(f"p1/snap{n_snap}.tar.zst"), sha(data), db.seq

    async def resync(url: str, sha256: str | None) -> Manifest:
        return await hydrate(settings, ptree, metrics, url=url, sha256=sha256)

    knobs = Knobs(channel_error_backoff=0.05, connect_error_backoff=0.05)
    async with RealtimeServer(knobs=knobs) as rt:
        engine = SyncEngine(
            applier,
            metrics,
            resync=resync,
            session_id="s1",
            tuning=SyncTuning(
                reorder_wait=0.05, replay_wait=1.5, request_wait=5.0, replay_margin=1.0
            ),
        )
        rs = RealtimeSettings(
            url=rt.url,
            apikey=Secret(rt.anon_key),
            token=Secret(rt.make_token()),
            topic=topic,
            heartbeat_window=2.0,
            ping_interval=0.5,
            rebuild_backoff_initial=0.05,
            rebuild_backoff_max=0.4,
        )
        sub = Subscription(
            rs,
            metrics,
            engine.on_message,
            tuning=SubscriptionTuning(replay_margin=1.0, close_timeout=0.2),
        )
        engine.link = sub
        tasks = [asyncio.create_task(sub.run()), asyncio.create_task(engine.run())]

        def send(msg: tuple[str, dict[str, Any], dict[str, Any]]) -> None:
            rt.send_db(topic, msg[0], msg[1])

        async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
            async with asyncio.timeout(timeout):
                while not cond():
                    for t in tasks:
                        if t.done():
                            t.result()
                    await asyncio.sleep(0.01)

        def converged() -> bool:
            return tree(project) == db.live() and engine.last_seq == db.seq

        try:
            await sub.wait_joined(5)
            db.update("index.html", "<h1>hi</h1>")
            url, digest, _ = publish_snapshot()
            # Rule 4: subscribed first; an edit made now is buffered during hydration.
            send(db.update("during-hydrate.txt", "buffered"))
            manifest = await hydrate(settings, ptree, metrics, url=url, sha256=digest)
            engine.mark_hydrated(manifest)
            await until(converged)

            # One message lost in flight: the engine asks for a rejoin; replay fills the gap.
            rebuilds = sub.rebuilds
            send(db.update("a.txt", "a1"))
            rt.knobs.replication_up = False
            send(db.update("lost.txt", "recovered by replay"))
            rt.knobs.replication_up = None
            send(db.update("a.txt", "a2"))
            await until(converged)
            assert sub.rebuilds == rebuilds + 1
            assert not [
                f
                for f in rt.frames_in("broadcast", topic)
                if f["payload"]["event"] == "snapshot:request"
            ]

            # Thirty lost: more than one replay holds, so a snapshot is requested.
            applied = db.seq
            rt.knobs.replication_up = False
            for i in range(30):
                send(db.update(f"bulk/{i}.txt", f"{i}"))
            rt.knobs.replication_up = None
            send(db.update("a.txt", "a3"))
            await rt.wait_until(
                lambda: any(
                    f["payload"]["event"] == "snapshot:request"
                    for f in rt.frames_in("broadcast", topic)
                ),
                10,
            )
            req = next(
                f["payload"]["payload"]
                for f in rt.frames_in("broadcast", topic)
                if f["payload"]["event"] == "snapshot:request"
            )
            assert req == {"session_id": "s1", "reason": "seq_gap", "last_seq": applied}
            url, digest, seq = publish_snapshot()
            send(db.update("after-snapshot.txt", "later"))  # held until the snapshot is in
            rt.send_db(
                topic,
                "snapshot:ready",
                {"snapshot_url": url, "snapshot_id": "snap-2", "sha256": digest, "seq": seq},
            )
            await until(converged)
            assert engine.resyncs == 1
            assert engine.status().gap is None
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await applier.close()
            state.close()


async def test_snapshot_ready_buffered_before_hydration(tmp_path: Path) -> None:
    """A snapshot:ready that arrives before hydration with nobody waiting is decided after
    hydration (here: newer than the snapshot, so the engine re-converges on it)."""
    async with rig(tmp_path) as r:
        for i in range(3):
            r.db.update(f"x{i}.txt", "x")
        r.feed(
            (
                "snapshot:ready",
                {"snapshot_url": "http://snap.test/s/3", "snapshot_id": "s3", "seq": 3},
                {"id": "r"},
            )
        )
        await r.until(lambda: r.engine.queue.empty())
        r.engine.mark_hydrated(Manifest("p1", "s0", 0, {}, seq=0))
        await r.until(r.converged)
        assert r.engine.resyncs == 1
        assert r.engine.last_seq == 3


async def test_wait_idle_returns_once_the_buffer_is_on_disk(tmp_path: Path) -> None:
    """wait_idle() returns after mark_hydrated once every buffered event has been applied."""
    async with rig(tmp_path) as r:
        for i in range(50):
            r.feed(r.db.update(f"w/{i}.txt", str(i)))
        await r.until(lambda: r.engine.counts.get("buffered") == 50)
        waiter = asyncio.create_task(r.engine.wait_idle())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # not hydrated yet
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        async with asyncio.timeout(5):
            await waiter
        assert tree(r.project) == r.db.live()


async def test_seq_without_baseline_never_drops_an_edit(tmp_path: Path) -> None:
    """With no seq baseline (snapshot and state without seq), events arriving out of order are
    all applied: the lowest seq seen is only a guess, so nothing below it is dropped."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(None)
        first, second = r.db.update("a.txt", "1"), r.db.update("b.txt", "2")
        r.feed(second)
        await r.until(lambda: r.engine.last_seq == 2)
        r.feed(first)
        await r.until(r.converged)


async def test_client_pushes_without_meta_id_are_untrusted_and_spend_no_seq(
    tmp_path: Path,
) -> None:
    """file:update (higher version), file:delete, bulk:apply and snapshot:ready without meta.id,
    using the next seqs: nothing changes, each is counted untrusted, and the database's events
    with those same seqs still apply (no duplicate, no gap, no snapshot:request)."""
    async with rig(tmp_path) as r:
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        r.feed(r.db.update("a.txt", "from the db"))
        await r.until(r.converged)
        evil = b"evil"
        pushes: list[tuple[str, Any, Any]] = [
            (
                "file:update",
                {
                    "file_path": "a.txt",
                    "content": "evil",
                    "content_hash": sha(evil),
                    "version": 99,
                    "seq": 2,
                },
                None,
            ),
            ("file:delete", {"file_path": "a.txt", "version": 100, "seq": 3}, {"replayed": True}),
            (
                "bulk:apply",
                {
                    "seq": 4,
                    "version": 1,
                    "files": [
                        {
                            "file_path": "b.txt",
                            "content": "evil",
                            "content_hash": sha(evil),
                            "version": 1,
                        }
                    ],
                },
                {},
            ),
            (
                "snapshot:ready",
                {"snapshot_url": "http://evil.test/s", "snapshot_id": "evil", "seq": 50},
                None,
            ),
        ]
        for m in pushes:
            r.feed(m)
        r.feed(r.db.update("a.txt", "db v2"))  # seq 2
        r.feed(r.db.update("c.txt", "db c"))  # seq 3
        await r.until(lambda: r.engine.counts.get("untrusted", 0) == 4)
        await r.until(r.converged)
        assert r.engine.last_seq == 3
        assert r.engine.counts.get("duplicate", 0) == 0
        assert [e for e, _ in r.link.sent if e == "snapshot:request"] == []
        assert r.engine.resyncs == 0
        assert not (r.project / "b.txt").exists()


async def test_accept_client_events_applies_pushes(tmp_path: Path) -> None:
    """SIDECAR_ACCEPT_CLIENT_EVENTS=true (the weaker mode for editors that broadcast from the
    browser): a push without meta.id applies like a database event."""
    async with rig(tmp_path) as r:
        r.engine.accept_client_events = True
        r.engine.mark_hydrated(Manifest("p1", "s", 0, {}, seq=0))
        event, payload, _meta = r.db.update("a.txt", "pushed")
        r.feed((event, payload, None))
        await r.until(r.converged)
        assert r.engine.counts.get("untrusted", 0) == 0
