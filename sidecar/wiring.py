"""Build every component of one sidecar once and connect them; nothing here starts a task.

`build(settings, cmd)` returns `Components`: the app's phases (`sidecar/app.py`) only start,
await and stop what is in it. A feature that is switched off is a null object with the same
methods (`NoLive`, `NoLocalChanges`, `NoHooks`, `NoChild`), so no phase tests for None.

With REALTIME_URL the live stack (aiohttp, realtime-py with pydantic, the engine, LocalSync) is
built by `LiveLoader` once its modules are imported in a worker thread, which costs 0.2-0.3 s of
CPU: the subscription starts as soon as they are there, while hydration goes on, and the child
does not wait for them (what arrived before the join is replayed since the snapshot's
created_at, delta rule 4 in `sidecar/live/__init__.py`). What can refuse the configuration (the
token, the channel settings) is checked here, before anything starts.

Two references are cyclic by nature and are closed with a closure over a name bound a few lines
below, instead of by assigning attributes after construction: the subscription delivers into the
engine while the engine rejoins and sends through the subscription, and the Applier asks
LocalSync about a path (before_publish) while both write under the ProjectTree's lock.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from sidecar.config import Settings
from sidecar.health import HealthState
from sidecar.metrics import Metrics
from sidecar.process.child import ChildProcess, Reaper, Supervisor, build_child_env
from sidecar.process.identity import (
    ChildUser,
    hand_over,
    hand_over_paths,
    protect_token_file,
    resolve_child_user,
)
from sidecar.snapshot.hydrate import hydrate
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import StateStore

if TYPE_CHECKING:
    # Imported where they are built, only when the feature is on, and the live stack only in
    # LiveLoader's thread: the child starts without importing aiohttp, realtime-py, pydantic,
    # watchfiles or the two-way code (tests/e2e/test_startup_imports.py).
    import aiohttp

    from sidecar.live.apply import Applier, WriteMode
    from sidecar.live.engine import ChannelLink, SyncEngine
    from sidecar.live.events import DeltaEvent, FileChange
    from sidecar.live.subscription import Subscription
    from sidecar.live.tokens import TokenSource
    from sidecar.process.hooks import OnChangeHooks
    from sidecar.snapshot.manifest import Manifest
    from sidecar.twoway.conflicts import Conflict
    from sidecar.twoway.localsync import LocalSync
    from sidecar.twoway.upstream import Upstream

__all__ = [
    "Components",
    "Live",
    "LiveLoader",
    "LoadedLive",
    "LocalChanges",
    "LocalChangesLater",
    "NoChild",
    "NoHooks",
    "NoLive",
    "NoLocalChanges",
    "build",
    "hand_over_tree",
]

log = structlog.get_logger(component="sidecar")

Task = Coroutine[Any, Any, object]


# -- remote changes in --


@dataclass(frozen=True, slots=True)
class Live:
    """Remote changes in: the token source, the subscription and the engine behind it."""

    enabled: ClassVar[bool] = True
    tokens: TokenSource
    subscription: Subscription
    engine: SyncEngine

    def tasks(self) -> dict[str, Task]:
        """What runs in the steady-state TaskGroup, by task name."""
        return {
            "tokens": self.tokens.run(),
            "subscription": self.subscription.run(),
            "sync": self.engine.run(),
        }

    def mark_hydrated(self, manifest: Manifest | None) -> None:
        """Apply the events buffered during hydration from now on."""
        self.engine.mark_hydrated(manifest)

    async def wait_idle(self) -> None:
        """Wait until the buffer is on disk (the child starts after it)."""
        await self.engine.wait_idle()

    async def request_snapshot(self, reason: str) -> DeltaEvent:
        """Once joined, send snapshot:request and return the snapshot:ready answer."""
        await self.subscription.wait_joined()
        return await self.engine.request_snapshot_and_wait(reason)

    def refresh(self, health: HealthState) -> None:
        """Copy the live status into `health` (before every /readyz and /status answer)."""
        health.subscribed = self.subscription.status().joined
        st = self.engine.status()
        health.last_seq = st.last_seq
        health.lag_seconds = st.lag
        health.last_event_at = st.last_applied_at
        health.counts = dict(st.counts)
        if st.last_error:
            health.last_error = st.last_error
        health.fault = st.fault.message if st.fault is not None else None
        if self.tokens.last_refusal:  # a rotation to a service_role token: alarmed, not fatal
            health.last_error = self.tokens.last_refusal


@dataclass(frozen=True, slots=True)
class LoadedLive:
    """What LiveLoader builds once the live stack is imported."""

    live: Live
    local: LocalChanges | NoLocalChanges
    applier: Applier
    http: aiohttp.ClientSession


def _import_live_stack() -> None:
    """The modules `_live` builds from (run in a worker thread: they hold the GIL while they
    load, but the event loop, the hydration's download thread and the child's start go on)."""
    import aiohttp  # noqa: F401
    import realtime  # noqa: F401

    import sidecar.live.engine
    import sidecar.live.subscription
    import sidecar.twoway.localsync
    import sidecar.twoway.upstream  # noqa: F401


class LiveLoader:
    """REALTIME_URL is set: remote changes in (and LocalSync) once the live stack is loaded.

    `start()` imports the stack in a worker thread, then builds `LoadedLive` and starts its
    tasks in the steady-state TaskGroup. Until then nothing is subscribed, so nothing is
    buffered: `wait_idle()` returns at once and `mark_hydrated()` is remembered and handed to
    the engine when it is built (it then asks for replay since the snapshot's created_at).
    """

    enabled: ClassVar[bool] = True

    def __init__(
        self,
        settings: Settings,
        tree: ProjectTree,
        metrics: Metrics,
        hooks: OnChangeHooks | NoHooks,
        child_user: ChildUser | None,
    ) -> None:
        from sidecar.live.tokens import TokenSource

        settings.realtime.check_channel()
        self._build_args = (settings, tree, metrics, hooks, child_user)
        # Built now: a missing, unreadable or service_role token is refused before anything runs.
        self.tokens = TokenSource.from_settings(settings.realtime)
        self.loaded: LoadedLive | None = None
        self._ready = asyncio.Event()
        self._hydrated: tuple[Manifest | None] | None = None

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Load and build the live stack, then run its tasks in `tg`."""
        tg.create_task(self._load(tg), name="live-load")

    async def _load(self, tg: asyncio.TaskGroup) -> None:
        started = time.monotonic()
        await asyncio.to_thread(_import_live_stack)
        import aiohttp

        http = aiohttp.ClientSession()
        try:
            loaded = _live(*self._build_args, self.tokens, http)
        except BaseException:
            await http.close()
            raise
        self.loaded = loaded
        if self._hydrated is not None:
            loaded.live.mark_hydrated(self._hydrated[0])
        for name, coro in loaded.live.tasks().items():
            tg.create_task(coro, name=name)
        self._ready.set()
        log.debug("sidecar.live_loaded", seconds=round(time.monotonic() - started, 3))

    async def wait_loaded(self) -> LoadedLive:
        """The live stack, once built."""
        await self._ready.wait()
        assert self.loaded is not None
        return self.loaded

    def mark_hydrated(self, manifest: Manifest | None) -> None:
        """Apply the events buffered during hydration from now on (or from when it is built)."""
        if self.loaded is not None:
            self.loaded.live.mark_hydrated(manifest)
        else:
            self._hydrated = (manifest,)

    async def wait_idle(self) -> None:
        """Wait until the buffer is on disk; before the stack is built nothing is buffered."""
        if self.loaded is not None:
            await self.loaded.live.wait_idle()

    async def request_snapshot(self, reason: str) -> DeltaEvent:
        """Once loaded and joined, send snapshot:request and return the snapshot:ready answer."""
        loaded = await self.wait_loaded()
        return await loaded.live.request_snapshot(reason)

    def refresh(self, health: HealthState) -> None:
        """Copy the live status into `health`; not subscribed before the stack is built."""
        if self.loaded is not None:
            self.loaded.live.refresh(health)
        else:
            health.subscribed = False

    async def close(self) -> None:
        """Close the HTTP session the stack fetches and calls RPCs with."""
        if self.loaded is not None:
            await self.loaded.http.close()


class NoLive:
    """REALTIME_URL is not set: nothing to subscribe to, so readiness does not wait for it."""

    enabled: ClassVar[bool] = False

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Nothing runs."""

    async def close(self) -> None:
        """Nothing to close."""

    def mark_hydrated(self, manifest: Manifest | None) -> None:
        """Nothing is buffered."""

    async def wait_idle(self) -> None:
        """Nothing is buffered."""

    async def request_snapshot(self, reason: str) -> DeltaEvent:
        """No channel, so no answer ever comes."""
        raise TimeoutError

    def refresh(self, health: HealthState) -> None:
        """Readiness does not wait for a subscription."""
        health.subscribed = True


# -- local changes out --


@dataclass(frozen=True, slots=True)
class LocalChanges:
    """Local changes out: LocalSync fed by a watcher over the project directory."""

    sync: LocalSync
    ignore: tuple[str, ...]

    async def run(self) -> None:
        """Watch and push until cancelled. Started after hydration: the published tree is what
        the state records, not news."""
        await self.sync.run(self.sync.watcher(ignore=self.ignore, initial_scan=True))

    async def close(self) -> None:
        """Persist the last-synced bases that merges need after a restart."""
        await self.sync.close()

    @property
    def conflicts(self) -> Sequence[Conflict]:
        """The conflicts listed in /status."""
        return self.sync.conflicts


class LocalChangesLater:
    """LocalChanges once LiveLoader has built LocalSync (part of the live stack)."""

    def __init__(self, loader: LiveLoader) -> None:
        self._loader = loader

    async def run(self) -> None:
        """Watch and push until cancelled, once the stack is built."""
        loaded = await self._loader.wait_loaded()
        await loaded.local.run()

    async def close(self) -> None:
        """Persist the last-synced bases, if LocalSync was built."""
        if self._loader.loaded is not None:
            await self._loader.loaded.local.close()

    @property
    def conflicts(self) -> Sequence[Conflict]:
        """The conflicts listed in /status."""
        loaded = self._loader.loaded
        return () if loaded is None else loaded.local.conflicts


class NoLocalChanges:
    """SIDECAR_LOCAL_CHANGES=false, or no channel: local edits are neither reported nor pushed."""

    conflicts: ClassVar[Sequence[Conflict]] = ()

    async def run(self) -> None:
        """Nothing to watch."""

    async def close(self) -> None:
        """Nothing to persist."""


# -- hooks and the child --


class NoHooks:
    """SIDECAR_ON_CHANGE is empty."""

    def notify(self, paths: Sequence[str]) -> None:
        """No rule matches anything."""

    async def run(self) -> None:
        """Nothing to run."""


class NoChild:
    """`sidecar sync`: no child to supervise; the sidecar runs until a signal."""

    child: ClassVar[ChildProcess | None] = None
    exit_code: ClassVar[int | None] = None

    async def run(self) -> int:
        """Never returns: without a child only a signal ends the steady state."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def restart(self) -> None:
        """Nothing to restart."""

    def forward(self, sig: int) -> bool:
        """Nothing to forward to."""
        return False

    def kill(self) -> None:
        """Nothing to kill."""

    async def stop(self) -> int | None:
        """Nothing to stop."""
        return None


# -- the whole --


@dataclass(frozen=True, slots=True)
class Components:
    """Everything one sidecar is made of, built and connected by `build`."""

    settings: Settings
    metrics: Metrics
    health: HealthState
    state: StateStore
    tree: ProjectTree
    reaper: Reaper
    live: LiveLoader | NoLive
    local: LocalChangesLater | NoLocalChanges
    hooks: OnChangeHooks | NoHooks
    child: Supervisor | NoChild
    child_user: ChildUser | None = None  # who the child runs as (started as root)


def build(settings: Settings, cmd: tuple[str, ...] = ()) -> Components:
    """Construct every component for `settings` and connect them; start nothing.

    Opens the state database; raises ConfigError for an unusable token, channel setting or
    on-change rule.
    """
    metrics = Metrics(settings.project_id, settings.session_id)
    child_user = resolve_child_user(settings.process.child_user)
    state = StateStore(settings.state_dir)
    tree = ProjectTree(settings.project_dir, state, settings.limits, metrics)
    reaper = Reaper()
    env = build_child_env(os.environ)
    child = _child(settings, cmd, env, reaper, metrics)
    hooks = _hooks(settings, env, child, reaper)
    live: LiveLoader | NoLive = NoLive()
    local: LocalChangesLater | NoLocalChanges = NoLocalChanges()
    if not settings.realtime.url:
        log.warning("sidecar.sync_disabled", reason="REALTIME_URL is not set")
    else:
        live = LiveLoader(settings, tree, metrics, hooks, child_user)
        if settings.twoway.local_changes:
            local = LocalChangesLater(live)

    def refresh() -> None:
        _refresh_status(health, state, live, local, child)

    health = HealthState(
        project_id=settings.project_id, session_id=settings.session_id, refresh=refresh
    )
    return Components(
        settings=settings,
        metrics=metrics,
        health=health,
        state=state,
        tree=tree,
        reaper=reaper,
        live=live,
        local=local,
        hooks=hooks,
        child=child,
        child_user=child_user,
    )


def _hooks(
    settings: Settings, env: dict[str, str], child: Supervisor | NoChild, reaper: Reaper
) -> OnChangeHooks | NoHooks:
    """SIDECAR_ON_CHANGE's hooks; the "restart" action restarts the child."""
    if not settings.process.on_change:
        return NoHooks()
    from sidecar.process.hooks import OnChangeHooks

    return OnChangeHooks(
        settings.process.on_change,
        settings.project_dir,
        env,
        on_restart=child.restart,
        reaper=reaper,
        stop_grace=settings.process.stop_grace,
    )


def _live(
    settings: Settings,
    tree: ProjectTree,
    metrics: Metrics,
    hooks: OnChangeHooks | NoHooks,
    child_user: ChildUser | None,
    tokens: TokenSource,
    http: aiohttp.ClientSession,
) -> LoadedLive:
    """The Realtime side (subscription, engine, Applier) and, when on, LocalSync."""
    # Only with a channel, from LiveLoader (see the TYPE_CHECKING block above).
    from sidecar.live.engine import SyncEngine, SyncTuning
    from sidecar.live.subscription import Subscription, SubscriptionTuning

    local: LocalChanges | NoLocalChanges = NoLocalChanges()
    token_file = settings.realtime.token_file
    if child_user is not None and token_file is not None:
        tokens.after_reload = lambda: protect_token_file(token_file)
    engine: SyncEngine  # bound below; the subscription only calls it once running

    def deliver(event: str, payload: dict[str, Any], meta: dict[str, Any] | None) -> None:
        engine.on_message(event, payload, meta)

    def lost(reason: str) -> None:
        engine.note_lost(reason)

    sub = Subscription(
        settings.realtime,
        metrics,
        deliver,
        tokens=tokens,
        replay_since_ms=tree.created_at,
        tuning=SubscriptionTuning(auth_fail_window=settings.realtime.auth_fail_window),
        on_lost=lost,
    )
    # The container never writes on the channel: with SUPABASE_URL its reports and
    # snapshot requests go through RPCs (the database re-broadcasts them), so a token that
    # cannot write on the channel is enough for two-way sync.
    reporter = _reporter(settings, tokens, http)
    send = reporter.send if reporter is not None else sub.send
    link: ChannelLink = sub if reporter is None else _RpcLink(sub, reporter)
    local_sync: LocalSync | None = None
    before_publish: Callable[[Sequence[FileChange]], Awaitable[set[str]]] | None = None
    if settings.twoway.local_changes:
        # The Applier calls back into LocalSync (bound below) while it holds the tree's lock.
        async def ask_local_sync(changes: Sequence[FileChange]) -> set[str]:
            assert local_sync is not None
            return await local_sync.before_publish(changes)

        before_publish = ask_local_sync
    applier = _applier(
        tree,
        metrics,
        http,
        write_mode=settings.write_mode,
        before_publish=before_publish,
        bodies=reporter,
    )
    if settings.twoway.local_changes:
        from sidecar.twoway.localsync import LocalSync

        local_sync = LocalSync(
            tree,
            settings.state_dir,
            metrics,
            twoway=settings.twoway,
            session_id=settings.session_id,
            write_mode=settings.write_mode,
            send=send,
            # Pushes go through the same RPC client as the reports.
            upstream=reporter if settings.twoway.upstream == "rpc" else None,
        )
        local = LocalChanges(local_sync, settings.twoway.ignore)

    async def resync(url: str, sha256: str | None) -> Manifest:
        manifest = await hydrate(settings, tree, metrics, url=url, sha256=sha256, session=http)
        await hand_over_tree(settings, child_user)
        return manifest

    def on_applied(paths: list[str]) -> None:
        if child_user is not None:
            hand_over_paths(settings.project_dir, child_user, paths)
        hooks.notify(paths)

    engine = SyncEngine(
        applier,
        metrics,
        link=link,
        resync=resync,
        session_id=settings.session_id,
        on_applied=on_applied,
        tuning=SyncTuning(request_wait=settings.snapshot.request_wait),
        accept_client_events=settings.twoway.accept_client_events,
        catch_up=None if reporter is None else reporter.catch_up,
    )
    return LoadedLive(Live(tokens, sub, engine), local, applier, http)


async def hand_over_tree(settings: Settings, user: ChildUser | None) -> None:
    """Give the child's user the published tree (it writes node_modules, caches, edits)."""
    if user is not None:
        changed = await asyncio.to_thread(hand_over, settings.project_dir, user)
        log.debug("sidecar.handed_over", entries=changed, user=user.name)


def _applier(
    tree: ProjectTree,
    metrics: Metrics,
    http: aiohttp.ClientSession,
    *,
    write_mode: WriteMode,
    before_publish: Callable[[Sequence[FileChange]], Awaitable[set[str]]] | None,
    bodies: Upstream | None = None,
) -> Applier:
    from sidecar.live.apply import Applier

    # Large files come without their body; with SUPABASE_URL it is read from the database.
    fetch_body = None if bodies is None else (lambda c: bodies.body(c.path, c.version))
    return Applier(
        tree,
        metrics,
        write_mode=write_mode,
        http=http,
        before_publish=before_publish,
        fetch_body=fetch_body,
    )


def _reporter(
    settings: Settings, tokens: TokenSource, http: aiohttp.ClientSession
) -> Upstream | None:
    if not settings.twoway.supabase_url:
        return None
    from sidecar.twoway.upstream import Upstream

    return Upstream(
        settings.twoway.supabase_url,
        settings.project_id,
        apikey=settings.realtime.apikey or "",
        token=lambda: tokens.current,
        session=http,
    )


@dataclass(frozen=True, slots=True)
class _RpcLink:
    """The engine's channel link with `send` (snapshot:request) going through the RPC."""

    sub: Subscription
    reporter: Upstream

    async def send(self, event: str, payload: dict[str, Any]) -> None:
        await self.reporter.send(event, payload)

    def rejoin(self, since_ms: int) -> None:
        self.sub.rejoin(since_ms)

    def set_replay_since(self, ms: int, *, rejoin: bool = False) -> None:
        self.sub.set_replay_since(ms, rejoin=rejoin)


def _child(
    settings: Settings,
    cmd: tuple[str, ...],
    env: dict[str, str],
    reaper: Reaper,
    metrics: Metrics,
) -> Supervisor | NoChild:
    if not cmd:
        return NoChild()

    def factory() -> ChildProcess:
        return ChildProcess(
            cmd, settings.project_dir, env, settings.process.stop_grace, reaper=reaper
        )

    return Supervisor(factory, metrics, restart=settings.process.restart_child)


def _refresh_status(
    health: HealthState,
    state: StateStore,
    live: LiveLoader | NoLive,
    local: LocalChangesLater | NoLocalChanges,
    child: Supervisor | NoChild,
) -> None:
    """Copy the components' live status into HealthState (called on every /readyz, /status)."""
    live.refresh(health)
    health.conflicts = [c.to_json() for c in local.conflicts]
    current = child.child
    if current is not None:
        health.child_pid, health.child_status = current.pid, current.exit_code
    snapshot_id = state.meta("snapshot_id")
    health.snapshot_id = (
        snapshot_id if isinstance(snapshot_id, str) else None
    ) or health.snapshot_id
