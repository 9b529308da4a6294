"""The streaming tar reader: formats, extension headers, strictness, and agreement with tarfile."""

from __future__ import annotations

import io
import tarfile
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar.snapshot.tarstream import MemberType, TarFormatError, TarMember, TarReader, iter_tar

from .archives import EOA, gnu_long, header, member, pad, pax


def parse(data: bytes, chunk: int = 65536) -> list[tuple[TarMember, bytes]]:
    return list(iter_tar(io.BytesIO(data), chunk))


class _Count:
    """Handler that only counts, for streams too large to keep."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.got = 0

    def begin(self, m: TarMember) -> None:
        self.sizes.append(m.size)

    def data(self, chunk: memoryview) -> None:
        self.got += len(chunk)

    def end(self) -> None:
        pass


def feed_all(reader: TarReader, raw: bytes) -> None:
    reader.feed(raw)
    reader.close()


class _WholeCollector:
    """Handler with the `whole` fast path, collecting (member, data)."""

    def __init__(self) -> None:
        self.items: list[tuple[TarMember, bytes]] = []
        self._buf: bytearray | None = None
        self._cur: TarMember | None = None

    def whole(self, m: TarMember, data: memoryview) -> None:
        self.items.append((m, bytes(data)))

    def begin(self, m: TarMember) -> None:
        self._cur, self._buf = m, bytearray()

    def data(self, chunk: memoryview) -> None:
        assert self._buf is not None
        self._buf += chunk

    def end(self) -> None:
        assert self._cur is not None
        assert self._buf is not None
        self.items.append((self._cur, bytes(self._buf)))


def parse_whole(data: bytes, chunk: int) -> list[tuple[TarMember, bytes]]:
    handler = _WholeCollector()
    reader = TarReader(handler)
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
    reader.close()
    return handler.items


def test_parses_basic_members_in_any_chunking() -> None:
    """Files, dirs and symlinks come out the same whatever the feed chunk size and handler."""
    raw = (
        member("a.txt", b"hello")
        + member("d/", typeflag=b"5")
        + member("l", typeflag=b"2", linkname="a.txt")
        + member("big", b"x" * 1500)
        + EOA
    )
    for chunk in (1, 3, 511, 512, 513, 1000, 1030, 4096):
        got = [(m.name, m.type, m.size, m.linkname, d) for m, d in parse(raw, chunk)]
        fast = [(m.name, m.type, m.size, m.linkname, d) for m, d in parse_whole(raw, chunk)]
        assert fast == got
        assert got == [
            ("a.txt", MemberType.FILE, 5, "", b"hello"),
            ("d", MemberType.DIR, 0, "", b""),
            ("l", MemberType.SYMLINK, 0, "a.txt", b""),
            ("big", MemberType.FILE, 1500, "", b"x" * 1500),
        ]


def test_classifies_every_member_type() -> None:
    """Hard links, devices, FIFOs, contiguous and unknown types are classified, not skipped."""
    raw = (
        b"".join(
            [
                member("h", typeflag=b"1", linkname="a"),
                member("c", typeflag=b"3", devmajor=1, devminor=3),
                member("b", typeflag=b"4"),
                member("p", typeflag=b"6"),
                member("k", b"ab", typeflag=b"7"),
                member("z", b"q", typeflag=b"Z"),
                member("old", b"1", typeflag=b"\x00"),
                member("olddir/", typeflag=b"\x00"),
            ]
        )
        + EOA
    )
    got = [(m.name, m.type) for m, _ in parse(raw)]
    assert got == [
        ("h", MemberType.HARDLINK),
        ("c", MemberType.CHARDEV),
        ("b", MemberType.BLOCKDEV),
        ("p", MemberType.FIFO),
        ("k", MemberType.CONTIGUOUS),
        ("z", MemberType.OTHER),
        ("old", MemberType.FILE),
        ("olddir", MemberType.DIR),
    ]
    assert parse(raw)[1][0].devminor == 3


def test_ustar_prefix_joins_the_name() -> None:
    """A ustar prefix field is joined to the name with a slash."""
    raw = member("file.txt", b"1", prefix=b"some/deep/dir") + EOA
    assert parse(raw)[0][0].name == "some/deep/dir/file.txt"


def test_gnu_long_name_and_link() -> None:
    """GNU 'L' and 'K' records set the next member's name and link target."""
    long_name = "d/" + "n" * 300
    raw = (
        gnu_long(long_name)
        + gnu_long("t" * 200, typeflag=b"K")
        + member("short", typeflag=b"2", linkname="x")
        + EOA
    )
    m, _ = parse(raw)[0]
    assert (m.name, m.linkname) == (long_name, "t" * 200)


def test_pax_overrides_path_linkpath_and_size() -> None:
    """pax path, linkpath and size records override the ustar fields."""
    # Declared ustar size 0 but pax says 3: the data (padded) follows.
    raw = (
        pax({"path": "ünï/" + "p" * 200, "size": "3", "uid": "123456789", "mtime": "5.5"})
        + header("ignored", size=0)
        + pad(b"abc")
        + EOA
    )
    m, data = parse(raw)[0]
    assert (m.name, m.size, data, m.uid, m.mtime) == ("ünï/" + "p" * 200, 3, b"abc", 123456789, 5)


def test_global_pax_header_is_ignored_unless_it_renames() -> None:
    """A global pax header with comments is accepted; one that sets a path is refused."""
    ok = pax({"comment": "hi"}, typeflag=b"g") + member("a", b"1") + EOA
    assert [m.name for m, _ in parse(ok)] == ["a"]
    bad = pax({"path": "evil"}, typeflag=b"g") + member("a", b"1") + EOA
    with pytest.raises(TarFormatError, match="global pax"):
        parse(bad)


def test_base256_size_without_keeping_data() -> None:
    """A GNU base-256 size over 8 GiB is parsed and its data streamed, not buffered."""
    size = 8 * 1024**3 + 1
    field = b"\x80" + size.to_bytes(11, "big")
    counter = _Count()
    reader = TarReader(counter)
    reader.feed(header("huge", size_field=field, magic=b"ustar  \x00"))
    zeros = memoryview(bytes(1 << 22))
    left = size + (-size % 512)
    while left:
        n = min(left, len(zeros))
        reader.feed(zeros[:n])
        left -= n
    reader.feed(EOA)
    reader.close()
    assert counter.sizes == [size]
    assert counter.got == size
    ti = tarfile.TarInfo.frombuf(
        header("huge", size_field=field, magic=b"ustar  \x00"), "utf-8", "surrogateescape"
    )
    assert ti.size == size


def test_pax_size_agrees_with_tarfile_for_huge_member() -> None:
    """A pax size of 9 GiB is read the same as tarfile reads it (headers only, no data)."""
    size = 9 * 1024**3
    raw = pax({"size": str(size)}) + header("big", size=0)
    counter = _Count()
    TarReader(counter).feed(raw)
    with tarfile.open(fileobj=io.BytesIO(raw + bytes(1024)), mode="r:") as tf:
        ti = tf.next()
    assert ti is not None
    assert counter.sizes == [ti.size] == [size]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (member("a", b"1"), "no end-of-archive"),
        (member("a", b"1") + bytes(512), "only one end-of-archive"),
        (member("a", b"12345")[:515], "bytes of a member's data missing"),
        (header("a", size=10), "bytes of a member's data missing"),
        (header("a")[:300], "no end-of-archive"),
        (pax({"path": "x"}), "no end-of-archive"),
    ],
)
def test_truncated_streams_are_errors(raw: bytes, match: str) -> None:
    """A stream that stops before the two zero blocks is truncated."""
    with pytest.raises(TarFormatError, match=match):
        parse(raw)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (header("a", bad_checksum=True) + EOA, "checksum"),
        (member("a", b"1") + bytes(512) + member("b", b"2") + EOA, "lone zero block"),
        (member("a", b"1") + EOA + b"junk", "after the end-of-archive"),
        (member("a", b"1", typeflag=b"S") + EOA, "GNU sparse"),
        (pax({"GNU.sparse.size": "10"}) + member("a", b"1") + EOA, "sparse"),
        (member("d/", b"xx", typeflag=b"5") + EOA, "declares 2 data bytes"),
        (member("l", b"xx", typeflag=b"2") + EOA, "declares 2 data bytes"),
        (header("a", size_field=b"12z4\x00       ") + EOA, "not a number"),
        (member("x", b"8 path=a\n", typeflag=b"x") + member("a") + EOA, "malformed pax"),
        (member("x", b"99 path=a\n", typeflag=b"x") + member("a") + EOA, "malformed pax"),
        (pax({"path": "a"}) + EOA, "not followed by a member"),
        (b"".join(pax({"comment": "c"}) for _ in range(9)) + member("a") + EOA, "too many"),
        (member("x", bytes(70_000), typeflag=b"x") + EOA, "too large"),
    ],
)
def test_malformed_archives_are_errors(raw: bytes, match: str) -> None:
    """Bad checksums, stray data, sparse files and bad extension records are refused."""
    reader = TarReader(_Count(), max_ext_bytes=65536)
    with pytest.raises(TarFormatError, match=match):
        feed_all(reader, raw)


def test_trailing_zero_padding_is_accepted_but_bounded() -> None:
    """Record padding after the end marker is fine; megabytes of it are not."""
    parse(member("a", b"1") + EOA + bytes(9216))
    with pytest.raises(TarFormatError, match="padding"):
        parse(member("a", b"1") + EOA + bytes(2 * 1024 * 1024))


def test_member_longer_than_declared_is_detected() -> None:
    """Extra bytes after a member's declared data are read as a header and fail its checksum."""
    raw = header("a", size=5) + pad(b"hello" + b"EXTRA" * 200) + EOA
    with pytest.raises(TarFormatError, match="checksum"):
        parse(raw)


# -- agreement with tarfile --

_NAME_PART = st.text(alphabet="abcXYZ019._-é中 ", min_size=1, max_size=40).filter(
    lambda s: s not in {".", ".."}
)
_NAMES = st.lists(_NAME_PART, min_size=1, max_size=8).map("/".join)
_TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.REGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
    ]
)


@st.composite
def _archives(draw: st.DrawFn) -> tuple[int, list[tuple[tarfile.TarInfo, bytes]]]:
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    items = []
    for _ in range(draw(st.integers(0, 6))):
        ti = tarfile.TarInfo(draw(_NAMES))
        ti.type = draw(_TYPES)
        ti.mode = draw(st.integers(0, 0o7777))
        ti.uid = draw(st.integers(0, 2**21 - 1 if fmt == tarfile.USTAR_FORMAT else 2**40))
        ti.gid = draw(st.integers(0, 2**21 - 1))
        ti.mtime = draw(st.integers(0, 2**33 - 1 if fmt == tarfile.USTAR_FORMAT else 2**40))
        ti.uname = draw(st.text(alphabet="abcz_", max_size=10))
        ti.gname = draw(st.text(alphabet="abcz_", max_size=10))
        data = b""
        if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            ti.linkname = draw(_NAMES)
        elif ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            ti.devmajor, ti.devminor = draw(st.integers(0, 255)), draw(st.integers(0, 255))
        elif ti.type == tarfile.REGTYPE:
            size = draw(st.sampled_from([0, 1, 511, 512, 513, 1024, 5000, 70_000]))
            data = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
            data = (data * (size // max(1, len(data)) + 1))[:size] if data else bytes(size)
        ti.size = len(data)
        items.append((ti, data))
    return fmt, items


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_archives(), st.integers(1, 3000))
def test_agrees_with_tarfile(
    archive: tuple[int, list[tuple[tarfile.TarInfo, bytes]]], chunk: int
) -> None:
    """Every archive tarfile writes (ustar, GNU, pax) reads the same with our reader."""
    fmt, items = archive
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for ti, data in items:
                tf.addfile(ti, io.BytesIO(data) if data else None)
    except ValueError:
        event("unwritable by tarfile")
        return  # the format cannot carry this member (e.g. a long name in plain ustar)
    raw = buf.getvalue()
    event(f"members: {min(len(items), 3)}+")
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        theirs = []
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            theirs.append(
                (
                    ti.name,
                    ti.type,
                    ti.size,
                    ti.mode,
                    ti.linkname,
                    ti.uid,
                    ti.gid,
                    int(ti.mtime),
                    ti.uname,
                    ti.gname,
                    (ti.devmajor, ti.devminor) if ti.ischr() or ti.isblk() else None,
                    f.read() if f else b"",
                )
            )
    assert [(m.name, d) for m, d in parse_whole(raw, chunk)] == [
        (m.name, d) for m, d in parse(raw, chunk)
    ]
    ours = []
    for m, data in parse(raw, chunk):
        ours.append(
            (
                m.name,
                _TYPEFLAG[m.type],
                m.size,
                m.mode,
                m.linkname,
                m.uid,
                m.gid,
                m.mtime,
                m.uname,
                m.gname,
                (m.devmajor, m.devminor) if m.type in _DEVS else None,
                data,
            )
        )
    assert ours == theirs


_TYPEFLAG = {
    MemberType.FILE: tarfile.REGTYPE,
    MemberType.DIR: tarfile.DIRTYPE,
    MemberType.SYMLINK: tarfile.SYMTYPE,
    MemberType.HARDLINK: tarfile.LNKTYPE,
    MemberType.FIFO: tarfile.FIFOTYPE,
    MemberType.CHARDEV: tarfile.CHRTYPE,
    MemberType.BLOCKDEV: tarfile.BLKTYPE,
    MemberType.CONTIGUOUS: tarfile.CONTTYPE,
}
_DEVS = (MemberType.CHARDEV, MemberType.BLOCKDEV)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**40),
)
def test_huge_sizes_agree_with_tarfile(fmt: Literal[0, 1, 2], size: int, mtime: int) -> None:
    """Header-only archives with sizes up to 2**63 parse like tarfile (no data in memory)."""
    ti = tarfile.TarInfo("f" * 120)
    ti.size, ti.mtime = size, mtime
    try:
        headers = ti.tobuf(fmt, "utf-8", "surrogateescape")
    except ValueError:
        event("not representable in this format")
        return
    with tarfile.open(fileobj=io.BytesIO(headers + bytes(1024)), mode="r:") as tf:
        theirs = tf.next()
    assert theirs is not None
    counter = _Names()
    TarReader(counter).feed(headers)
    assert counter.seen == [(theirs.name, theirs.size, int(theirs.mtime))]


class _Names:
    """Handler recording (name, size, mtime) at member start."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def begin(self, m: TarMember) -> None:
        self.seen.append((m.name, m.size, m.mtime))

    def data(self, chunk: memoryview) -> None:
        pass

    def end(self) -> None:
        pass
