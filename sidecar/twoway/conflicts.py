"""Conflicts between a local edit and the database: the record, the saved copy's name, and the
policy as pure functions.

`decide_push` (our push met a newer head) and `decide_remote` (a remote update arrived for a
path edited locally) look only at small values - the two sides' bytes and the last common
version - and return a `Decision`; `LocalSync` (sidecar/twoway/localsync.py) carries it out
(disk, network, state). tests/twoway/test_conflicts.py checks them from a table.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sidecar.config import ConflictPolicy
from sidecar.tree import fsio
from sidecar.twoway.merge import merge3

__all__ = [
    "Conflict",
    "Decision",
    "Resolution",
    "Side",
    "conflict_name",
    "decide_push",
    "decide_remote",
    "same_change",
    "save_aside",
]

Resolution = Literal["remote-kept", "local-kept", "merged"]
Winner = Literal["remote", "local", "merged"]
_SESSION_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Conflict:
    """One conflict and how it was resolved; `saved` is the losing copy (relative to state_dir)."""

    path: str
    policy: str
    resolution: Resolution
    origin: Literal["push", "remote"]  # found by our push, or by a remote update
    local_hash: str | None
    remote_hash: str | None
    remote_version: int | None
    base_version: int | None
    saved: str | None
    timestamp: float

    def to_json(self) -> dict[str, Any]:
        """The record as /status and `file:conflict` show it."""
        out = asdict(self)
        out["timestamp"] = int(self.timestamp * 1000)
        return out


@dataclass(frozen=True, slots=True)
class Side:
    """One side of a conflict: deleted, or bytes (None when not read: too large, not fetched)."""

    deleted: bool = False
    data: bytes | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a conflict.

    winner: "remote" keeps (applies) the remote side, "local" pushes the local bytes (again),
    "merged" writes/pushes `merged`. resolution: the conflict to record, None when there is
    none (both sides agree). save_aside: the losing side to keep a copy of. why: the reason a
    merge fell back to remote-wins.
    """

    winner: Winner
    resolution: Resolution | None
    save_aside: Literal["local", "remote"] | None = None
    merged: bytes | None = None
    why: str | None = None


AGREE = Decision("remote", None)


def _merge(local: Side, other: Side, base: bytes | None) -> tuple[bytes | None, str | None]:
    """A clean three-way merge of local and other over base, or (None, why not)."""
    if local.data is None or other.data is None:
        return None, "deleted or unread side"
    if base is None:
        return None, "no base"
    result = merge3(base, local.data, other.data)
    if not result.clean:
        return None, "merge conflicted"
    return result.merged, None


def same_change(local: Side, remote: Side) -> bool:
    """Both sides deleted the path, or hold the same bytes (by sha256)."""
    return (local.deleted and remote.deleted) or (
        local.sha256 is not None and local.sha256 == remote.sha256
    )


def decide_push(policy: ConflictPolicy, local: Side, head: Side, base: bytes | None) -> Decision:
    """Our push of `local` met the newer `head`; base: the last synced bytes (None: unknown).

    Same bytes on both sides is no conflict. merge pushes a clean merge (or keeps the head when
    the merge equals it), else acts as remote-wins; remote-wins keeps the head and saves the
    local bytes aside; local-wins saves the head aside and pushes the local bytes over it.
    """
    if (local.deleted and head.deleted) or (local.data is not None and local.data == head.data):
        return AGREE
    why = None
    if policy == "merge":
        merged, why = _merge(local, head, base)
        if merged is not None:
            if merged == head.data:
                return Decision("remote", "merged")
            return Decision("merged", "merged", merged=merged)
        policy = "remote-wins"
    if policy == "remote-wins":
        return Decision(
            "remote", "remote-kept", "local" if local.data is not None else None, why=why
        )
    return Decision("local", "local-kept", "remote" if head.data is not None else None)


def decide_remote(
    policy: ConflictPolicy, local: Side, remote: Side, base: bytes | None
) -> Decision:
    """A remote change arrived for a path edited locally since `base` was synced.

    The same change on both sides is no conflict, and so is a merge that equals the remote.
    merge writes a clean merge (then pushed), else acts as remote-wins; remote-wins applies the
    remote and saves the local bytes aside; local-wins saves the remote bytes aside (when they
    are known) and keeps (pushes) the local ones.
    """
    if same_change(local, remote):
        return AGREE
    why = None
    if policy == "merge":
        merged, why = _merge(local, remote, base)
        if merged is not None:
            if merged == remote.data:
                return AGREE  # the remote already holds the local edit
            return Decision("merged", "merged", merged=merged)
        policy = "remote-wins"
    if policy == "remote-wins":
        return Decision("remote", "remote-kept", None if local.deleted else "local", why=why)
    return Decision("local", "local-kept", "remote" if remote.data is not None else None)


def conflict_name(rel: str, when: float, session_id: str) -> str:
    """`dir/name.sync-conflict-YYYYMMDD-HHMMSS-session.ext` for rel (Syncthing's pattern)."""
    directory, _, name = rel.rpartition("/")
    stamp = datetime.fromtimestamp(when, UTC).strftime("%Y%m%d-%H%M%S")
    session = _SESSION_SAFE.sub("_", session_id)[:40] or "local"
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:  # no extension, or a dotfile such as .env
        stem, ext = name, ""
    out = f"{stem}.sync-conflict-{stamp}-{session}" + (f".{ext}" if ext else "")
    return f"{directory}/{out}" if directory else out


def save_aside(conflicts_dir: Path, rel: str, data: bytes, session_id: str, now: float) -> Path:
    """Write data as rel's conflict copy under conflicts_dir (a new name each time); its path."""
    name = conflict_name(rel, now, session_id)
    n = 1
    while (conflicts_dir / name).exists():  # several conflicts in one second
        n += 1
        name = conflict_name(rel, now, f"{session_id}-{n}")
    target = conflicts_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fsio.write_temp(target.parent, target.name, data, 0o644)
    tmp.replace(target)
    return target
