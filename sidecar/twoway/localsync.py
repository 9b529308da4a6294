"""Two-way sync of local changes: report them, push them upstream, resolve conflicts by policy.

For every path the watcher reports (its bytes differ from what the sidecar last synced),
`LocalSync`:

1. checks the quota (SIDECAR_MAX_BYTES / _FILES / _FILE_BYTES): growth over a limit is refused,
   counted (`sidecar_quota_refusals{source="local"}`), flagged in `status()` and broadcast,
   and never pushed;
2. broadcasts `file:local-change` with a unified diff against the last synced bytes (or the
   size, for binaries) through the `send` callback, when one is given;
3. with an `Upstream`, pushes the bytes with `expected_version` = the version it last synced and
   records the new head version and sha256 in the StateStore, so the broadcast of its own push
   comes back as a duplicate. A stale `expected_version` is a conflict, resolved by policy:
   `remote-wins` keeps the database's bytes and saves the local ones aside, `local-wins` re-pushes
   over the new head (saving the remote bytes aside), `merge` pushes a clean three-way merge
   against the last common version and otherwise falls back to `remote-wins`.

A remote update for a path that was changed locally since its last sync is a conflict as well:
the Applier calls `before_publish` (under the tree lock) right before publishing it.

A push examines the path under the tree lock, makes its HTTP calls without it (remote updates
keep applying meanwhile), then records the result under the lock only if the path's recorded
version has not moved (compare-and-set); if a remote update was applied in between, the path
is looked at afresh. Losing bytes are
saved as `state_dir/conflicts/<dir>/<name>.sync-conflict-<YYYYMMDD>-<HHMMSS>-<session>.<ext>`
(Syncthing's naming). Last synced bytes of text files (up to `base_max_bytes`) are kept,
content-addressed, under `state_dir/base/` for diffs and merges.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import structlog

from sidecar.config import ConflictPolicy, TwoWaySettings
from sidecar.errors import SidecarError
from sidecar.live.events import FileChange
from sidecar.metrics import Metrics
from sidecar.retry import backoff_delay
from sidecar.tree import fsio
from sidecar.tree.paths import resolve_inside
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import FileState
from sidecar.twoway.bases import DEFAULT_BASE_MAX_BYTES, BaseStore
from sidecar.twoway.conflicts import (
    Conflict,
    Decision,
    Resolution,
    Side,
    decide_push,
    decide_remote,
    same_change,
    save_aside,
)
from sidecar.twoway.merge import is_text, unified_diff
from sidecar.twoway.upstream import ConflictError, RemoteFile, Upstream, UpstreamError
from sidecar.twoway.watcher import LocalChange, Watcher, compare

__all__ = [
    "LocalSync",
    "Outcome",
]

log = structlog.get_logger(component="localsync")

Outcome = Literal["unchanged", "reported", "pushed", "conflict", "refused", "failed"]
SendFn = Callable[[str, dict[str, Any]], Awaitable[None]]

MAX_DIFF_BYTES = 128 * 1024  # keeps file:local-change under the Realtime payload limits
MAX_CONFLICT_ROUNDS = 5
_DEFAULTS = TwoWaySettings()  # frozen: safe to share as a default
GC_EVERY_PUTS = 256  # base copies written between two clean-ups of unreferenced ones


class LocalSync:
    """Reports and pushes local changes and resolves conflicts (see the module docstring).

    Large (about 700 lines) because it carries out both conflict flows (a push refused as
    stale, a remote update over a local edit) under the tree lock, with their retries; the
    decisions themselves are pure functions in `twoway/conflicts.py` and the merge bases live
    in `twoway/bases.py`.

    Args:
        tree: the project tree (its state is what the sidecar last synced; every write and
            record here happens under its lock).
        state_dir: the sidecar's own directory (bases, conflict copies).
        twoway: the two-way settings (conflict policy, ignore patterns); the quota limits are
            the tree's (`tree.limits`), the same ones the snapshot and delta writers enforce.
        send: broadcasts on the project channel (Subscription.send); None when the token may
            not write. A failing or denied send is counted and logged, never fatal.
        upstream: pushes to the database (SIDECAR_UPSTREAM=rpc); None only reports.
        push_attempts: attempts per push on transient upstream errors before the path is
            parked as failed (retried every `retry_interval` seconds by `run`).
    """

    def __init__(
        self,
        tree: ProjectTree,
        state_dir: Path,
        metrics: Metrics,
        *,
        twoway: TwoWaySettings = _DEFAULTS,
        session_id: str = "local",
        send: SendFn | None = None,
        upstream: Upstream | None = None,
        write_mode: str = "atomic",
        base_max_bytes: int = DEFAULT_BASE_MAX_BYTES,
        push_attempts: int = 4,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        retry_interval: float = 30.0,
        max_listed_conflicts: int = 100,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        policy = twoway.conflict
        if policy not in ("remote-wins", "local-wins", "merge"):
            raise ValueError(f"unknown conflict policy {policy!r}")
        self.tree = tree
        self.project_dir = tree.root
        self.state_dir = Path(state_dir).absolute()
        self.state = tree.state  # reads; records go through tree.commit
        self.metrics = metrics
        self.lock = tree.lock
        self.limits = tree.limits
        self.policy: ConflictPolicy = policy
        self.session_id = session_id
        self.send = send
        self.upstream = upstream
        self.write_mode = write_mode
        self.ignore = twoway.ignore
        self.bases = BaseStore(self.state_dir / "base", base_max_bytes)
        self.conflicts_dir = self.state_dir / "conflicts"
        self.push_attempts = max(1, push_attempts)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.retry_interval = retry_interval
        self.conflicts: deque[Conflict] = deque(maxlen=max_listed_conflicts)
        self.conflicts_total = 0
        self.counts: dict[str, int] = {}
        self.refused: dict[str, str] = {}  # path -> reason (quota)
        self.failed: dict[str, str] = {}  # path -> last upstream error
        self.idle = asyncio.Event()
        self.idle.set()
        self._http = http
        self._own_http = False
        self._outbox: list[tuple[str, dict[str, Any]]] = []
        self._pending: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._reported: dict[str, str | None] = {}  # path -> hash last broadcast
        self._verdicts: dict[str, LocalChange] = {}  # the watcher's, not yet handled

    def watcher(self, **kwargs: Any) -> Watcher:
        """A Watcher sharing this instance's lock, state and ignore patterns.

        Keyword arguments go to `Watcher` (debounce_ms, step_ms, initial_scan...).
        """
        kwargs.setdefault("ignore", self.ignore)
        return Watcher(
            self.tree,
            state_dir=self.state_dir,
            max_read=self.limits.max_file_bytes,
            on_synced=self._on_synced,
            **kwargs,
        )

    # -- running --

    async def run(self, watcher: Watcher | None = None) -> None:
        """Seed the base store, then handle what the watcher reports, forever.

        Cancellation stops it between two paths' handling (a push in flight is abandoned; its
        path is examined again next time).
        """
        await self.seed_bases()
        async with asyncio.TaskGroup() as tg:
            if watcher is not None:
                tg.create_task(self._feed(watcher), name="localsync-feed")
            tg.create_task(self._retry_failed(), name="localsync-retry")
            await self._work()

    def enqueue(self, paths: Iterable[str] | Mapping[str, LocalChange]) -> None:
        """Queue paths for `run` (or `drain`) to handle; given the watcher's verdicts, those
        are used as they are (the file is not read again until right before a push)."""
        if isinstance(paths, Mapping):
            self._verdicts.update(paths)
        for p in paths:
            self._pending[p] = None
        if self._pending:
            self.idle.clear()
            self._wake.set()

    async def process(self, paths: Iterable[str]) -> dict[str, Outcome]:
        """Handle these paths now, then whatever got queued meanwhile; outcome per path."""
        out: dict[str, Outcome] = {}
        for rel in paths:
            self._pending.pop(rel, None)
            out[rel] = await self.handle(rel)
        out.update(await self.drain())
        return out

    async def drain(self) -> dict[str, Outcome]:
        """Handle every queued path (until none is left); outcome per path."""
        out: dict[str, Outcome] = {}
        await self.flush_outbox()
        while self._pending:
            rel = next(iter(self._pending))
            del self._pending[rel]
            out[rel] = await self._handle_safely(rel)
            await self.flush_outbox()
        if self.bases.puts >= GC_EVERY_PUTS:
            async with self.lock:
                keep = {s.sha256 for s in self.state.live().values() if s.sha256}
                await asyncio.to_thread(self.bases.gc, keep)
        self.idle.set()
        return out

    async def close(self) -> None:
        """Keep the base copies still needed on disk; close our HTTP session, if any."""
        keep = {s.sha256 for s in self.state.live().values() if s.sha256}
        await asyncio.to_thread(self.bases.flush, keep)
        if self._own_http and self._http is not None:
            await self._http.close()
        self._http = None

    async def _feed(self, watcher: Watcher) -> None:
        async for batch in watcher:
            self.enqueue(batch)

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.drain()

    async def _retry_failed(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            if self.failed:
                log.info("localsync.retrying_failed", paths=len(self.failed))
                self.enqueue(list(self.failed))

    async def _handle_safely(self, rel: str) -> Outcome:
        try:
            return await self.handle(rel)
        except (OSError, SidecarError) as exc:
            self.failed[rel] = f"{type(exc).__name__}: {exc}"
            self._count("failed")
            log.warning("localsync.handle_failed", path=rel, error=self.failed[rel])
            return "failed"

    # -- one local change --

    async def handle(self, rel: str) -> Outcome:
        """Report and push one path if it holds a local change; its outcome."""
        async with self.lock:
            ch = self._verdict(rel)
            if ch is None:
                ch = await self._examine(rel)
            refused = None if ch is None else self._announce(ch)
        await self.flush_outbox()  # the file:local-change goes out before the push
        if ch is None:
            self.refused.pop(rel, None)
            self.failed.pop(rel, None)
            return "unchanged"
        if refused:
            return "refused"
        if self.upstream is None:
            self._count("reported")
            return "reported"
        outcome = await self._push(rel)
        await self.flush_outbox()
        return outcome

    def _announce(self, ch: LocalChange) -> bool:
        """Queue the file:local-change for ch (once per content); True when quota refuses it."""
        reason = self._quota_refusal(ch)
        new = self._reported.get(ch.path, "-") != ch.sha256
        if reason is not None:
            if new or self.refused.get(ch.path) != reason:
                self._reported[ch.path] = ch.sha256
                self.refused[ch.path] = reason
                self.metrics.inc(self.metrics.quota_refusals, "local")
                self._count("refused")
                log.warning("localsync.quota_refused", path=ch.path, size=ch.size, reason=reason)
                payload = self._change_payload(ch, with_diff=False)
                payload.update(refused="quota", reason=reason)
                self._later_broadcast("file:local-change", payload)
            return True
        self.refused.pop(ch.path, None)
        if new:
            self._reported[ch.path] = ch.sha256
            log.info(
                "localsync.local_change",
                path=ch.path,
                kind=ch.kind,
                size=ch.size,
                base_version=ch.known.version if ch.known else None,
            )
            self._later_broadcast("file:local-change", self._change_payload(ch))
        return False

    async def _push(self, rel: str) -> Outcome:
        assert self.upstream is not None
        attempt = restarts = 0
        while True:
            try:
                async with self.lock:
                    ch = await self._examine(rel)
                    if ch is None:
                        self.failed.pop(rel, None)
                        return "unchanged"
                    if self._announce(ch):  # edited again since handle() looked
                        return "refused"
                    seen = self._version(rel)
                # The HTTP calls run without the tree lock, so remote deltas keep applying.
                outcome = await self._push_unlocked(ch, seen)
                if outcome is None:
                    # A remote change to this path was applied meanwhile (before_publish decided
                    # it against our edit): look at the path afresh.
                    restarts += 1
                    await self.flush_outbox()
                    if restarts < MAX_CONFLICT_ROUNDS:
                        continue
                    self.failed[rel] = "changed remotely during every push"  # parked, retried
                    self._count("failed")
                    return "failed"
                self.failed.pop(rel, None)
                self._count(outcome)
                return outcome
            except UpstreamError as exc:
                attempt += 1
                if not exc.transient or attempt >= self.push_attempts:
                    self.failed[rel] = str(exc)
                    self._count("failed")
                    log.warning(
                        "localsync.push_failed",
                        path=rel,
                        attempts=attempt,
                        error=str(exc),
                        status=exc.status,
                    )
                    return "failed"
                delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max, floor=1.0)
                log.info(
                    "localsync.push_retry_scheduled",
                    path=rel,
                    attempt=attempt,
                    wait_for=round(delay, 3),
                    error=str(exc),
                )
            await self.flush_outbox()
            await asyncio.sleep(delay)  # the lock is free while we wait

    def _verdict(self, rel: str) -> LocalChange | None:
        """The watcher's verdict on rel if the state has not moved since it was made (the
        caller holds the lock). A newer local edit comes with a newer verdict, and the push
        reads the file once more anyway."""
        ch = self._verdicts.pop(rel, None)
        if ch is not None and self.state.get(rel) == ch.known:
            return ch
        return None

    def _version(self, rel: str) -> int | None:
        known = self.state.get(rel)
        return known.version if known is not None else None

    async def _push_unlocked(self, ch: LocalChange, seen: int | None) -> Outcome | None:
        """Push ch (examined under the lock when the path's recorded version was `seen`) and
        resolve conflicts. The calls run without the lock; each result is applied under it
        only if the recorded version has not moved past what the push knew (compare-and-set).
        None: a remote change to the path was applied meanwhile. Raises UpstreamError.
        """
        assert self.upstream is not None
        data = ch.data
        expected = ch.known.version if ch.known is not None else 0
        conflict: Conflict | None = None
        for _round in range(MAX_CONFLICT_ROUNDS):
            try:
                if data is None:
                    version = await self.upstream.delete(ch.path, expected, retries=0)
                else:
                    version = await self.upstream.upsert(ch.path, data, expected, retries=0)
            except ConflictError:
                head = await self.upstream.get(ch.path, retries=0)
                async with self.lock:
                    if self._version(ch.path) != seen:
                        return None
                    step = self._resolve_push(ch, head, data, conflict)
                    conflict = step.conflict or conflict
                    if step.finish is not None:
                        version, final = step.finish
                        await self._settle(ch, final, version)
                        return "conflict" if conflict is not None else "pushed"
                data, expected = step.data, step.expected
                continue
            async with self.lock:
                now = self._version(ch.path)
                # Our push is the head at `version`; its echo may already be applied (now ==
                # version). A newer remote version applied meanwhile was decided by
                # before_publish against our edit: recording ours would roll the path back.
                if now is None or now <= version:
                    await self._settle(ch, data, version)
            log.info("localsync.pushed", path=ch.path, version=version, expected_version=expected)
            return "conflict" if conflict is not None else "pushed"
        raise UpstreamError(
            f"{ch.path!r}: still conflicting after {MAX_CONFLICT_ROUNDS} rounds", transient=True
        )

    def _resolve_push(
        self,
        ch: LocalChange,
        head: RemoteFile | None,
        data: bytes | None,
        conflict: Conflict | None,
    ) -> _Step:
        """Carry out `decide_push` after a version conflict on push (`data`: what we pushed)."""
        h_version = head.version if head is not None else 0
        h_data = head.content if head is not None else None
        if h_data == data:
            # Both sides hold the same bytes (or both deleted): nothing to resolve.
            return _Step(finish=(h_version, h_data))
        head_side = Side(deleted=head is None, data=h_data)
        d = decide_push(self.policy, self._side(ch), head_side, self._base_of(ch))
        self._log_fallback(ch, d)
        if d.resolution is None:
            return _Step(finish=(h_version, h_data))
        saved = self._save_decided(ch, d, h_data, copy=False)
        # A later round of the same push records its conflict only once (remote-kept ends it).
        new = None
        if conflict is None or d.resolution == "remote-kept":
            new = self._record_conflict(ch, d.resolution, "push", h_data, h_version, saved)
        if d.winner == "remote":
            return _Step(conflict=new, finish=(h_version, h_data))
        if d.winner == "merged":
            return _Step(conflict=new, data=d.merged, expected=h_version)
        return _Step(conflict=new, data=data, expected=h_version)

    def _side(self, ch: LocalChange) -> Side:
        return Side(deleted=ch.deleted, data=ch.data, sha256=ch.sha256)

    def _base_of(self, ch: LocalChange) -> bytes | None:
        """The last synced bytes of ch's path (the merge base), when known and kept."""
        if ch.known is None or ch.known.deleted:
            return None
        return self.bases.get(ch.known.sha256)

    def _log_fallback(self, ch: LocalChange, d: Decision) -> None:
        if d.why == "no base":
            base_version = ch.known.version if ch.known is not None else None
            log.info("localsync.merge_no_base", path=ch.path, base_version=base_version)
        elif d.why == "merge conflicted":
            log.info("localsync.merge_conflicted", path=ch.path)

    def _save_decided(
        self, ch: LocalChange, d: Decision, remote: bytes | None, *, copy: bool
    ) -> str | None:
        """Save the losing side `d` names; copy: read the local file when ch holds no bytes."""
        if d.save_aside == "remote":
            return self._save_aside(ch.path, remote)
        if d.save_aside == "local":
            if ch.data is not None:
                return self._save_aside(ch.path, ch.data)
            return self._copy_aside(ch.path) if copy else None
        return None

    async def _settle(self, ch: LocalChange, data: bytes | None, version: int) -> None:
        """Record `version` = data as synced; write data to disk if it is not what ch read.

        The caller holds the lock, so nothing else changed the state since ch was examined.
        """
        if data != ch.data and not await self._write_local(ch, data):
            log.info("localsync.changed_again", path=ch.path, version=version)
            return  # a newer local edit is on disk; it will be handled (and conflict) next
        cur = self.state.get(ch.path)
        digest = None if data is None else hashlib.sha256(data).hexdigest()
        size = 0 if data is None else len(data)
        mode = ch.mode or (cur.mode if cur is not None and cur.mode else 0o644)
        self.tree.commit({ch.path: FileState(version, digest, size, 0 if data is None else mode)})
        if data is not None:
            old = cur.sha256 if cur is not None else None
            self.bases.put(data, digest, persist=True, replaces=old)
        self._reported.pop(ch.path, None)

    # -- remote updates to locally changed paths --

    async def before_publish(self, changes: Sequence[FileChange]) -> set[str]:
        """Applier hook, called with the tree lock held right before it publishes `changes`:
        decides each against local edits; the paths it handled (the Applier writes nothing
        for them)."""
        return {c.path for c in changes if not await self._check_remote(c)}

    async def _check_remote(self, change: FileChange) -> bool:
        """Decide a remote change against local edits; True: apply it, False: it was handled.

        The caller holds the tree lock (an Applier hook calls this right before publishing).
        remote-wins saves the local bytes aside and lets the remote apply; local-wins saves the
        remote bytes aside, records the remote version as seen and queues a push of the local
        bytes; merge writes a clean merge and queues its push, else acts as remote-wins.
        """
        rel = change.path
        known = self.state.get(rel)
        if known is not None and change.version <= known.version:
            # Our push recorded this version or a newer one after the Applier's own version
            # check (outside the lock): publishing it now would roll the path back.
            return False
        ch = await self._examine(rel, keep_base=False)  # its base is about to be superseded
        remote = change.content if change.action == "update" else None
        if ch is None:
            if remote is not None:
                old = known.sha256 if known is not None else None
                self.bases.put(remote, change.content_hash, replaces=old)
            return True
        r_hash = change.content_hash if change.action == "update" else None
        local = self._side(ch)
        if same_change(local, Side(change.action == "delete", None, r_hash)):
            return True  # both sides made the same change
        if change.action == "update" and remote is None and change.content_url:
            # Only a real conflict needs the remote bytes here (merge, save aside): without a
            # local edit the Applier's own download is the only one.
            remote = await self._fetch(change)
        remote_side = Side(change.action == "delete", remote, r_hash)
        d = decide_remote(self.policy, local, remote_side, self._base_of(ch))
        self._log_fallback(ch, d)
        if d.winner == "merged":
            assert d.merged is not None
            assert remote is not None
            if await self._write_local(ch, d.merged):
                self._record_conflict(
                    ch, "merged", "remote", remote, change.version, None, remote_hash=r_hash
                )
                self._note_seen(change, remote, ch)
                self.enqueue([rel])
                return False
            d = decide_remote("remote-wins", local, remote_side, None)
        if d.resolution is None:
            return True
        saved = self._save_decided(ch, d, remote, copy=True)
        if d.winner == "remote":
            self._record_conflict(
                ch, "remote-kept", "remote", remote, change.version, saved, remote_hash=r_hash
            )
            self._reported.pop(rel, None)
            return True
        if remote is None and change.action == "update":
            log.warning(
                "localsync.remote_not_saved",
                path=rel,
                version=change.version,
                why="content unavailable",
            )
        self._record_conflict(
            ch, "local-kept", "remote", remote, change.version, saved, remote_hash=r_hash
        )
        self._note_seen(change, remote, ch)
        self.enqueue([rel])
        return False

    def _note_seen(self, change: FileChange, remote: bytes | None, ch: LocalChange) -> None:
        """Record the remote version as the last synced one without writing its bytes."""
        if change.action == "delete":
            st = FileState(change.version, None, 0, 0)
        else:
            size = len(remote) if remote is not None else 0
            st = FileState(
                change.version,
                change.content_hash,
                size,
                change.mode if change.mode is not None else (ch.mode or 0o644),
            )
            if remote is not None:
                self.bases.put(remote, change.content_hash, persist=True)
        self.tree.commit({change.path: st})

    # -- helpers --

    async def _examine(self, rel: str, *, keep_base: bool = True) -> LocalChange | None:
        """examine() for rel (caller holds the lock); unchanged bytes are kept as the base."""
        change, data = await compare(self.project_dir, rel, self.state, self.limits.max_file_bytes)
        if change is None and data is not None and keep_base:
            known = self.state.get(rel)
            if known is not None and known.sha256:
                self.bases.put(data, known.sha256)
        return change

    def _on_synced(self, _rel: str, data: bytes, sha: str) -> None:
        if len(data) <= self.bases.max_bytes and not self.bases.has(sha):
            self.bases.put(data, sha)

    async def seed_bases(self) -> int:
        """Keep the synced bytes of text files already on disk; drop copies nobody needs."""
        live = {
            p: s
            for p, s in self.state.live().items()
            if s.size <= self.bases.max_bytes and s.sha256
        }

        def seed() -> int:
            n = 0
            for rel, st in live.items():
                if st.sha256 is None or self.bases.has(st.sha256):
                    continue
                try:
                    data = (self.project_dir / rel).read_bytes()
                except OSError:
                    continue
                if hashlib.sha256(data).hexdigest() == st.sha256:
                    self.bases.put(data, st.sha256, persist=True)
                    n += 1
            return n

        seeded = await asyncio.to_thread(seed)
        async with self.lock:
            keep = {s.sha256 for s in self.state.live().values() if s.sha256}
            removed = await asyncio.to_thread(self.bases.gc, keep)
        log.info("localsync.bases_seeded", seeded=seeded, removed=removed)
        return seeded

    def _quota_refusal(self, ch: LocalChange) -> str | None:
        if ch.deleted:
            return None
        lim = self.limits
        if lim.max_file_bytes and ch.size > lim.max_file_bytes:
            return f"{ch.size} bytes, over SIDECAR_MAX_FILE_BYTES={lim.max_file_bytes}"
        live = ch.known is not None and not ch.known.deleted
        old = ch.known.size if ch.known is not None and live else 0
        return self.tree.quota.over(ch.size - old, 0 if live else 1)

    def _change_payload(self, ch: LocalChange, *, with_diff: bool = True) -> dict[str, Any]:
        known = ch.known if ch.known is not None and not ch.known.deleted else None
        action = {"created": "create", "modified": "modify", "deleted": "delete"}[ch.kind]
        payload: dict[str, Any] = {
            "path": ch.path,
            "action": action,
            "base_version": ch.known.version if ch.known is not None else None,
            "base_hash": known.sha256 if known is not None else None,
            "new_hash": ch.sha256,
            "size": ch.size,
            "timestamp": int(time.time() * 1000),
            "session_id": self.session_id,
        }
        if not with_diff:
            return payload
        binary = ch.data is not None and not is_text(ch.data)
        payload["binary"] = binary
        if binary or (ch.data is None and not ch.deleted):
            payload["diff"] = None
            return payload
        base = self.bases.get(known.sha256) if known is not None else None
        if known is not None and base is None:
            payload["diff"] = None
            payload["diff_omitted"] = "base unavailable"
            return payload
        diff = unified_diff(base, ch.data, ch.path, max_bytes=MAX_DIFF_BYTES)
        payload["diff"] = diff
        if diff is None:
            payload["diff_omitted"] = "binary base" if base and not is_text(base) else "too large"
        return payload

    async def _broadcast(self, event: str, payload: dict[str, Any]) -> None:
        if self.send is None:
            return
        try:
            await self.send(event, payload)
        except Exception as exc:  # noqa: BLE001 - a denied broadcast is counted, never fatal
            self._count("broadcast_failed")
            self.metrics.inc(self.metrics.local_changes, "broadcast_failed")
            log.warning(
                "localsync.broadcast_failed",
                event_name=event,
                path=payload.get("path"),
                error=f"{type(exc).__name__}: {exc}",
            )

    def _record_conflict(
        self,
        ch: LocalChange,
        resolution: Resolution,
        origin: Literal["push", "remote"],
        remote: bytes | None,
        remote_version: int | None,
        saved: str | None,
        *,
        remote_hash: str | None = None,
    ) -> Conflict:
        if remote_hash is None and remote is not None:
            remote_hash = hashlib.sha256(remote).hexdigest()
        c = Conflict(
            path=ch.path,
            policy=self.policy,
            resolution=resolution,
            origin=origin,
            local_hash=ch.sha256,
            remote_hash=remote_hash,
            remote_version=remote_version,
            base_version=ch.known.version if ch.known is not None else None,
            saved=saved,
            timestamp=time.time(),
        )
        self.conflicts.append(c)
        self.conflicts_total += 1
        self.metrics.inc(self.metrics.conflicts, self.policy)
        log.warning(
            "localsync.conflict",
            path=c.path,
            policy=c.policy,
            resolution=c.resolution,
            origin=origin,
            remote_version=remote_version,
            base_version=c.base_version,
            saved=saved,
        )
        self._later_broadcast("file:conflict", {**c.to_json(), "session_id": self.session_id})
        return c

    def _later_broadcast(self, event: str, payload: dict[str, Any]) -> None:
        # Conflicts are found while the tree lock is held: send once it is released.
        self._outbox.append((event, payload))
        self._wake.set()

    async def flush_outbox(self) -> None:
        """Send the broadcasts queued while the tree lock was held (`run` does it on its own)."""
        while self._outbox:
            event, payload = self._outbox.pop(0)
            await self._broadcast(event, payload)

    def _save_aside(self, rel: str, data: bytes | None) -> str | None:
        if data is None:
            return None
        target = save_aside(self.conflicts_dir, rel, data, self.session_id, time.time())
        return target.relative_to(self.state_dir).as_posix()

    def _copy_aside(self, rel: str) -> str | None:
        try:
            data = (self.project_dir / rel).read_bytes()
        except OSError:
            return None
        return self._save_aside(rel, data)

    async def _write_local(self, ch: LocalChange, data: bytes | None) -> bool:
        """Replace ch's bytes on disk with data (None: delete) if the disk still holds ch."""
        target = resolve_inside(self.project_dir, ch.path)
        now, _ = await compare(self.project_dir, ch.path, self.state, self.limits.max_file_bytes)
        if now is None or now.sha256 != ch.sha256 or now.kind != ch.kind:
            return False
        if data is None:
            if fsio.remove_file(target):
                fsio.prune_empty_dirs(target.parent, self.project_dir)
            return True
        mode = ch.mode or (ch.known.mode if ch.known is not None and ch.known.mode else 0o644)
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.write_mode == "inplace":
            fsio.write_inplace(target, data, mode)
        else:
            # Staged in the state directory (same filesystem): never a partial file in the tree.
            stage = self.state_dir / fsio.STAGE_DIR_NAME
            stage.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = fsio.write_temp(stage, target.name, data, mode)
            tmp.replace(target)
        return True

    async def _fetch(self, change: FileChange) -> bytes | None:
        """The bytes behind a content_url (for merges and saved copies), or None."""
        assert change.content_url is not None
        cap = self.limits.max_file_bytes or 256 * 1024 * 1024
        if self._http is None:
            self._http = aiohttp.ClientSession()
            self._own_http = True
        try:
            async with self._http.get(
                change.content_url, timeout=aiohttp.ClientTimeout(total=30)
            ) as resp:
                if resp.status != 200:
                    return None
                data = await resp.content.read(cap + 1)
        except (aiohttp.ClientError, TimeoutError):
            return None
        if len(data) > cap or hashlib.sha256(data).hexdigest() != change.content_hash:
            return None
        return data

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if outcome != "broadcast_failed":
            self.metrics.inc(self.metrics.local_changes, outcome)

    # -- status --

    @property
    def quota_exceeded(self) -> bool:
        """True while some local change is refused by the quota."""
        return bool(self.refused)

    def status(self) -> dict[str, Any]:
        """The two-way sync part of /status."""
        return {
            "policy": self.policy,
            "upstream": self.upstream is not None,
            "pending": len(self._pending),
            "failed": dict(self.failed),
            "quota_exceeded": self.quota_exceeded,
            "quota_refused": dict(self.refused),
            "conflicts_total": self.conflicts_total,
            "conflicts": [c.to_json() for c in self.conflicts],
            "counts": dict(self.counts),
        }


@dataclass(slots=True)
class _Step:
    """What to do after a push conflict: finish with (version, bytes), or push again."""

    conflict: Conflict | None = None
    finish: tuple[int, bytes | None] | None = None
    data: bytes | None = None
    expected: int = 0
