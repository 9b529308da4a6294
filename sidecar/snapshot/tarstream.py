"""A push-style streaming tar reader: ustar, GNU and pax headers, constant memory, strict checks.

Bytes go in with `TarReader.feed` in chunks of any size; members come out through a `TarHandler`
(`begin` / `data` / `end`), data as memoryview slices of the fed chunks, never copied or buffered.
`close()` raises `TarFormatError` unless the archive ended with its two zero blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from enum import Enum
from typing import BinaryIO, Protocol
from zlib import adler32 as _adler32

from sidecar.errors import TarFormatError

__all__ = [
    "BLOCK",
    "MemberType",
    "TarFormatError",
    "TarHandler",
    "TarMember",
    "TarReader",
    "iter_tar",
]

BLOCK = 512
MAX_EXT_BYTES = 1024 * 1024  # one pax / GNU long-name member's data
MAX_EXT_CHAIN = 8  # extension headers in a row before a real member
MAX_TRAILER_BYTES = 1024 * 1024  # zero padding tolerated after the end-of-archive marker

_EXT_TYPES = frozenset({b"x", b"g", b"L", b"K"})
_ZERO_BLOCK = bytes(BLOCK)
# int(field.rstrip(_NUL_SPACE), 8) is _num's value whenever it parses: the rest of the field
# after its first NUL can then only be NULs and spaces, which _num drops and int() ignores.
_NUL_SPACE = b"\x00 "


class MemberType(Enum):
    """What a member is, as far as extraction cares."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHARDEV = "chardev"
    BLOCKDEV = "blockdev"
    FIFO = "fifo"
    CONTIGUOUS = "contiguous"
    OTHER = "other"


_TYPES: dict[bytes, MemberType] = {
    b"0": MemberType.FILE,
    b"\x00": MemberType.FILE,
    b"1": MemberType.HARDLINK,
    b"2": MemberType.SYMLINK,
    b"3": MemberType.CHARDEV,
    b"4": MemberType.BLOCKDEV,
    b"5": MemberType.DIR,
    b"6": MemberType.FIFO,
    b"7": MemberType.CONTIGUOUS,
}
# Types whose size field must be zero: they never carry data in the archives we accept.
_NO_DATA = frozenset(
    {
        MemberType.DIR,
        MemberType.SYMLINK,
        MemberType.HARDLINK,
        MemberType.CHARDEV,
        MemberType.BLOCKDEV,
        MemberType.FIFO,
    }
)
_UNSUPPORTED = {b"S": "GNU sparse", b"M": "GNU multi-volume", b"V": "volume label"}
_FILE, _DIR, _OTHER = MemberType.FILE, MemberType.DIR, MemberType.OTHER


class TarMember:
    """One archive member after extension headers (pax, GNU long names) were applied.

    `name`, `type`, `size` and `linkname` are parsed up front; the other header fields are
    parsed on first access (pax values win), which keeps the per-member cost low.
    """

    __slots__ = ("header", "linkname", "name", "pax", "size", "type", "typeflag")

    def __init__(
        self,
        name: str,
        type: MemberType,
        typeflag: bytes,
        size: int,
        linkname: str = "",
        header: bytes = bytes(BLOCK),
        pax: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.typeflag = typeflag
        self.size = size
        self.linkname = linkname
        self.header = header
        self.pax: dict[str, str] = pax if pax is not None else {}

    def __repr__(self) -> str:
        return (
            f"TarMember(name={self.name!r}, type={self.type.value}, size={self.size}, "
            f"linkname={self.linkname!r})"
        )

    @property
    def mode(self) -> int:
        """Permission bits from the header."""
        return _num(self.header[100:108], "mode")

    @property
    def uid(self) -> int:
        """Owner id (pax wins)."""
        return self._pax_int("uid", 108, 116)

    @property
    def gid(self) -> int:
        """Group id (pax wins)."""
        return self._pax_int("gid", 116, 124)

    @property
    def mtime(self) -> int:
        """Modification time in whole seconds (pax wins)."""
        if "mtime" in self.pax:
            try:
                return int(float(self.pax["mtime"]))
            except ValueError:
                raise TarFormatError("pax mtime is not a number") from None
        return _num(self.header[136:148], "mtime")

    @property
    def uname(self) -> str:
        """Owner name (pax wins)."""
        return self.pax.get("uname") or _decode(_nts(self.header[265:297]))

    @property
    def gname(self) -> str:
        """Group name (pax wins)."""
        return self.pax.get("gname") or _decode(_nts(self.header[297:329]))

    @property
    def devmajor(self) -> int:
        """Device major number (devices only)."""
        return _num(self.header[329:337], "devmajor")

    @property
    def devminor(self) -> int:
        """Device minor number (devices only)."""
        return _num(self.header[337:345], "devminor")

    def _pax_int(self, key: str, a: int, b: int) -> int:
        if key in self.pax:
            value = self.pax[key]
            if not value.isdigit():
                raise TarFormatError(f"pax {key} is not a number: {value[:40]!r}")
            return int(value)
        return _num(self.header[a:b], key)


class TarHandler(Protocol):
    """Receives members from a TarReader; data arrives in one or more slices between begin/end.

    A handler may also define `whole(member, data)`: then a member whose data is entirely in
    the chunk being parsed arrives in that one call instead of begin/data/end.
    """

    def begin(self, member: TarMember) -> None: ...

    def data(self, chunk: memoryview) -> None: ...

    def end(self) -> None: ...


# Reader states.
_HEADER_STATE, _DATA, _EXT_DATA, _PAD, _EOF1, _DONE = range(6)


class TarReader:
    """Push parser: `feed()` bytes, get handler callbacks; `close()` checks the archive ended.

    Raises TarFormatError for a bad checksum, a malformed header or extension record, an
    unsupported member type (GNU sparse, multi-volume), a size on a member that cannot have data,
    data after the end-of-archive marker, or a stream that ends early.
    """

    def __init__(self, handler: TarHandler, *, max_ext_bytes: int = MAX_EXT_BYTES) -> None:
        self._h = handler
        self._whole: Callable[[TarMember, memoryview], None] | None = getattr(
            handler, "whole", None
        )
        self._max_ext = max_ext_bytes
        self._state = _HEADER_STATE
        self._partial = bytearray()  # a header block split across feeds
        self._remaining = 0  # data bytes left in the current member
        self._pad = 0  # padding bytes left after the current member's data
        self._ext_kind = b""  # typeflag of the extension member being collected
        self._ext_buf = bytearray()
        self._pending_pax: dict[str, str] = {}
        self._pending_long_name: str | None = None
        self._pending_long_link: str | None = None
        self._ext_chain = 0
        self._trailer = 0
        self.offset = 0  # bytes consumed so far
        self._hdr_off = 0  # where the header being parsed starts
        self.members = 0  # real members seen

    @property
    def done(self) -> bool:
        """True once the end-of-archive marker (two zero blocks) was read."""
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse more bytes; handler callbacks run synchronously inside this call."""
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        pos = 0
        base = self.offset
        self.offset += n
        h = self._h
        whole = self._whole
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(n - pos, self._remaining)
                h.data(mv[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    h.end()
                    self._state = _PAD if self._pad else _HEADER_STATE
            elif state in (_HEADER_STATE, _EOF1):
                if self._partial or n - pos < BLOCK:
                    take = min(BLOCK - len(self._partial), n - pos)
                    self._partial += mv[pos : pos + take]
                    pos += take
                    if len(self._partial) < BLOCK:
                        break
                    block = bytes(self._partial)
                    self._partial.clear()
                else:
                    block = mv[pos : pos + BLOCK].tobytes()
                    pos += BLOCK
                self._hdr_off = base + pos - BLOCK
                m = self._on_block(block)
                if m is None:
                    continue
                size = m.size
                if whole is not None and 0 < size <= n - pos:
                    # Fast path: the member's data is all in this chunk.
                    whole(m, mv[pos : pos + size])
                    pos += size
                    pad = self._pad
                    if pad <= n - pos:
                        pos += pad
                        self._pad = 0
                    else:
                        self._state = _PAD
                    continue
                h.begin(m)
                if size:
                    self._remaining = size
                    self._state = _DATA
                else:
                    h.end()
            elif state == _PAD:
                take = min(n - pos, self._pad)
                pos += take
                self._pad -= take
                if self._pad == 0:
                    self._state = _HEADER_STATE
            elif state == _EXT_DATA:
                take = min(n - pos, self._remaining)
                self._ext_buf += mv[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._finish_ext()
                    self._state = _PAD if self._pad else _HEADER_STATE
            else:  # _DONE: only zero padding may follow
                rest = mv[pos:]
                if rest.tobytes() != bytes(len(rest)):
                    raise TarFormatError(
                        f"data after the end-of-archive marker at offset {base + pos}"
                    )
                self._trailer += len(rest)
                if self._trailer > MAX_TRAILER_BYTES:
                    raise TarFormatError("more than 1 MiB of padding after the end of the archive")
                pos = n

    def close(self) -> None:
        """Raise TarFormatError unless the end-of-archive marker was read."""
        if self._state == _DONE:
            return
        if self._state == _DATA or self._state == _EXT_DATA:
            raise TarFormatError(
                f"archive truncated: {self._remaining} bytes of a member's data missing"
            )
        if self._state == _EOF1:
            raise TarFormatError("archive truncated: only one end-of-archive zero block")
        raise TarFormatError("archive truncated: no end-of-archive marker")

    # -- headers --

    def _on_block(self, block: bytes) -> TarMember | None:
        """Parse one header block; return the member it starts, or None (extension/zeros)."""
        if block == _ZERO_BLOCK:
            if self._pending_pax or self._pending_long_name is not None or self._ext_chain:
                raise TarFormatError("extension header not followed by a member")
            self._state = _DONE if self._state == _EOF1 else _EOF1
            return None
        if self._state == _EOF1:
            raise TarFormatError(f"lone zero block before offset {self._hdr_off}")
        try:  # the usual octal field in one C call; anything else (base-256, blank) in _num
            chksum = int(block[148:156].rstrip(_NUL_SPACE), 8)
        except ValueError:
            chksum = _num(block[148:156], "checksum")
        # The unsigned sum of the header with the checksum field read as spaces. adler32's low
        # half is 1 + the byte sum mod 65521, exact for 256 bytes (at most 65280): two C calls
        # instead of iterating 512 bytes in Python's sum().
        unsigned = (
            (_adler32(block[:256]) & 0xFFFF)
            + (_adler32(block[256:]) & 0xFFFF)
            + 254  # 256 for the eight spaces, -2 for the two adler32 start values
            - sum(block[148:156])
        )
        if chksum != unsigned and chksum != _signed_sum(block):
            raise TarFormatError(f"bad header checksum at offset {self._hdr_off}")
        try:
            size = int(block[124:136].rstrip(_NUL_SPACE), 8)
        except ValueError:
            size = _num(block[124:136], "size")
        if size < 0:
            raise TarFormatError(f"negative size at offset {self._hdr_off}")
        typeflag = block[156:157]

        if typeflag in _EXT_TYPES:
            if size > self._max_ext:
                raise TarFormatError(f"extension header of {size} bytes is too large")
            self._ext_chain += 1
            if self._ext_chain > MAX_EXT_CHAIN:
                raise TarFormatError("too many extension headers in a row")
            self._ext_kind = typeflag
            self._ext_buf.clear()
            self._remaining = size
            self._pad = -size % BLOCK
            if size:
                self._state = _EXT_DATA
            else:
                self._finish_ext()
                self._state = _PAD if self._pad else _HEADER_STATE
            return None
        if typeflag in _UNSUPPORTED:
            raise TarFormatError(f"unsupported member type: {_UNSUPPORTED[typeflag]}")

        end = block.find(0, 0, 100)
        name = block[: 100 if end < 0 else end].decode("utf-8", "surrogateescape")
        if block[345] and block[257:265] == b"ustar\x0000":
            name = _decode(_nts(block[345:500])) + "/" + name
        mtype = _TYPES.get(typeflag, _OTHER)
        if mtype is _FILE and typeflag == b"\x00" and name.endswith("/"):
            mtype = _DIR  # old-style directory
        linkname = _decode(_nts(block[157:257])) if block[157] else ""
        member = TarMember(name, mtype, typeflag, size, linkname, block)
        if self._ext_chain:
            self._apply_ext(member)
        mtype = member.type
        if mtype is _DIR:
            member.name = member.name.rstrip("/") or member.name
        if member.size and mtype is not _FILE and mtype in _NO_DATA:
            raise TarFormatError(
                f"{member.name!r}: a {mtype.value} member declares {member.size} data bytes"
            )
        self._pad = -member.size % BLOCK
        self.members += 1
        return member

    def _finish_ext(self) -> None:
        raw = bytes(self._ext_buf)
        self._ext_buf.clear()
        if self._ext_kind == b"L":
            self._pending_long_name = _decode(_nts(raw))
        elif self._ext_kind == b"K":
            self._pending_long_link = _decode(_nts(raw))
        elif self._ext_kind == b"x":
            self._pending_pax.update(_parse_pax(raw))
        else:  # b"g": global headers may not change names or sizes of later members
            for key in _parse_pax(raw):
                if key in {"path", "linkpath", "size"}:
                    raise TarFormatError(f"global pax header sets {key!r}; not supported")

    def _apply_ext(self, member: TarMember) -> None:
        if self._pending_long_name is not None:
            member.name = self._pending_long_name
        if self._pending_long_link is not None:
            member.linkname = self._pending_long_link
        pax = self._pending_pax
        if pax:
            if any(k.startswith("GNU.sparse.") for k in pax):
                raise TarFormatError("unsupported member type: pax GNU sparse")
            if "path" in pax:
                member.name = pax["path"]
            if "linkpath" in pax:
                member.linkname = pax["linkpath"]
            if "size" in pax:
                value = pax["size"]
                if not value.isdigit():
                    raise TarFormatError(f"pax size is not a number: {value[:40]!r}")
                member.size = int(value)
            member.pax = pax
        self._pending_pax = {}
        self._pending_long_name = None
        self._pending_long_link = None
        self._ext_chain = 0


def _nts(b: bytes) -> bytes:
    p = b.find(b"\x00")
    return b if p == -1 else b[:p]


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _num(b: bytes, what: str) -> int:
    """A numeric header field: octal (NUL/space padded) or GNU base-256."""
    first = b[0]
    if first == 0x80 or first == 0xFF:
        n = int.from_bytes(b[1:], "big")
        if first == 0xFF:
            n -= 1 << (8 * (len(b) - 1))
        return n
    p = b.find(0)
    s = b if p == -1 else b[:p]
    try:
        return int(s, 8)
    except ValueError:
        if not s.strip():
            return 0
        raise TarFormatError(f"header {what} field is not a number: {s[:16]!r}") from None


_SIGNED = struct.Struct("148b8x356b")


def _signed_sum(block: bytes) -> int:
    values: tuple[int, ...] = _SIGNED.unpack(block)
    return 256 + sum(values)


def _parse_pax(raw: bytes) -> dict[str, str]:
    """Parse pax extended-header records `"%d %s=%s\\n"`; values keep embedded NULs."""
    out: dict[str, str] = {}
    pos = 0
    n = len(raw)
    binary = False
    while pos < n:
        if raw[pos] == 0:  # some writers pad the record area with NULs
            if raw[pos:].count(0) == n - pos:
                break
            raise TarFormatError("malformed pax header: NUL between records")
        sp = raw.find(b" ", pos, pos + 24)
        if sp <= pos or not raw[pos:sp].isdigit():
            raise TarFormatError("malformed pax header: bad record length")
        length = int(raw[pos:sp])
        end = pos + length
        if length < 5 or end > n or raw[end - 1] != 0x0A:
            raise TarFormatError("malformed pax header: record length out of range")
        record = raw[sp + 1 : end - 1]
        eq = record.find(b"=")
        if eq <= 0:
            raise TarFormatError("malformed pax header: record without key")
        key = record[:eq].decode("utf-8", "surrogateescape")
        value_b = record[eq + 1 :]
        if key == "hdrcharset":
            binary = value_b == b"BINARY"
        if key in {"path", "linkpath", "uname", "gname"} and not binary:
            try:
                value = value_b.decode("utf-8")
            except UnicodeDecodeError:
                value = value_b.decode("utf-8", "surrogateescape")
        else:
            value = value_b.decode("utf-8", "surrogateescape")
        out[key] = value
        pos = end
    return out


class _Collector:
    """Handler that keeps every member with its data (tests and small archives only)."""

    def __init__(self) -> None:
        self.items: list[tuple[TarMember, bytes]] = []
        self._cur: TarMember | None = None
        self._buf = bytearray()

    def begin(self, member: TarMember) -> None:
        self._cur = member
        self._buf.clear()

    def data(self, chunk: memoryview) -> None:
        self._buf += chunk

    def end(self) -> None:
        assert self._cur is not None
        self.items.append((self._cur, bytes(self._buf)))
        self._cur = None


def iter_tar(stream: BinaryIO, chunk_size: int = 65536) -> Iterator[tuple[TarMember, bytes]]:
    """Pull-style helper: yield (member, data) from an uncompressed tar stream; data in memory."""
    coll = _Collector()
    reader = TarReader(coll)
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            break
        reader.feed(chunk)
        yield from coll.items
        coll.items.clear()
    reader.close()
