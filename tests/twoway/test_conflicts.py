"""The conflict policy as pure functions (sidecar/twoway/conflicts.py), checked from a table:
every policy against every shape of conflict, for a push that met a newer head and for a remote
update that met a local edit."""

from __future__ import annotations

import hashlib

import pytest

from sidecar.config import ConflictPolicy
from sidecar.twoway.conflicts import Decision, Side, decide_push, decide_remote

BASE = b"one\ntwo\nthree\n"
LOCAL = b"ONE\ntwo\nthree\n"  # edits line 1
REMOTE = b"one\ntwo\nTHREE\n"  # edits line 3: merges cleanly with LOCAL
MERGED = b"ONE\ntwo\nTHREE\n"
CLASH = b"uno\ntwo\nthree\n"  # edits line 1 too: conflicts with LOCAL
BINARY = b"\x00\x01\x02binary"


def text(data: bytes) -> Side:
    return Side(data=data, sha256=hashlib.sha256(data).hexdigest())


GONE = Side(deleted=True)

# (case, local, other side, base) -> per policy: (winner, resolution, save_aside, merged)
Row = tuple[
    str, Side, Side, bytes | None, dict[str, tuple[str, str | None, str | None, bytes | None]]
]

KEEP_REMOTE = ("remote", "remote-kept", "local", None)
KEEP_LOCAL = ("local", "local-kept", "remote", None)
AGREE = ("remote", None, None, None)

TABLE: list[Row] = [
    (
        "no base",
        text(LOCAL),
        text(REMOTE),
        None,
        {"remote-wins": KEEP_REMOTE, "local-wins": KEEP_LOCAL, "merge": KEEP_REMOTE},
    ),
    (
        "base equals the other side",
        text(LOCAL),
        text(BASE),
        BASE,
        {
            "remote-wins": KEEP_REMOTE,
            "local-wins": KEEP_LOCAL,
            "merge": ("merged", "merged", None, LOCAL),
        },
    ),
    (
        "both changed, merge clean",
        text(LOCAL),
        text(REMOTE),
        BASE,
        {
            "remote-wins": KEEP_REMOTE,
            "local-wins": KEEP_LOCAL,
            "merge": ("merged", "merged", None, MERGED),
        },
    ),
    (
        "both changed, merge conflicting",
        text(LOCAL),
        text(CLASH),
        BASE,
        {"remote-wins": KEEP_REMOTE, "local-wins": KEEP_LOCAL, "merge": KEEP_REMOTE},
    ),
    (
        "binary",
        text(BINARY),
        text(REMOTE),
        BASE,
        {"remote-wins": KEEP_REMOTE, "local-wins": KEEP_LOCAL, "merge": KEEP_REMOTE},
    ),
    (
        "same bytes on both sides",
        text(LOCAL),
        text(LOCAL),
        BASE,
        {"remote-wins": AGREE, "local-wins": AGREE, "merge": AGREE},
    ),
    (
        "deleted on both sides",
        GONE,
        GONE,
        BASE,
        {"remote-wins": AGREE, "local-wins": AGREE, "merge": AGREE},
    ),
    (
        "deleted locally",
        GONE,
        text(REMOTE),
        BASE,
        {
            "remote-wins": ("remote", "remote-kept", None, None),  # nothing local to save
            "local-wins": KEEP_LOCAL,
            "merge": ("remote", "remote-kept", None, None),
        },
    ),
    (
        "deleted on the other side",
        text(LOCAL),
        GONE,
        BASE,
        {
            "remote-wins": KEEP_REMOTE,
            "local-wins": ("local", "local-kept", None, None),  # nothing remote to save
            "merge": KEEP_REMOTE,
        },
    ),
]

POLICIES: list[ConflictPolicy] = ["remote-wins", "local-wins", "merge"]
CASES = [
    pytest.param(policy, local, other, base, want[policy], id=f"{policy}-{case}")
    for case, local, other, base, want in TABLE
    for policy in POLICIES
]


def _shape(d: Decision) -> tuple[str, str | None, str | None, bytes | None]:
    return (d.winner, d.resolution, d.save_aside, d.merged)


@pytest.mark.parametrize(("policy", "local", "other", "base", "want"), CASES)
def test_decide_push(
    policy: ConflictPolicy,
    local: Side,
    other: Side,
    base: bytes | None,
    want: tuple[str, str | None, str | None, bytes | None],
) -> None:
    assert _shape(decide_push(policy, local, other, base)) == want


@pytest.mark.parametrize(("policy", "local", "other", "base", "want"), CASES)
def test_decide_remote(
    policy: ConflictPolicy,
    local: Side,
    other: Side,
    base: bytes | None,
    want: tuple[str, str | None, str | None, bytes | None],
) -> None:
    assert _shape(decide_remote(policy, local, other, base)) == want


@pytest.mark.parametrize("policy", POLICIES)
def test_local_equal_to_base_takes_the_other_side(policy: ConflictPolicy) -> None:
    """A 'local edit' that is the base itself: merge yields the other side. On push that is a
    recorded merge that keeps the head; for a remote update it is no conflict at all."""
    pushed = decide_push(policy, text(BASE), text(REMOTE), BASE)
    remote = decide_remote(policy, text(BASE), text(REMOTE), BASE)
    if policy == "merge":
        assert _shape(pushed) == ("remote", "merged", None, None)
        assert _shape(remote) == AGREE
    else:
        assert _shape(pushed) == _shape(remote)
        assert pushed.resolution == ("remote-kept" if policy == "remote-wins" else "local-kept")


def test_remote_bytes_not_fetched_are_not_saved() -> None:
    """local-wins against a remote update whose bytes are unknown saves nothing aside."""
    unread = Side(sha256=hashlib.sha256(REMOTE).hexdigest())
    assert _shape(decide_remote("local-wins", text(LOCAL), unread, BASE)) == (
        "local",
        "local-kept",
        None,
        None,
    )


def test_merge_fallback_says_why() -> None:
    assert decide_remote("merge", text(LOCAL), text(REMOTE), None).why == "no base"
    assert decide_push("merge", text(LOCAL), text(CLASH), BASE).why == "merge conflicted"
