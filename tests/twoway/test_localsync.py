"""Two-way sync: pushes, conflicts by policy (both ways round), quota, failures, no lost bytes.

Everything runs in-process against a real RPC server on 127.0.0.1, a real Applier and real
files; the watcher is not involved (LocalSync.process is called directly), so nothing here
depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar.config import ConflictPolicy, Limits, RealtimeSettings, Settings, TwoWaySettings
from sidecar.live.apply import Applier
from sidecar.live.events import FileChange, parse_event
from sidecar.live.subscription import Subscription, SubscriptionTuning
from sidecar.metrics import Metrics
from sidecar.redact import Secret
from sidecar.testing.realtime.server import Knobs, RealtimeServer
from sidecar.testing.rpc_server import RpcServer
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState, StateStore
from sidecar.twoway.bases import BaseStore
from sidecar.twoway.conflicts import Conflict, conflict_name
from sidecar.twoway.localsync import LocalSync
from sidecar.twoway.upstream import Upstream

PROJECT = "p1"
SESSION = "sess-1"
BASE = b"alpha\nbeta\ngamma\ndelta\n"
REMOTE = b"ALPHA\nbeta\ngamma\ndelta\n"  # changes line 1
LOCAL = b"alpha\nbeta\ngamma\nDELTA\n"  # changes line 4: merges cleanly with REMOTE
LOCAL_CLASH = b"alpha-local\nbeta\ngamma\ndelta\n"  # changes line 1 too: does not merge
MERGED = b"ALPHA\nbeta\ngamma\nDELTA\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Env:
    """A project dir + state + Applier + RPC server + LocalSync, wired like the app does."""

    root: Path
    rpc: RpcServer
    state: StateStore
    metrics: Metrics
    applier: Applier
    ls: LocalSync
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    inbox: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    @property
    def project(self) -> Path:
        return self.root / "project"

    def disk(self, rel: str) -> bytes | None:
        p = self.project / rel
        return p.read_bytes() if p.is_file() else None

    def write(self, rel: str, data: bytes | None) -> None:
        p = self.project / rel
        if data is None:
            p.unlink(missing_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

    async def seed(self, files: dict[str, bytes]) -> None:
        """The state right after hydrating a snapshot of version 1 of these files."""
        self.rpc.seed(PROJECT, files)
        for rel, data in files.items():
            self.write(rel, data)
            self.state.update({rel: FileState(1, sha(data), len(data), 0o644)})
        self.applier.tree.recount()
        await self.ls.seed_bases()

    async def deliver(self, n: int | None = None) -> None:
        """Apply the first n (all) pending broadcasts the way the sync engine would."""
        take = len(self.inbox) if n is None else min(n, len(self.inbox))
        batch, self.inbox[:take] = self.inbox[:take], []
        for name, payload in batch:
            ev = parse_event(name, payload, None)
            self.outcomes.append((await self.applier.apply(ev)).outcome)  # calls ls.before_publish
            await self.ls.flush_outbox()

    def saved(self) -> dict[str, bytes]:
        d = self.ls.conflicts_dir
        return (
            {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
            if d.is_dir()
            else {}
        )

    def local_changes(self, path: str | None = None) -> list[dict[str, Any]]:
        return [
            p
            for e, p in self.sent
            if e == "file:local-change" and (path is None or p["path"] == path)
        ]


@contextlib.asynccontextmanager
async def make_env(
    root: Path,
    *,
    policy: ConflictPolicy = "remote-wins",
    limits: Limits | None = None,
    upstream: bool = True,
    rpc: RpcServer | None = None,
) -> AsyncIterator[Env]:
    limits = limits or Limits()
    (root / "project").mkdir(parents=True, exist_ok=True)
    state_dir = root / "project" / ".sidecar"
    async with contextlib.AsyncExitStack() as stack:
        if rpc is None:
            rpc = await stack.enter_async_context(RpcServer())
        up = None
        if upstream:
            up = await stack.enter_async_context(
                Upstream(
                    rpc.url,
                    PROJECT,
                    apikey=rpc.anon_key,
                    token=rpc.make_token(PROJECT, session_id=SESSION),
                    retries=2,
                    backoff_initial=0.001,
                    backoff_max=0.002,
                )
            )
        state = StateStore(state_dir)
        stack.callback(state.close)
        metrics = Metrics(PROJECT, SESSION)
        ptree = ProjectTree(root / "project", state, limits)
        applier = Applier(ptree, metrics)
        stack.push_async_callback(applier.close)
        env_box: list[Env] = []

        async def send(event: str, payload: dict[str, Any]) -> None:
            env_box[0].sent.append((event, payload))

        ls = LocalSync(
            ptree,
            state_dir,
            metrics,
            twoway=TwoWaySettings(conflict=policy),
            session_id=SESSION,
            send=send,
            upstream=up,
            backoff_initial=0.001,
            backoff_max=0.002,
        )
        stack.push_async_callback(ls.close)
        applier.before_publish = ls.before_publish  # as sidecar/wiring.py wires them
        env = Env(root, rpc, state, metrics, applier, ls)
        env_box.append(env)
        remove = rpc.add_listener(lambda _t, e, p: env.inbox.append((e, p)))
        stack.callback(remove)
        yield env


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """An Env with policy remote-wins and an upstream."""
    async with make_env(tmp_path) as e:
        yield e


def metric(env: Env, name: str, **labels: str) -> float:
    value = env.metrics.registry.get_sample_value(
        name, {"project_id": PROJECT, "session_id": SESSION, **labels}
    )
    return value or 0.0


# -- basics --


def test_conflict_name_follows_syncthing() -> None:
    """<name>.sync-conflict-<YYYYMMDD>-<HHMMSS>-<session>.<ext>, keeping directories."""
    when = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    assert conflict_name("src/app.ts", when, "s/1") == (
        "src/app.sync-conflict-20231114-221320-s_1.ts"
    )
    assert conflict_name("Makefile", when, "s") == "Makefile.sync-conflict-20231114-221320-s"
    assert conflict_name(".env", when, "s") == ".env.sync-conflict-20231114-221320-s"
    assert conflict_name("a.tar.gz", when, "s") == "a.tar.sync-conflict-20231114-221320-s.gz"


async def test_local_edit_is_pushed_and_its_echo_is_a_duplicate(env: Env) -> None:
    """The push records the new head; the broadcast of our own push changes nothing."""
    await env.seed({"a.txt": BASE})
    env.write("a.txt", LOCAL)
    assert await env.ls.process(["a.txt"]) == {"a.txt": "pushed"}
    head = env.rpc.head(PROJECT, "a.txt")
    assert head is not None
    assert (head.version, head.content, head.sender) == (2, LOCAL, SESSION)
    assert env.state.get("a.txt") == FileState(2, sha(LOCAL), len(LOCAL), 0o644)
    await env.deliver()
    assert env.outcomes == ["duplicate"]
    assert await env.ls.process(["a.txt"]) == {"a.txt": "unchanged"}
    [change] = env.local_changes()
    assert change["diff"] == (
        "--- a/a.txt\n+++ b/a.txt\n@@ -1,4 +1,4 @@\n alpha\n beta\n gamma\n-delta\n+DELTA\n"
    )
    assert (change["base_version"], change["base_hash"], change["new_hash"]) == (
        1,
        sha(BASE),
        sha(LOCAL),
    )
    assert metric(env, "sidecar_local_changes_total", outcome="pushed") == 1


async def test_create_and_delete_are_pushed(env: Env) -> None:
    """A new file is pushed over version 0 and a deleted one as a tombstone."""
    await env.seed({"old.txt": b"old\n"})
    env.write("dir/new.txt", b"new\n")
    env.write("old.txt", None)
    out = await env.ls.process(["dir/new.txt", "old.txt"])
    assert out == {"dir/new.txt": "pushed", "old.txt": "pushed"}
    assert env.rpc.files(PROJECT) == {"dir/new.txt": b"new\n"}
    assert env.state.get("old.txt") == FileState(2, None, 0, 0)
    created, deleted = env.local_changes()
    assert created["action"] == "create"
    assert created["diff"] == "--- /dev/null\n+++ b/dir/new.txt\n@@ -0,0 +1 @@\n+new\n"
    assert deleted["action"] == "delete"
    assert deleted["diff"] == "--- a/old.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-old\n"
    await env.deliver()
    assert env.outcomes == ["duplicate", "duplicate"]


async def test_report_only_without_upstream(tmp_path: Path) -> None:
    """Without an upstream, changes are broadcast (binary: size only) and nothing is pushed."""
    async with make_env(tmp_path, upstream=False) as env:
        await env.seed({"a.txt": BASE})
        env.write("a.txt", LOCAL)
        env.write("img.png", b"\x89PNG\x00\x01")
        assert await env.ls.process(["a.txt", "img.png"]) == {
            "a.txt": "reported",
            "img.png": "reported",
        }
        assert await env.ls.process(["a.txt"]) == {"a.txt": "reported"}
        assert len(env.local_changes("a.txt")) == 1  # the same bytes are announced once
        [img] = env.local_changes("img.png")
        assert (img["binary"], img["diff"], img["size"]) == (True, None, 6)
        assert env.rpc.calls == []
        assert env.state.get("a.txt") == FileState(1, sha(BASE), len(BASE), 0o644)


async def test_denied_broadcast_is_counted_not_fatal(env: Env) -> None:
    """A send that raises (no write permission on the channel) is counted; the push goes on."""

    async def denied(_event: str, _payload: dict[str, Any]) -> None:
        raise PermissionError("broadcast not allowed")

    env.ls.send = denied
    await env.seed({"a.txt": BASE})
    env.write("a.txt", LOCAL)
    assert await env.ls.process(["a.txt"]) == {"a.txt": "pushed"}
    assert env.ls.counts["broadcast_failed"] == 1
    assert metric(env, "sidecar_local_changes_total", outcome="broadcast_failed") == 1


# -- conflicts: the same scenario under each policy, found by our push or by the remote event --

SCENARIOS = [
    # policy, local bytes, disk after, database after, saved copy, resolution
    pytest.param("remote-wins", LOCAL, REMOTE, REMOTE, LOCAL, "remote-kept", id="remote-wins"),
    pytest.param("local-wins", LOCAL, LOCAL, LOCAL, REMOTE, "local-kept", id="local-wins"),
    pytest.param("merge", LOCAL, MERGED, MERGED, None, "merged", id="merge-clean"),
    pytest.param(
        "merge", LOCAL_CLASH, REMOTE, REMOTE, LOCAL_CLASH, "remote-kept", id="merge-fallback"
    ),
]


@pytest.mark.parametrize("origin", ["push", "remote"])
@pytest.mark.parametrize(("policy", "local", "disk", "db", "saved", "resolution"), SCENARIOS)
async def test_conflict_policies(
    tmp_path: Path,
    origin: str,
    policy: ConflictPolicy,
    local: bytes,
    disk: bytes,
    db: bytes,
    saved: bytes | None,
    resolution: str,
) -> None:
    """The editor and the container both edit a.txt from version 1; the policy decides.

    origin "push": our push meets the editor's version 2 (409). origin "remote": the editor's
    version 2 arrives while the local edit is not yet pushed. Either way: the disk and the
    database end equal, the loser is saved under conflicts/, no markers reach the project, and
    the conflict is counted, listed and broadcast.
    """
    async with make_env(tmp_path, policy=policy) as env:
        await env.seed({"a.txt": BASE})
        await env.rpc.editor_upsert(PROJECT, "a.txt", REMOTE)
        env.write("a.txt", local)
        if origin == "push":
            assert await env.ls.process(["a.txt"]) == {"a.txt": "conflict"}
            await env.deliver()
        else:
            await env.deliver()
            await env.ls.drain()
        assert await env.ls.process(["a.txt"]) == {"a.txt": "unchanged"}
        await env.deliver()  # the echo of any re-push
        assert env.disk("a.txt") == disk
        head = env.rpc.head(PROJECT, "a.txt")
        assert head is not None
        assert head.content == db
        st = env.state.get("a.txt")
        assert st is not None
        assert (st.version, st.sha256) == (head.version, sha(db))
        assert b"<<<<<<<" not in disk
        copies = env.saved()
        assert list(copies.values()) == ([] if saved is None else [saved])
        for name in copies:
            assert name.startswith("a.sync-conflict-")
            assert name.endswith(f"-{SESSION}.txt")
        [c] = env.ls.conflicts
        assert isinstance(c, Conflict)
        assert (c.path, c.policy, c.resolution, c.origin) == ("a.txt", policy, resolution, origin)
        assert (c.local_hash, c.remote_hash, c.remote_version, c.base_version) == (
            sha(local),
            sha(REMOTE),
            2,
            1,
        )
        assert metric(env, "sidecar_conflicts_total", policy=policy) == 1
        status = env.ls.status()
        assert status["conflicts_total"] == 1
        assert status["conflicts"][0]["resolution"] == resolution
        notices = [p for e, p in env.sent if e == "file:conflict"]
        assert [(n["path"], n["resolution"], n["session_id"]) for n in notices] == [
            ("a.txt", resolution, SESSION)
        ]


async def test_same_change_on_both_sides_is_no_conflict(env: Env) -> None:
    """The container and the editor writing identical bytes agree without a conflict."""
    await env.seed({"a.txt": BASE})
    await env.rpc.editor_upsert(PROJECT, "a.txt", LOCAL)
    env.write("a.txt", LOCAL)
    assert await env.ls.process(["a.txt"]) == {"a.txt": "pushed"}
    st = env.state.get("a.txt")
    assert st is not None
    assert st.version == 2
    assert env.ls.conflicts_total == 0
    await env.deliver()
    assert env.outcomes == ["duplicate"]


async def test_remote_delete_against_local_edit(tmp_path: Path) -> None:
    """remote-wins lets the delete happen (local copy saved); local-wins re-creates the file."""
    for policy, disk in (("remote-wins", None), ("local-wins", LOCAL)):
        root = tmp_path / policy
        async with make_env(root, policy=policy) as env:  # type: ignore[arg-type]
            await env.seed({"a.txt": BASE})
            await env.rpc.editor_delete(PROJECT, "a.txt")
            env.write("a.txt", LOCAL)
            await env.deliver()
            await env.ls.drain()
            await env.deliver()
            assert env.disk("a.txt") == disk
            head = env.rpc.head(PROJECT, "a.txt")
            assert head is not None
            assert head.content == disk
            assert env.ls.conflicts_total == 1
            if policy == "remote-wins":
                assert list(env.saved().values()) == [LOCAL]


async def test_merge_without_a_base_falls_back(tmp_path: Path) -> None:
    """With no kept base (e.g. a binary or oversized file) merge acts as remote-wins."""
    async with make_env(tmp_path, policy="merge") as env:
        await env.seed({"a.txt": BASE})
        env.ls.bases.gc(set())  # forget every base
        await env.rpc.editor_upsert(PROJECT, "a.txt", REMOTE)
        env.write("a.txt", LOCAL)
        assert await env.ls.process(["a.txt"]) == {"a.txt": "conflict"}
        assert env.disk("a.txt") == REMOTE
        assert list(env.saved().values()) == [LOCAL]
        assert env.ls.conflicts[0].resolution == "remote-kept"


# -- quota, failures --


async def test_quota_refuses_local_growth(tmp_path: Path) -> None:
    """Over a limit: refused, counted, flagged, broadcast, never pushed; cleared once fixed."""
    limits = Limits(max_bytes=100, max_files=2, max_file_bytes=50)
    async with make_env(tmp_path, limits=limits) as env:
        await env.seed({"a.txt": b"a" * 40})
        env.write("big.txt", b"b" * 60)
        env.write("a.txt", b"a" * 45)
        out = await env.ls.process(["big.txt", "a.txt"])
        assert out == {"big.txt": "refused", "a.txt": "pushed"}
        assert env.ls.quota_exceeded
        assert "SIDECAR_MAX_FILE_BYTES" in env.ls.status()["quota_refused"]["big.txt"]
        assert metric(env, "sidecar_quota_refusals_total", source="local") == 1
        [notice] = env.local_changes("big.txt")
        assert (notice["refused"], notice["size"]) == ("quota", 60)
        assert env.rpc.head(PROJECT, "big.txt") is None
        env.write("big.txt", b"b" * 50)  # within the file limit; 45 + 50 <= 100
        env.write("c.txt", b"c")
        out = await env.ls.process(["big.txt"])
        assert out == {"big.txt": "pushed"}
        assert env.ls.status()["quota_exceeded"] is False
        out = await env.ls.process(["c.txt"])
        assert out == {"c.txt": "refused"}  # a third file
        assert "SIDECAR_MAX_FILES" in env.ls.refused["c.txt"]
        env.write("a.txt", b"a" * 50)  # 50 + 50 = 100: at the limit, allowed
        env.write("big.txt", b"b" * 51)
        out = await env.ls.process(["a.txt", "big.txt"])
        assert out == {"a.txt": "pushed", "big.txt": "refused"}
        env.write("c.txt", None)
        assert await env.ls.process(["c.txt"]) == {"c.txt": "unchanged"}


async def test_upstream_outage_is_retried_then_parked(env: Env) -> None:
    """Transient failures are retried outside the lock; after the attempts the path is parked."""
    await env.seed({"a.txt": BASE})
    env.write("a.txt", LOCAL)
    env.rpc.faults.fail_first = 2
    assert await env.ls.process(["a.txt"]) == {"a.txt": "pushed"}
    env.write("a.txt", MERGED)
    env.rpc.faults.fail_first = 100
    assert await env.ls.process(["a.txt"]) == {"a.txt": "failed"}
    assert "a.txt" in env.ls.status()["failed"]
    env.rpc.faults.reset()
    assert await env.ls.process(["a.txt"]) == {"a.txt": "pushed"}
    assert env.ls.status()["failed"] == {}
    head = env.rpc.head(PROJECT, "a.txt")
    assert head is not None
    assert head.content == MERGED


async def test_forbidden_token_fails_without_retries(tmp_path: Path) -> None:
    """A token that may not write its project fails at once and is parked."""
    async with RpcServer() as rpc, make_env(tmp_path, rpc=rpc) as env:
        assert env.ls.upstream is not None
        env.ls.upstream._token = rpc.make_token(PROJECT, read_only=True)
        await env.seed({"a.txt": BASE})
        env.write("a.txt", LOCAL)
        assert await env.ls.process(["a.txt"]) == {"a.txt": "failed"}
        assert len(rpc.calls) == 1
        assert "42501" in env.ls.failed["a.txt"]


async def test_pushes_broadcast_through_realtime(tmp_path: Path) -> None:
    """With a real RealtimeServer behind the RPC server, our push is stored as realtime.send."""
    async with (
        RealtimeServer() as rt,
        RpcServer(realtime=rt) as rpc,
        make_env(tmp_path, rpc=rpc) as env,
    ):
        await env.seed({"a.txt": BASE})
        env.write("a.txt", LOCAL)
        assert await env.ls.process(["a.txt"]) == {"a.txt": "pushed"}
        [msg] = [m for m in rt.messages if m.topic == f"project:{PROJECT}"]
        assert msg.event == "file:update"
        assert msg.payload is not None
        assert (msg.payload["version"], msg.payload["content_hash"], msg.payload["seq"]) == (
            2,
            sha(LOCAL),
            1,
        )


async def test_end_to_end_through_realtime_and_realtime_py(tmp_path: Path) -> None:
    """The whole loop over a real Realtime channel with two realtime-py clients.

    1. The sidecar (Subscription + LocalSync + Applier) and an editor-side observer join
       project:p1; 2. a local edit is pushed: the observer gets file:local-change and the
       database's file:update, and the sidecar's copy of that update is a duplicate; 3. an
       editor write reaches the sidecar's disk.
    """
    tuning = SubscriptionTuning(
        check_interval=0.1,
        ping_timeout=1.0,
        unhealthy_grace=2.0,
        join_timeout=3,
        connect_timeout=3.0,
        close_timeout=0.2,
    )
    async with (
        RealtimeServer(knobs=Knobs(channel_error_backoff=0.05, connect_error_backoff=0.05)) as rt,
        RpcServer(realtime=rt) as rpc,
        make_env(tmp_path, rpc=rpc) as env,
    ):
        token = rt.make_token(project_id=PROJECT, session_id=SESSION)
        settings_ = RealtimeSettings(
            url=rt.url,
            apikey=Secret(rt.anon_key),
            token=Secret(token),
            topic=f"project:{PROJECT}",
            heartbeat_window=2.0,
            rebuild_backoff_initial=0.05,
        )
        inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        seen_by_editor: list[tuple[str, dict[str, Any]]] = []
        sidecar = Subscription(
            settings_, Metrics(), lambda e, p, _m: inbox.put_nowait((e, p)), tuning=tuning
        )
        editor = Subscription(
            settings_, Metrics(), lambda e, p, _m: seen_by_editor.append((e, p)), tuning=tuning
        )
        assert env.ls.upstream is not None
        env.ls.upstream._token = token
        env.ls.send = sidecar.send
        outcomes: list[str] = []

        async def apply_loop() -> None:
            while True:
                event, payload = await inbox.get()
                ev = parse_event(event, payload, None)
                if ev.outbound:
                    continue
                outcomes.append((await env.applier.apply(ev)).outcome)
                await env.ls.flush_outbox()

        async def until(cond: Any, timeout: float = 10.0) -> None:
            async with asyncio.timeout(timeout):
                while not cond():
                    await asyncio.sleep(0.02)

        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(sidecar.run()),
                tg.create_task(editor.run()),
                tg.create_task(apply_loop()),
            ]
            try:
                await until(lambda: sidecar.is_joined and editor.is_joined)
                await env.seed({"a.txt": BASE})
                env.write("a.txt", LOCAL)
                assert await env.ls.process(["a.txt"]) == {"a.txt": "pushed"}
                await until(
                    lambda: {e for e, _ in seen_by_editor} >= {"file:local-change", "file:update"}
                )
                [change] = [p for e, p in seen_by_editor if e == "file:local-change"]
                assert change["new_hash"] == sha(LOCAL)
                assert "+DELTA" in change["diff"]
                await until(lambda: outcomes == ["duplicate"])
                await rpc.editor_upsert(PROJECT, "a.txt", MERGED)
                await until(lambda: env.disk("a.txt") == MERGED)
                assert outcomes == ["duplicate", "applied"]
                assert await env.ls.process(["a.txt"]) == {"a.txt": "unchanged"}
            finally:
                for t in tasks:
                    t.cancel()


# -- interleavings (Hypothesis) --

PATHS = ("a.txt", "b.txt", "dir/c.txt")
_line = st.sampled_from(["one\n", "two\n", "three\n", "four\n", "five\n"])
_text = st.lists(_line, min_size=0, max_size=6).map(lambda ls: "".join(ls).encode())
_edit = st.tuples(st.integers(0, 8), _line)  # replace (or append) one line of the current bytes
_content = st.one_of(_edit, _edit, _edit, _text, st.just(b"\x00binary\xff"), st.none())  # None: del
_path = st.sampled_from(("a.txt", "a.txt", "a.txt", "b.txt", "dir/c.txt"))
_op = st.one_of(
    st.tuples(st.just("local"), _path, _content),  # edit + process
    st.tuples(st.just("local_pending"), _path, _content),  # edit only
    st.tuples(st.just("remote"), _path, _content),  # the editor writes
    st.tuples(st.just("deliver"), st.integers(1, 3), st.none()),  # broadcasts arrive
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["remote-wins", "local-wins", "merge"]), ops=st.lists(_op, max_size=14)
)
def test_interleaved_edits_converge_without_losing_bytes(
    policy: ConflictPolicy, ops: list[tuple[str, Any, Any]]
) -> None:
    """Random local and remote edits, in any order, end converged and lose no bytes.

    After every op has run and everything is delivered and pushed: the disk, the StateStore
    and the database agree on every path; every conflict was resolved as the policy says;
    each losing side is saved under conflicts/; and every local version the sidecar saw is in
    the database's history, in conflicts/, or on disk.
    """
    asyncio.run(_interleave(policy, ops))


async def _interleave(policy: ConflictPolicy, ops: list[tuple[str, Any, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with make_env(Path(tmp), policy=policy) as env:
            await env.seed({"a.txt": b"".join(b"%d\n" % i for i in range(8)), "b.txt": b"x\n"})
            seen: list[bytes] = []  # every local version the sidecar looked at
            examine = env.ls._examine

            async def spy(rel: str, **kwargs: Any) -> Any:
                ch = await examine(rel, **kwargs)
                if ch is not None and ch.data is not None:
                    seen.append(ch.data)
                return ch

            env.ls._examine = spy  # type: ignore[method-assign]
            for kind, a, b in ops:
                if kind in {"local", "local_pending"}:
                    env.write(a, _edited(env.disk(a), b))
                    if kind == "local":
                        await env.ls.process([a])
                elif kind == "remote":
                    head = env.rpc.head(PROJECT, a)
                    b = _edited(None if head is None else head.content, b)
                    if b is None:
                        await env.rpc.editor_delete(PROJECT, a)
                    else:
                        await env.rpc.editor_upsert(PROJECT, a, b)
                else:
                    await env.deliver(a)
                    await env.ls.drain()
            # Quiesce: deliver, push, repeat until nothing moves.
            for _ in range(10):
                await env.deliver()
                out = await env.ls.process(PATHS)
                await env.deliver()
                if not env.inbox and set(out.values()) == {"unchanged"}:
                    break
            else:
                raise AssertionError("did not converge")
            for rel in PATHS:
                head = env.rpc.head(PROJECT, rel)
                assert env.disk(rel) == (None if head is None else head.content), rel
                st_ = env.state.get(rel)
                if head is not None:
                    assert st_ is not None
                    assert (st_.version, st_.sha256) == (head.version, head.sha256), rel
            allowed = {
                "remote-wins": {"remote-kept"},
                "local-wins": {"local-kept"},
                "merge": {"merged", "remote-kept"},
            }[policy]
            merged_away: set[str | None] = set()
            for c in env.ls.conflicts:
                event(f"conflict {policy} {c.origin} {c.resolution}")
                assert c.resolution in allowed
                if c.resolution == "merged":
                    merged_away.add(c.local_hash)  # its changes live on in the merge
                    continue
                loser = c.local_hash if c.resolution == "remote-kept" else c.remote_hash
                if c.saved is not None:
                    assert sha((env.ls.state_dir / c.saved).read_bytes()) == loser
                else:
                    assert loser is None  # the losing side was "no file" (a delete)
            history = {r.content for r in env.rpc.history}
            saved = set(env.saved().values())
            disk = {env.disk(p) for p in PATHS}
            for data in seen:
                if sha(data) in merged_away:
                    continue
                assert data in history or data in saved or data in disk, data
            for f in env.project.rglob("*"):
                if f.is_file() and ".sidecar" not in f.parts:
                    assert b"<<<<<<<" not in f.read_bytes()


def _edited(current: bytes | None, change: Any) -> bytes | None:
    """change is new bytes, None (delete), or (index, line): replace or append one line."""
    if not isinstance(change, tuple):
        return None if change is None else bytes(change)
    index, line = change
    lines = (current or b"").decode(errors="replace").splitlines(keepends=True)
    if index < len(lines):
        lines[index] = line
    else:
        lines.append(line)
    return "".join(lines).encode()


async def test_applier_hook_variant_under_the_lock(tmp_path: Path) -> None:
    """Wired as the Applier's before_publish hook, the policy runs under the lock and the
    Applier then writes nothing for the change the policy kept local."""
    async with make_env(tmp_path, policy="local-wins") as env:
        await env.seed({"a.txt": BASE})
        await env.rpc.editor_upsert(PROJECT, "a.txt", REMOTE)
        env.write("a.txt", LOCAL)
        [(name, payload)] = env.inbox
        env.inbox.clear()
        ev = parse_event(name, payload, None)
        assert (await env.applier.apply(ev)).outcome == "noop"
        assert env.disk("a.txt") == LOCAL
        await env.ls.drain()
        head = env.rpc.head(PROJECT, "a.txt")
        assert head is not None
        assert (head.version, head.content) == (3, LOCAL)
        assert [p["resolution"] for e, p in env.sent if e == "file:conflict"] == ["local-kept"]
        assert REMOTE in env.saved().values()


async def test_before_publish_returns_the_paths_it_handled(tmp_path: Path) -> None:
    """The hook's decision is its return value: a path kept local (local-wins) and a change
    already superseded by a newer recorded version are handled; a clean path is not."""
    async with make_env(tmp_path, policy="local-wins") as env:
        await env.seed({"a.txt": BASE, "b.txt": BASE, "c.txt": BASE})
        env.write("a.txt", LOCAL)
        env.state.update({"c.txt": FileState(5, sha(BASE), len(BASE), 0o644)})  # a push's record
        changes = [
            FileChange("update", rel, 2, content=REMOTE, content_hash=sha(REMOTE))
            for rel in ("a.txt", "b.txt", "c.txt")
        ]
        async with env.ls.lock:
            handled = await env.ls.before_publish(changes)
        assert handled == {"a.txt", "c.txt"}


async def _until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("policy", ["remote-wins", "local-wins"])
async def test_remote_deltas_apply_while_a_push_is_in_flight(
    tmp_path: Path, policy: ConflictPolicy
) -> None:
    """The push's HTTP call runs without the tree lock: while the RPC server holds it, a
    remote update of another path and one of the pushed path itself are applied. When the
    push's answer (a version conflict) comes back, the path's recorded version has moved, so
    the result is not recorded over it: the remote update was decided against the local edit
    by policy, once, and the end state is what that policy says."""
    async with make_env(tmp_path, policy=policy) as env:
        await env.seed({"a.txt": BASE, "b.txt": BASE})
        env.write("a.txt", LOCAL)
        env.rpc.faults.gate = gate = asyncio.Event()
        push = asyncio.create_task(env.ls.process(["a.txt"]))
        try:
            await _until(lambda: env.rpc.faults.gated >= 1)  # the upsert is held in flight
            await env.rpc.editor_upsert(PROJECT, "b.txt", REMOTE)
            await env.rpc.editor_upsert(PROJECT, "a.txt", REMOTE)
            async with asyncio.timeout(5):  # would wait for the push if it held the lock
                await env.deliver()
            assert env.outcomes == ["applied", "applied" if policy == "remote-wins" else "noop"]
            assert env.disk("b.txt") == REMOTE
            assert not push.done()
        finally:
            gate.set()
        await push
        await env.ls.drain()
        await env.deliver()
        head = env.rpc.head(PROJECT, "a.txt")
        assert head is not None
        [c] = env.ls.conflicts
        assert c.origin == "remote"
        if policy == "remote-wins":
            assert c.resolution == "remote-kept"
            assert (head.version, head.content, env.disk("a.txt")) == (2, REMOTE, REMOTE)
            assert LOCAL in env.saved().values()
        else:
            assert c.resolution == "local-kept"
            assert (head.version, head.content, env.disk("a.txt")) == (3, LOCAL, LOCAL)
            assert REMOTE in env.saved().values()
        known = env.state.get("a.txt")
        assert known is not None
        assert head.content is not None
        assert (known.version, known.sha256) == (head.version, sha(head.content))


async def test_bases_are_seeded_and_collected(env: Env) -> None:
    """seed_bases keeps the synced text on disk and drops copies no path refers to."""
    env.ls.bases.put(b"orphan\n")
    await env.seed({"a.txt": BASE, "bin": b"\x00\x01", "big.txt": b"x\n" * 600_000})
    assert env.ls.bases.get(sha(BASE)) == BASE
    assert env.ls.bases.get(sha(b"orphan\n")) is None
    assert not env.ls.bases.has(sha(b"\x00\x01"))
    assert not env.ls.bases.has(sha(b"x\n" * 600_000))  # over the 1 MiB cap


def test_from_settings(tmp_path: Path) -> None:
    """LocalSync gets its slice of Settings (two-way settings; limits through the tree) and
    Upstream its URLs and identity."""
    env = {
        "PROJECT_ID": "p9",
        "SESSION_ID": "s9",
        "PROJECT_DIR": str(tmp_path),
        "SIDECAR_CONFLICT": "merge",
        "SIDECAR_MAX_BYTES": "1MB",
        "SIDECAR_IGNORE": "tmp",
        "SIDECAR_UPSTREAM": "rpc",
        "SUPABASE_URL": "http://127.0.0.1:1",
        "REALTIME_APIKEY": "anon-key-123",
    }
    s = Settings.from_env(env)
    state = StateStore(s.state_dir)
    try:
        up = Upstream.from_settings(s, token="t")
        ls = LocalSync(
            ProjectTree(s.project_dir, state, s.limits),
            s.state_dir,
            Metrics(),
            twoway=s.twoway,
            session_id=s.session_id,
            upstream=up,
        )
        assert (ls.policy, ls.limits.max_bytes, ls.session_id) == ("merge", 1_000_000, "s9")
        assert "tmp" in ls.ignore
        assert ls.watcher().ignored("tmp/x")
        assert (up.base_url, up.project_id, up.apikey) == (
            "http://127.0.0.1:1",
            "p9",
            "anon-key-123",
        )
    finally:
        state.close()


def test_base_store_memory_and_disk(tmp_path: Path) -> None:
    """Remote copies stay in memory; evicted or flushed ones reach disk; superseded ones go."""
    bases = BaseStore(tmp_path / "base", max_bytes=100, memory_bytes=10)
    v1, v2, v3 = b"one\n", b"two\n", b"three!\n"
    bases.put(v1)
    assert bases.puts == 0  # memory only
    bases.put(v2, replaces=sha(v1))  # v1 superseded: dropped, never written
    assert not bases.has(sha(v1))
    bases.put(v3)  # over 10 bytes of memory: v2 is evicted to disk
    assert bases.puts == 1
    assert (tmp_path / "base" / sha(v2)[:2] / sha(v2)).read_bytes() == v2
    assert bases.get(sha(v3)) == v3
    bases.put(b"\x00binary")
    bases.put(b"x" * 101)
    assert not bases.has(sha(b"\x00binary"))
    assert not bases.has(sha(b"x" * 101))
    assert bases.flush(keep={sha(v3)}) == 1
    fresh = BaseStore(tmp_path / "base")
    assert (fresh.get(sha(v2)), fresh.get(sha(v3))) == (v2, v3)
    assert fresh.gc({sha(v3)}) == 1
    assert fresh.get(sha(v2)) is None


async def test_content_url_update_without_local_edit_is_downloaded_once(
    tmp_path: Path, snapshot_server: Any
) -> None:
    """With two-way sync on (LocalSync's hook runs under the tree lock, as `sidecar run` wires
    it), a content_url update to a path with no local edit is fetched once, by the Applier:
    LocalSync fetched it a second time, under the lock, only to seed a merge base."""
    project = tmp_path / "project"
    project.mkdir()
    state = StateStore(project / ".sidecar")
    metrics = Metrics(PROJECT, SESSION)
    tree = ProjectTree(project, state, None, metrics)
    ls = LocalSync(tree, project / ".sidecar", metrics)
    applier = Applier(tree, metrics, before_publish=ls.before_publish)
    try:
        (project / "a.txt").write_bytes(BASE)
        state.update({"a.txt": FileState(1, sha(BASE), len(BASE), 0o644)})
        data = b"line\n" * (800 * 1024)  # 4 MiB
        snapshot_server.add("blobs/a.txt", data)
        payload = {
            "file_path": "a.txt",
            "content_url": snapshot_server.url_for("blobs/a.txt"),
            "content_hash": sha(data),
            "version": 2,
        }
        assert (await applier.apply(parse_event("file:update", payload, None))).outcome == "applied"
        assert (project / "a.txt").read_bytes() == data
        assert len(snapshot_server.gets("blobs/a.txt")) == 1
    finally:
        await applier.close()
        await ls.close()
        state.close()
