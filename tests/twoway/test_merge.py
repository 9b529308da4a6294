"""Three-way merge and unified diffs for two-way sync."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.twoway.merge import is_text, merge3, unified_diff

BASE = b"one\ntwo\nthree\nfour\nfive\nsix\n"


def test_trivial_cases_are_clean_for_any_bytes() -> None:
    """One side unchanged or both equal: clean, even for binary content."""
    blob = b"\x00\x01\x02"
    assert merge3(blob, blob, b"\xff") == (b"\xff", True)
    assert merge3(blob, b"\xfe", blob) == (b"\xfe", True)
    assert merge3(blob, b"\xfe", b"\xfe") == (b"\xfe", True)


def test_disjoint_edits_merge_cleanly() -> None:
    """Edits to different regions are both kept."""
    local = BASE.replace(b"one", b"ONE")
    remote = BASE.replace(b"six", b"SIX")
    merged, clean = merge3(BASE, local, remote)
    assert clean
    assert merged == b"ONE\ntwo\nthree\nfour\nfive\nSIX\n"


def test_insertions_and_deletions_merge() -> None:
    """A local insertion and a remote deletion in separate places combine."""
    local = BASE.replace(b"two\n", b"two\ntwo-and-a-half\n")
    remote = BASE.replace(b"five\n", b"")
    merged, clean = merge3(BASE, local, remote)
    assert clean
    assert merged == b"one\ntwo\ntwo-and-a-half\nthree\nfour\nsix\n"


def test_same_change_on_both_sides_is_clean() -> None:
    """Both sides making the same edit (plus one more each elsewhere) is not a conflict."""
    local = BASE.replace(b"three", b"3").replace(b"one", b"1")
    remote = BASE.replace(b"three", b"3").replace(b"six", b"6")
    merged, clean = merge3(BASE, local, remote)
    assert clean
    assert merged == b"1\ntwo\n3\nfour\nfive\n6\n"


def test_overlapping_edits_are_reported_not_clean() -> None:
    """Different edits of the same line: not clean, and the bytes carry markers."""
    local = BASE.replace(b"three", b"THREE-local")
    remote = BASE.replace(b"three", b"three-remote")
    merged, clean = merge3(BASE, local, remote)
    assert not clean
    assert b"<<<<<<< local\nTHREE-local\n=======\nthree-remote\n>>>>>>> remote\n" in merged


def test_binary_sides_are_not_mergeable() -> None:
    """Both sides changed and one is not UTF-8 text: not clean, remote bytes returned."""
    local = BASE + b"\x00bin"
    remote = BASE + b"more\n"
    assert merge3(BASE, local, remote) == (remote, False)
    assert not is_text(b"\xff\xfe")
    assert is_text("héllo\n".encode())


def test_missing_final_newline_is_preserved() -> None:
    """Files without a trailing newline merge without inventing one."""
    base = b"a\nb\nc"
    merged, clean = merge3(base, b"A\nb\nc", b"a\nb\nC")
    assert clean
    assert merged == b"A\nb\nC"


def test_unified_diff_names_paths_and_marks_eof() -> None:
    """The diff has a/ b/ headers, hunks, and git's no-newline marker."""
    diff = unified_diff(b"x\ny\n", b"x\nz", "src/app.ts")
    assert diff is not None
    assert diff.startswith("--- a/src/app.ts\n+++ b/src/app.ts\n")
    assert "-y\n" in diff
    assert "+z\n\\ No newline at end of file\n" in diff
    assert (
        unified_diff(None, b"new\n", "n.txt") == "--- /dev/null\n+++ b/n.txt\n@@ -0,0 +1 @@\n+new\n"
    )
    assert unified_diff(b"\x00", b"x", "b.bin") is None
    assert unified_diff(b"a\n" * 10, b"b\n" * 10, "big", max_bytes=20) is None


_lines = st.lists(st.sampled_from(["a\n", "b\n", "c\n", "d\n", "e\n"]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(base=_lines, local=_lines, remote=_lines)
def test_merge_properties(base: list[str], local: list[str], remote: list[str]) -> None:
    """One-sided changes pass through exactly; clean merges are symmetric and marker-free."""
    b, lo, r = ("".join(x).encode() for x in (base, local, remote))
    merged, clean = merge3(b, lo, r)
    if lo == b:
        assert (merged, clean) == (r, True)
    if r == b:
        assert (merged, clean) == (lo, True)
    if lo == r:
        assert (merged, clean) == (lo, True)
    if clean:
        assert b"<<<<<<<" not in merged
    # Which side is "local" does not matter for a clean merge.
    swapped, swapped_clean = merge3(b, r, lo)
    assert swapped_clean == clean
    if clean:
        assert swapped == merged


def test_symmetric_disjoint_edits() -> None:
    """Merging is symmetric for disjoint edits (swapping sides gives the same bytes)."""
    local = BASE.replace(b"two", b"2")
    remote = BASE.replace(b"five", b"5")
    assert merge3(BASE, local, remote) == merge3(BASE, remote, local)
