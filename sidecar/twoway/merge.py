"""Three-way merge of text files (base, local, remote), line based, diff3 style.

`merge3` never hides a conflict: when both sides changed the same region differently the result
is reported as not clean (its bytes carry git-style markers, for inspection only; callers must
not write them into the project). Binary or non-UTF-8 inputs are not mergeable unless only one
side changed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

__all__ = ["MergeResult", "is_text", "merge3", "unified_diff"]

_SNIFF = 8192


class MergeResult(NamedTuple):
    """The merged bytes and whether the merge was clean (no overlapping changes)."""

    merged: bytes
    clean: bool


def is_text(data: bytes) -> bool:
    """True when data decodes as UTF-8 and holds no NUL byte in its first 8 KiB."""
    if b"\x00" in data[:_SNIFF]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def merge3(
    base: bytes,
    local: bytes,
    remote: bytes,
    *,
    local_label: str = "local",
    remote_label: str = "remote",
) -> MergeResult:
    """Merge the changes base->local and base->remote.

    Trivial cases (one side unchanged, both sides equal) are clean for any bytes. Otherwise all
    three must be text; a binary side gives `MergeResult(remote, clean=False)`. Overlapping or
    adjacent edits that differ give `clean=False` and bytes with conflict markers.
    """
    if local in (remote, base):
        return MergeResult(remote, True)
    if remote == base:
        return MergeResult(local, True)
    if not (is_text(base) and is_text(local) and is_text(remote)):
        return MergeResult(remote, False)
    b = base.decode().splitlines(keepends=True)
    a = local.decode().splitlines(keepends=True)
    r = remote.decode().splitlines(keepends=True)
    out: list[str] = []
    clean = True
    for kind, lo, hi, rlo, rhi in _regions(b, a, r):
        if kind == "unchanged":
            out.extend(b[lo:hi])
        elif kind in {"local", "same"}:
            out.extend(a[lo:hi])
        elif kind == "remote":
            out.extend(r[lo:hi])
        else:
            clean = False
            local_part, remote_part = a[lo:hi], r[rlo:rhi]
            out.append(f"<<<<<<< {local_label}\n")
            out.extend(_terminated(local_part))
            out.append("=======\n")
            out.extend(_terminated(remote_part))
            out.append(f">>>>>>> {remote_label}\n")
    return MergeResult("".join(out).encode(), clean)


def unified_diff(
    old: bytes | None, new: bytes | None, path: str, *, context: int = 3, max_bytes: int = 1 << 20
) -> str | None:
    """A unified diff (a/path -> b/path) between two text versions; None for binary input.

    None (missing) on either side means the file does not exist there (/dev/null). Returns
    None as well when the diff text would exceed max_bytes.
    """
    sides: list[list[str]] = []
    for data in (old, new):
        if data is None:
            sides.append([])
        elif not is_text(data):
            return None
        else:
            sides.append(data.decode().splitlines(keepends=True))
    lines: list[str] = []
    size = 0
    gen = difflib.unified_diff(
        sides[0],
        sides[1],
        fromfile="/dev/null" if old is None else f"a/{path}",
        tofile="/dev/null" if new is None else f"b/{path}",
        n=context,
    )
    for line in gen:
        if not line.endswith("\n"):
            line += "\n\\ No newline at end of file\n"
        size += len(line)
        if size > max_bytes:
            return None
        lines.append(line)
    return "".join(lines)


def _terminated(lines: Sequence[str]) -> list[str]:
    out = list(lines)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    return out


def _regions(
    base: Sequence[str], local: Sequence[str], remote: Sequence[str]
) -> Iterator[tuple[str, int, int, int, int]]:
    """Yield (kind, lo, hi, rlo, rhi) spans of the merge, diff3 style.

    kind "unchanged" spans base[lo:hi]; "local"/"same" span local[lo:hi]; "remote" spans
    remote[lo:hi]; "conflict" spans local[lo:hi] and remote[rlo:rhi].
    """
    ib = il = ir = 0
    for zb, ze, zl, zr in _sync_regions(base, local, remote):
        if il < zl or ir < zr or ib < zb:
            base_span = list(base[ib:zb])
            local_span, remote_span = list(local[il:zl]), list(remote[ir:zr])
            if local_span == remote_span:
                if local_span:
                    yield "same", il, zl, 0, 0
            elif local_span == base_span:
                if remote_span:
                    yield "remote", ir, zr, 0, 0
            elif remote_span == base_span:
                if local_span:
                    yield "local", il, zl, 0, 0
            else:
                yield "conflict", il, zl, ir, zr
        length = ze - zb
        if length:
            yield "unchanged", zb, ze, 0, 0
        ib, il, ir = ze, zl + length, zr + length


def _sync_regions(
    base: Sequence[str], local: Sequence[str], remote: Sequence[str]
) -> list[tuple[int, int, int, int]]:
    """Base ranges that both sides kept unchanged: (base_lo, base_hi, local_lo, remote_lo)."""
    lm = difflib.SequenceMatcher(None, base, local, autojunk=False).get_matching_blocks()
    rm = difflib.SequenceMatcher(None, base, remote, autojunk=False).get_matching_blocks()
    out: list[tuple[int, int, int, int]] = []
    i = j = 0
    while i < len(lm) and j < len(rm):
        lb, ll, ln = lm[i]
        rb, rr, rn = rm[j]
        lo, hi = max(lb, rb), min(lb + ln, rb + rn)
        if lo < hi:
            out.append((lo, hi, ll + (lo - lb), rr + (lo - rb)))
        if lb + ln < rb + rn:
            i += 1
        else:
            j += 1
    out.append((len(base), len(base), len(local), len(remote)))
    return out
