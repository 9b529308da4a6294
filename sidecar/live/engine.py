"""The sync engine: delta rules 4 (buffer until hydrated) and 5 (gap-free seq, replay,
snapshot:request / snapshot:ready re-convergence) of `sidecar/live/__init__.py`, between the
subscription and the Applier.

Raw broadcasts are queued as `Inbound` items by `on_message` (called from realtime-py's listener, so it only
enqueues). `run()` parses them (invalid ones are counted as rejected and skipped), buffers
everything until `mark_hydrated()`, then applies in `seq` order: events at or below the last
applied seq are duplicates, events past a gap are held. A gap first waits briefly for
reordering, then asks the subscription to rejoin with replay since the last applied event was
received, then sends `snapshot:request` and re-converges on the `snapshot:ready` answer through
the `resync` callback (which hydrates). Events without seq are applied as they come (the
Applier's version rule makes order irrelevant for them). Runs of single-file changes to the same
path inside one burst are coalesced to the highest version.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from sidecar.errors import EnvironmentFaultError, SidecarError, environment_fault
from sidecar.live.apply import Applier
from sidecar.live.events import (
    BULK_APPLY,
    OUTBOUND_EVENTS,
    SNAPSHOT_READY,
    DeltaEvent,
    InvalidEventError,
    known_event,
    parse_event,
)
from sidecar.live.recovery import Gap, GapPhase
from sidecar.metrics import Metrics
from sidecar.retry import backoff_delay
from sidecar.snapshot.manifest import Manifest

__all__ = [
    "CatchUpFn",
    "ChannelLink",
    "FaultStatus",
    "Inbound",
    "ResyncFn",
    "SyncEngine",
    "SyncStatus",
    "SyncTuning",
]

log = structlog.get_logger(component="sync")

ResyncFn = Callable[[str, str | None], Awaitable[Manifest]]
# (after_seq, until_seq) -> the database's logged events after after_seq, in seq order, at least
# up to until_seq when the log still has them: (event, payload) pairs (project_events_since).
CatchUpFn = Callable[[int, int], Awaitable[Sequence[tuple[str, dict[str, Any]]]]]
# Sync and quick (it only hands paths on, e.g. to process/hooks.py): runs inside run().
OnApplied = Callable[[list[str]], None]
REJECTED = "sidecar:rejected"  # placeholder for an invalid event that carried a seq
REPLAY_LIMIT = 25  # what one replay can deliver (delta rule 5)


class ChannelLink(Protocol):
    """What the engine needs from the subscription (Subscription implements it)."""

    async def send(self, event: str, payload: dict[str, Any]) -> None: ...

    def rejoin(self, since_ms: int) -> None: ...

    def set_replay_since(self, ms: int, *, rejoin: bool = False) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncTuning:
    """Timing knobs of gap recovery; tests make them small.

    reorder_wait: a gap may be plain reordering (replay vs live during a join): wait this long.
    replay_wait: after the rejoin-with-replay, wait this long for the gap to fill.
    request_wait: wait this long for snapshot:ready after snapshot:request (then ask again).
    replay_margin: seconds subtracted from the receive time used as replay `since`.
    batch_max: how many queued messages one pass takes (coalescing works within a pass).
    max_held: events held past a gap beyond this are dropped (the snapshot covers them).
    coalesce: coalesce runs of single-file changes to one path.
    fault_backoff_initial / fault_backoff_max: retry delays after an environment fault.
    """

    reorder_wait: float = 0.5
    replay_wait: float = 5.0
    request_wait: float = 60.0
    replay_margin: float = 5.0
    batch_max: int = 512
    max_held: int = 10_000
    coalesce: bool = True
    fault_backoff_initial: float = 0.2  # first retry after a full disk / read-only fault
    fault_backoff_max: float = 5.0  # so the tree converges within seconds once space is back


@dataclass(frozen=True, slots=True)
class FaultStatus:
    """An environment fault being retried (disk full, read-only...), as /status shows it."""

    kind: str
    message: str
    since: float  # unix
    attempts: int


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """What the engine reports for /status and /readyz (sidecar/wiring.py copies it into
    HealthState, sidecar/health.py serialises it)."""

    hydrated: bool
    last_seq: int | None
    lag: float  # seconds the oldest unprocessed message has waited
    apply_lag: float | None  # seconds from the last applied event's timestamp to its write
    buffered: int  # queued, buffered until hydrated, or held past a gap
    held: int
    gap: str | None  # GapPhase value while a seq gap is open
    snapshot_requested: bool
    last_event_at: float | None
    last_applied_at: float | None
    resyncs: int
    counts: dict[str, int]
    last_error: str | None
    fault: FaultStatus | None


@dataclass(frozen=True, slots=True)
class Inbound:
    """One broadcast as realtime-py handed it over (not parsed yet), and when it arrived."""

    event: str
    payload: Any
    meta: Any
    received_at: float  # unix


@dataclass(slots=True)
class _Request:
    reason: str
    last_seq: int | None
    sent_at: float  # unix
    deadline: float  # monotonic
    # The oldest seq the answer must include (the event that failed, the first one missing);
    # None: any snapshot will do.
    needs: int | None = None


@dataclass(slots=True)
class _Fault:
    """The environment refused a change (disk full, read-only...): it is retried, not skipped."""

    kind: str
    message: str
    since: float  # unix
    attempts: int = 0
    retry_at: float = 0.0  # monotonic
    resync: tuple[DeltaEvent, str] | None = None  # a failed resync to run again


@dataclass(slots=True)
class _Item:
    ev: DeltaEvent
    received_at: float  # unix


class SyncEngine:
    """Consumes (event, payload, meta) from the subscription and keeps PROJECT_DIR converged.

    Large (about 700 lines) because ordering and recovery share one state: the held events,
    the pre-hydration buffer, `last_seq` and the outstanding snapshot request are read and
    changed by admission, gap recovery and resync alike. The phases are named in
    `live/recovery.py`; moving their steps there too is the next split.

    Args:
        applier: applies file changes (rules 1, 2, 3, 6) and records versions and seq through
            its ProjectTree (`applier.tree`: meta seq, snapshot_id, created_at).
        metrics: event outcomes ("buffered", "duplicate", "rejected"...) and resyncs.
        link: the subscription (send snapshot:request, rejoin with replay); None in tests.
        resync: async (snapshot_url, sha256) -> Manifest, normally a call to hydrate().
        session_id: sent in snapshot:request.
        on_applied: called with the paths each applied event (or resync) changed.
        tuning: gap-recovery timing.
        accept_client_events: apply file changes and snapshot:ready without `meta.id` (pushed
            by clients on the channel); SIDECAR_ACCEPT_CLIENT_EVENTS, weaker.
        catch_up: reads missed events from the database's event log (rule 5: after replay,
            before a snapshot); None without SUPABASE_URL.
    """

    def __init__(
        self,
        applier: Applier,
        metrics: Metrics,
        *,
        link: ChannelLink | None = None,
        resync: ResyncFn | None = None,
        session_id: str = "local",
        on_applied: OnApplied | None = None,
        tuning: SyncTuning | None = None,
        accept_client_events: bool = False,
        catch_up: CatchUpFn | None = None,
    ) -> None:
        self.accept_client_events = accept_client_events
        self.catch_up = catch_up
        self.applier = applier
        self.tree = applier.tree
        self.metrics = metrics
        self.link = link
        self.resync_fn = resync
        self.session_id = session_id
        self.on_applied = on_applied
        self.tuning = tuning or SyncTuning()
        self.hydrated = asyncio.Event()
        self.queue: asyncio.Queue[Inbound] = asyncio.Queue()
        self._wake = asyncio.Event()  # set by every hand-off to run()
        self.counts: dict[str, int] = {}
        self.last_seq: int | None = None
        self.last_event_at: float | None = None  # unix receive time of the last event
        self.last_applied_at: float | None = None
        self.last_apply_lag: float | None = None
        self.last_error: str | None = None
        self.resyncs = 0
        self._buffer: list[_Item] = []
        self._held: dict[int, _Item] = {}
        self._last_seq_received_at: float | None = None  # receive time of event last_seq
        self._gap: Gap | None = None
        self._request: _Request | None = None
        self._ready_waiters: list[tuple[asyncio.Future[DeltaEvent], float]] = []
        self._ready: list[_Item] = []
        self._inflight_since: float | None = None
        self._idle = asyncio.Event()
        self._owed_on_start: tuple[str, int | None] | None = None
        self._lost: str | None = None
        self._guessed_baseline = False
        self._fault: _Fault | None = None

    # -- input (from realtime-py's listener: must not block or raise) --

    def on_message(self, event: str, payload: dict[str, Any], meta: dict[str, Any] | None) -> None:
        """Queue one broadcast for run(); safe to call from a realtime-py callback."""
        self._idle.clear()
        self.queue.put_nowait(Inbound(event, payload, meta, time.time()))
        self._wake.set()

    def note_lost(self, reason: str) -> None:
        """A message was lost in transit (realtime-py could not take it): what follows the
        last applied seq must come from the database. Safe to call from a callback."""
        self._lost = reason
        self._idle.clear()
        self._wake.set()

    # -- control --

    def mark_hydrated(self, manifest: Manifest | None = None) -> None:
        """Hydration is done: set the seq baseline, ask for replay since the snapshot was made,
        and let run() apply the buffer (rule 4)."""
        base = self.tree.seq
        if manifest is not None and manifest.seq is not None:
            base = manifest.seq if base is None else max(base, manifest.seq)
        self.last_seq = base
        self._guessed_baseline = False
        if base is not None:
            self.metrics.last_seq.set(base)
        if manifest is not None and self.link is not None:
            self.link.set_replay_since(int(manifest.created_at), rejoin=True)
        owed = self.tree.owed_snapshot
        if owed is not None:
            if manifest is not None and _covers(manifest.seq, owed[1]):
                self.tree.owe_snapshot(None)  # the snapshot just hydrated repairs it
            else:
                self._owed_on_start = owed  # asked again by run()
        log.info("sync.hydrated", last_seq=base, buffered=len(self._buffer))
        self.hydrated.set()
        self._idle.clear()
        self._wake.set()  # run() drains the buffer

    async def wait_idle(self) -> None:
        """Wait until hydrated and everything received so far (the buffer included) has been
        processed. Events held past a seq gap do not count: their recovery may take a while."""
        await self.hydrated.wait()
        while True:
            await self._idle.wait()
            if self.queue.empty():
                return
            self._idle.clear()

    async def request_snapshot_and_wait(
        self,
        reason: str,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> DeltaEvent:
        """Send snapshot:request and wait for the next snapshot:ready (self-healing start).

        run() must be running. Raises TimeoutError after `timeout` (default request_wait).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[DeltaEvent] = loop.create_future()
        sent_at = time.time()
        self._ready_waiters.append((fut, sent_at))
        try:
            await self._send_request(reason)
            async with asyncio.timeout(
                timeout if timeout is not None else self.tuning.request_wait
            ):
                return await fut
        finally:
            self._ready_waiters = [(f, t) for f, t in self._ready_waiters if f is not fut]

    def status(self) -> SyncStatus:
        """A snapshot of the engine's state for /status and /readyz."""
        now = time.time()
        pending = self.queue.qsize() + len(self._buffer) + len(self._held)
        oldest = min((i.received_at for i in self._held.values()), default=None)
        if self._inflight_since is not None:
            oldest = min(oldest or self._inflight_since, self._inflight_since)
        f = self._fault
        return SyncStatus(
            hydrated=self.hydrated.is_set(),
            last_seq=self.last_seq,
            lag=round(now - oldest, 3) if oldest is not None else 0.0,
            apply_lag=self.last_apply_lag,
            buffered=pending,
            held=len(self._held),
            gap=None if self._gap is None else self._gap.phase.value,
            snapshot_requested=self._request is not None,
            last_event_at=self.last_event_at,
            last_applied_at=self.last_applied_at,
            resyncs=self.resyncs,
            counts=dict(self.counts),
            last_error=self.last_error,
            fault=None if f is None else FaultStatus(f.kind, f.message, f.since, f.attempts),
        )

    # -- main loop --

    async def run(self) -> None:
        """Process events forever (cancel to stop)."""
        while True:
            self._inflight_since = None
            if self.hydrated.is_set() and self.queue.empty() and not self._buffer:
                self._idle.set()
            raw = await self._next_batch()
            if raw:
                # The oldest message not yet processed: what /status reports as lag.
                self._inflight_since = min(r.received_at for r in raw)
            items: list[_Item] = []
            for r in raw:
                item = self._parse(r.event, r.payload, r.meta, r.received_at)
                if item is not None:
                    items.append(item)
            await self._handle(items)
            if self._lost is not None and self.hydrated.is_set():
                reason, self._lost = self._lost, None
                await self._want_snapshot(reason, (self.last_seq or 0) + 1)
            if self._owed_on_start is not None and self.hydrated.is_set():
                # A snapshot was owed when the last run stopped (sidecar/tree/project.py).
                reason, needs = self._owed_on_start
                self._owed_on_start = None
                await self._want_snapshot(reason, needs)
            await self._advance_recovery()

    async def _next_batch(self) -> list[Inbound]:
        """What arrived (at most batch_max), once woken or at the next recovery deadline."""
        if self.queue.empty() and not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_deadline()):
                    await self._wake.wait()
        self._wake.clear()
        out: list[Inbound] = []
        while len(out) < self.tuning.batch_max:
            try:
                out.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return out

    def _next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (
                self._gap.deadline if self._gap else None,
                self._request.deadline if self._request else None,
                self._fault.retry_at if self._fault else None,
            )
            if d is not None
        ]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _untrusted(self, event: str, meta: Any) -> bool:
        """A file change or snapshot:ready without `meta.id` was pushed by a client on the
        channel, not written by the database through realtime.send (which always adds it, see
        sidecar/testing/realtime/server.py send_db). Refused unless SIDECAR_ACCEPT_CLIENT_EVENTS:
        its seq is not counted either, so pushes cannot make the database's events look like
        duplicates or gaps."""
        if self.accept_client_events or event in OUTBOUND_EVENTS:
            return False
        if not (event.startswith("file:") or event in {BULK_APPLY, SNAPSHOT_READY}):
            return False
        meta_id = meta.get("id") if isinstance(meta, Mapping) else None
        return not (isinstance(meta_id, str) and meta_id)

    def _parse(
        self, event: str, payload: Any, meta: Any, received_at: float, *, trusted: bool = False
    ) -> _Item | None:
        self.last_event_at = received_at
        if not trusted and self._untrusted(event, meta):
            self._counted(str(event)[:64], "untrusted")
            log.warning(
                "sync.event_untrusted",
                event_name=str(event)[:64],
                reason="no meta.id: pushed by a client on the channel, not by the database",
            )
            return None
        try:
            ev = parse_event(event, payload, meta)
        except InvalidEventError as exc:
            # "unknown" for names we do not know, so hostile input cannot grow the label set.
            self._counted(str(event) if known_event(event) else "unknown", "rejected")
            self.last_error = str(exc)
            log.warning("sync.event_rejected", event_name=str(event)[:64], reason=str(exc))
            seq = payload.get("seq") if isinstance(payload, dict) else None
            if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
                # The producer spent this seq: hold its place so it is not mistaken for a gap.
                return _Item(DeltaEvent(REJECTED, seq=seq), received_at)
            return None
        if ev.outbound:
            return None  # our own snapshot:request / file:local-change echoed back
        return _Item(ev, received_at)

    async def _handle(self, items: list[_Item]) -> None:
        ready_events: list[_Item] = []
        for item in items:
            if item.ev.event == SNAPSHOT_READY:
                ready_events.append(item)
                continue
            if not self.hydrated.is_set():
                self._buffer.append(item)
                self._counted(item.ev.event, "buffered")
                continue
            self._admit(item)
        for item in ready_events:
            await self._on_snapshot_ready(item)
        if self.hydrated.is_set():
            if self._buffer:
                buffered, self._buffer = self._buffer, []
                log.info("sync.buffer_released", events=len(buffered))
                for item in buffered:
                    if item.ev.event != SNAPSHOT_READY:
                        self._admit(item)
                for item in buffered:
                    if item.ev.event == SNAPSHOT_READY:
                        await self._on_snapshot_ready(item)
            await self._apply_ready()

    # -- seq bookkeeping --

    def _admit(self, item: _Item) -> None:
        """Route one event: apply-ready list, held past a gap, or duplicate by seq."""
        seq = item.ev.seq
        if seq is None:
            self._ready.append(item)
            return
        if self.last_seq is not None and seq <= self.last_seq:
            if self._guessed_baseline:
                # The baseline was only the lowest seq seen: let the version rule decide.
                self._ready.append(item)
            else:
                self._duplicate(item)
            return
        if seq in self._held:
            self._duplicate(item)
            return
        if len(self._held) >= self.tuning.max_held:
            log.warning("sync.held_overflow", seq=seq, held=len(self._held))
            self._count("dropped")
            return
        self._held[seq] = item

    def _duplicate(self, item: _Item) -> None:
        self._counted(item.ev.event, "duplicate")

    def _take_contiguous(self) -> None:
        if self.last_seq is None and self._held:
            # No baseline (a producer that never sent seq before, or a first snapshot without
            # one): the lowest seq seen starts the sequence.
            self.last_seq = min(self._held) - 1
            self._guessed_baseline = True
        expected = None if self.last_seq is None else self.last_seq + 1
        if expected is not None:
            # Events stalled by an environment fault wait in _ready: what follows them is
            # contiguous too, not a gap to recover.
            top = max((i.ev.seq for i in self._ready if i.ev.seq is not None), default=None)
            if top is not None and top >= expected:
                expected = top + 1
        while expected is not None and expected in self._held:
            self._ready.append(self._held.pop(expected))
            expected += 1

    async def _apply_ready(self) -> None:
        self._take_contiguous()
        if self._fault is not None and time.monotonic() < self._fault.retry_at:
            return  # an environment fault: wait for the retry (run() wakes up for it)
        while self._ready:
            ready, self._ready = self._ready, []
            items = self._coalesce(ready)
            for i, item in enumerate(items):
                if not await self._apply_one(item):
                    # Stalled on it: it and everything after it wait, in order, for the retry.
                    self._ready = items[i:] + self._ready
                    self._note_seq()
                    return
            self._take_contiguous()
        self._note_seq()

    def _coalesce(self, ready: list[_Item]) -> list[_Item]:
        """Keep only the highest version of single-file changes to the same path in a run
        between bulks; superseded ones still advance seq (counted as stale)."""
        if not self.tuning.coalesce or len(ready) < 2:
            return ready
        out: list[_Item] = []
        run: list[_Item] = []

        def flush() -> None:
            best: dict[str, _Item] = {}
            for it in run:
                ch = it.ev.changes[0]
                cur = best.get(ch.path)
                if cur is None or ch.version >= cur.ev.changes[0].version:
                    best[ch.path] = it
            keep = {id(it) for it in best.values()}
            for it in run:
                if id(it) in keep:
                    out.append(it)
                else:
                    self._superseded(it)
            run.clear()

        for it in ready:
            if it.ev.event == BULK_APPLY or len(it.ev.changes) != 1:
                flush()
                out.append(it)
            else:
                run.append(it)
        flush()
        return out

    def _superseded(self, item: _Item) -> None:
        self._counted(item.ev.event, "stale")
        self._advance_seq(item)

    def _advance_seq(self, item: _Item) -> None:
        seq = item.ev.seq
        if seq is not None and (self.last_seq is None or seq > self.last_seq):
            self.last_seq = seq
            self._last_seq_received_at = item.received_at

    def _note_seq(self) -> None:
        if self.last_seq is None:
            return
        self.metrics.last_seq.set(self.last_seq)
        try:
            self.tree.commit(seq=self.last_seq)  # a no-op unless it moved (skipped, rejected)
        except EnvironmentFaultError as exc:
            self._stall(exc, "seq")  # kept in memory; written by the next commit that works

    async def _apply_one(self, item: _Item) -> bool:
        """Apply one event; False when an environment fault stalled it (retried later, its seq
        not counted as applied)."""
        ev = item.ev
        if ev.event == REJECTED:
            self._advance_seq(item)  # counted when it was parsed
            return True
        result = await self.applier.apply(ev)
        if result.fault is not None:
            self._stall(result.fault, ev.event, seq=ev.seq)
            return False
        if result.error is not None:
            self.last_error = result.error
        if result.resync_reason == "apply_failed":
            log.error("sync.apply_failed", event_name=ev.event, seq=ev.seq, error=result.error)
        if result.resync_reason is not None:
            await self._want_snapshot(result.resync_reason, ev.seq)
        self._recovered()
        self._advance_seq(item)
        self._counted(ev.event, result.outcome)
        if result.outcome in ("applied", "noop"):
            now = time.time()
            self.metrics.last_applied.set(now)
            if result.outcome == "applied":
                self.last_applied_at = now
                if ev.timestamp is not None:
                    self.last_apply_lag = max(0.0, now - ev.timestamp)
                    self.metrics.apply_lag.observe(self.last_apply_lag)
                self._notify([c.path for c in ev.changes])
        return True

    # -- environment faults: reported, retried with backoff, never fatal --

    def _stall(
        self,
        exc: EnvironmentFaultError,
        what: str,
        *,
        seq: int | None = None,
        resync: tuple[DeltaEvent, str] | None = None,
    ) -> None:
        now = time.monotonic()
        fault = self._fault
        if fault is None:
            fault = self._fault = _Fault(exc.kind, str(exc), time.time())
        fault.kind, fault.message = exc.kind, str(exc)
        fault.attempts += 1
        if resync is not None:
            fault.resync = resync
        t = self.tuning
        delay = backoff_delay(
            fault.attempts, t.fault_backoff_initial, t.fault_backoff_max, floor=0.5
        )
        fault.retry_at = now + delay
        self.last_error = f"{exc.kind}: {exc}"
        self._counted(what, "environment_fault")
        # First time loud, then at growing intervals: a full disk can last for hours.
        if fault.attempts & (fault.attempts - 1) == 0:
            log.error(
                "sync.environment_fault",
                kind=exc.kind,
                path=exc.path,
                reason=str(exc),
                event_name=what,
                seq=seq,
                attempts=fault.attempts,
                retry_in=round(delay, 3),
            )

    def _recovered(self) -> None:
        fault = self._fault
        if fault is None or fault.resync is not None:
            return
        self._fault = None
        self.last_error = None
        log.info(
            "sync.environment_recovered",
            kind=fault.kind,
            attempts=fault.attempts,
            seconds=round(time.time() - fault.since, 3),
        )

    async def _retry_resync(self) -> None:
        fault = self._fault
        if fault is None or fault.resync is None or time.monotonic() < fault.retry_at:
            return
        ev, reason = fault.resync
        fault.resync = None
        await self._resync(ev, reason)

    def _notify(self, paths: list[str]) -> None:
        if self.on_applied is None or not paths:
            return
        try:
            self.on_applied(paths)
        except Exception:  # a hook must never stop the sync
            log.exception("sync.on_applied_failed")

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def _counted(self, event: str, outcome: str) -> None:
        """The one place an event's outcome is counted: /status counts and sidecar_events."""
        if outcome == "ignored":
            return  # outbound: our own events echoed back
        self.metrics.event(event, outcome)
        self._count(outcome)

    # -- gap recovery (rule 5) --

    async def _advance_recovery(self) -> None:
        if not self.hydrated.is_set():
            return
        await self._retry_resync()
        now = time.monotonic()
        if self._request is not None and now >= self._request.deadline:
            log.warning(
                "sync.snapshot_request_timed_out",
                reason=self._request.reason,
                waited=round(time.time() - self._request.sent_at, 1),
            )
            await self._send_request(self._request.reason)
        if not self._held:
            if self._gap is not None:
                log.info(
                    "sync.gap_closed",
                    last_seq=self.last_seq,
                    seconds=round(now - self._gap.opened_at, 3),
                )
                self._gap = None
            return
        gap = self._gap
        if gap is None:
            highest = max(self._held)
            missing = highest - (self.last_seq or 0) - len(self._held)
            log.warning(
                "sync.gap_detected",
                last_seq=self.last_seq,
                next_held=min(self._held),
                highest=highest,
                missing=missing,
            )
            self._gap = Gap(GapPhase.REORDER, now + self.tuning.reorder_wait, now)
            return
        if now < gap.deadline:
            return
        if gap.phase is GapPhase.REORDER:
            gap.phase = GapPhase.REPLAY
            gap.deadline = now + self.tuning.replay_wait
            highest = max(self._held)
            if self.link is not None and highest - (self.last_seq or 0) <= REPLAY_LIMIT:
                since = self._gap_since()
                log.info("sync.gap_rejoin", last_seq=self.last_seq, replay_since=since)
                self.link.rejoin(since)
                return
            gap.deadline = now  # replay cannot hold that many: go straight to a snapshot
        if gap.phase is GapPhase.REPLAY and now >= gap.deadline and await self._catch_up():
            return
        if gap.phase is GapPhase.REPLAY and now >= gap.deadline:
            gap.phase = GapPhase.REQUEST
            gap.rounds += 1
            gap.deadline = now + self.tuning.request_wait
            await self._want_snapshot("seq_gap", (self.last_seq or 0) + 1)
        elif gap.phase is GapPhase.REQUEST and now >= gap.deadline:
            gap.phase = GapPhase.REORDER
            gap.deadline = now

    async def _catch_up(self) -> bool:
        """Rule 5's second step: read the missing events from the database's event log with
        our own token (paged); True when that closed the gap. Past replay's 25 rows and its
        retention, and for events `realtime.send` stored nowhere (it swallows its failures)."""
        if self.catch_up is None or not self._held:
            return False
        after, until = self.last_seq or 0, max(self._held)
        try:
            rows = await self.catch_up(after, until)
        except SidecarError as exc:
            log.warning("sync.catch_up_failed", last_seq=after, error=str(exc))
            return False
        now = time.time()
        for event, payload in rows:
            # From the database through an authenticated RPC: as trusted as realtime.send's.
            item = self._parse(event, payload, None, now, trusted=True)
            if item is not None and item.ev.event != SNAPSHOT_READY:
                self._admit(item)
        await self._apply_ready()
        closed = not self._held
        log.info(
            "sync.caught_up" if closed else "sync.catch_up_incomplete",
            after_seq=after,
            events=len(rows),
            last_seq=self.last_seq,
        )
        return closed

    def _gap_since(self) -> int:
        base = self._last_seq_received_at
        if base is None:
            # Nothing applied since hydration: the snapshot holds everything up to created_at.
            created = self.tree.created_at
            if created is not None:
                return created
            base = min(i.received_at for i in self._held.values())
        return int((base - self.tuning.replay_margin) * 1000)

    async def _want_snapshot(self, reason: str, needs: int | None) -> None:
        req = self._request
        if req is not None:
            if req.needs is not None and (needs is None or needs < req.needs):
                req.needs = needs  # the outstanding request must now cover this one too
                self.tree.owe_snapshot(req.reason, needs)
            return
        # Recorded before asking: the given-up event's seq is passed from now on, and a
        # restart must still know that its paths wait for a snapshot.
        self.tree.owe_snapshot(reason, needs)
        await self._send_request(reason, needs)

    async def _send_request(self, reason: str, needs: int | None = None) -> None:
        now = time.monotonic()
        if self._request is not None:  # re-sent after a timeout: still needs the same
            needs = self._request.needs
        self._request = _Request(
            reason, self.last_seq, time.time(), now + self.tuning.request_wait, needs
        )
        payload = {"session_id": self.session_id, "reason": reason, "last_seq": self.last_seq}
        log.warning("sync.snapshot_requested", reason=reason, last_seq=self.last_seq)
        if self.link is None:
            return
        try:
            await self.link.send("snapshot:request", payload)
        except Exception as exc:  # noqa: BLE001 - retried when the request times out
            log.warning("sync.snapshot_request_failed", error=type(exc).__name__)

    async def _on_snapshot_ready(self, item: _Item) -> None:
        ev = item.ev
        waiters = [(f, t) for f, t in self._ready_waiters if not f.done()]
        fresh = [
            (f, t)
            for f, t in waiters
            if not ev.replayed or (ev.timestamp is not None and ev.timestamp >= t - 5)
        ]
        if fresh:
            for fut, _ in fresh:
                fut.set_result(ev)
            self._request = None
            log.info(
                "sync.snapshot_ready_received",
                snapshot_id=ev.snapshot_id,
                seq=ev.seq,
                waiters=len(fresh),
            )
            return
        if not self.hydrated.is_set():
            self._buffer.append(item)  # decided after hydration
            return
        req = self._request
        if req is not None:
            # An answer made after the change we asked about is taken even when events newer
            # than it were applied meanwhile: publishing keeps every path at its newest
            # version (sidecar/tree/project.py snapshot_keeps), so nothing rolls back, and
            # the paths it repairs are repaired. One made before it cannot help: keep asking.
            if ev.seq is not None and req.needs is not None and ev.seq < req.needs:
                log.info(
                    "sync.snapshot_ready_ignored",
                    snapshot_id=ev.snapshot_id,
                    seq=ev.seq,
                    needs=req.needs,
                    why="older than the change it must repair",
                )
                return
        else:
            why = None
            if ev.snapshot_id == self.tree.snapshot_id:
                why = "already in place"
            elif ev.seq is not None and self.last_seq is not None and ev.seq <= self.last_seq:
                why = "not newer than what was applied"
            elif ev.seq is None and ev.replayed:
                why = "replayed answer to an old request"
            if why is not None:
                log.info(
                    "sync.snapshot_ready_ignored", snapshot_id=ev.snapshot_id, seq=ev.seq, why=why
                )
                return
        await self._resync(ev, req.reason if req is not None else "snapshot_ready")

    async def _resync(self, ev: DeltaEvent, reason: str) -> None:
        if self.resync_fn is None or ev.snapshot_url is None:
            log.error("sync.resync_unavailable", snapshot_id=ev.snapshot_id)
            return
        before = {p: s.sha256 for p, s in self.tree.state.items()}
        log.info("sync.resync_started", snapshot_id=ev.snapshot_id, seq=ev.seq, reason=reason)
        try:
            manifest = await self.resync_fn(ev.snapshot_url, ev.sha256)
        except (SidecarError, OSError) as exc:
            fault = environment_fault(exc)
            if fault is not None:
                # Disk full mid-resync: the same snapshot is tried again in seconds, not after
                # the snapshot:request timeout.
                self._stall(fault, "resync", seq=ev.seq, resync=(ev, reason))
                return
            self.last_error = f"resync failed: {type(exc).__name__}: {exc}"
            manifest = None
        if manifest is None:
            # Keep the request outstanding: it is re-sent when it times out.
            log.error("sync.resync_failed", snapshot_id=ev.snapshot_id, error=self.last_error)
            return
        self.resyncs += 1
        self.metrics.inc(self.metrics.resyncs, reason)
        self._recovered()
        owed = self.tree.owed_snapshot
        if owed is not None and _covers(manifest.seq, owed[1]):
            self.tree.owe_snapshot(None)
        self._request = None
        self._gap = None
        if manifest.seq is not None and (self.last_seq is None or manifest.seq > self.last_seq):
            self.last_seq = manifest.seq
            self._guessed_baseline = False
            # A later gap is replayed from when the snapshot was made.
            self._last_seq_received_at = manifest.created_at / 1000
        dropped = [s for s in self._held if self.last_seq is not None and s <= self.last_seq]
        for s in dropped:
            self._duplicate(self._held.pop(s))
        state = self.tree.state
        changed = sorted(p for p, s in state.items() if before.get(p) != s.sha256)
        changed += sorted(p for p in before if state.get(p) is None)
        log.info(
            "sync.resynced",
            snapshot_id=manifest.snapshot_id,
            last_seq=self.last_seq,
            changed=len(changed),
            dropped_held=len(dropped),
        )
        self._notify(changed)
        await self._apply_ready()


def _covers(snapshot_seq: int | None, needs: int | None) -> bool:
    """Whether a snapshot at snapshot_seq includes the change at seq `needs`."""
    return needs is None or snapshot_seq is None or snapshot_seq >= needs
