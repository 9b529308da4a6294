"""zstd glue for the snapshot writer: frame boundaries, the window limit, the decoder's sink.

python-zstandard decodes the stream; `Frames` follows the frame headers beside it so that a
truncated stream and an oversized window (`zstd --long`) are named, which the decoder does not.
"""

from __future__ import annotations

from typing import Any

from sidecar.errors import SnapshotInvalidError

__all__ = ["DECOMPRESS_CHUNK", "MAX_WINDOW_BYTES", "Frames", "Sink", "window_error"]

MAX_WINDOW_BYTES = 1 << 24  # zstd window (decoder memory); level 19 needs 8 MiB, --long more
# Decompressed bytes handed to the tar reader at a time. 1 MiB rather than 256 KiB: a quarter of
# the hand-overs between the two threads of sidecar/snapshot/writer.py, and more members whole
# in one chunk (measured on the L snapshot: about 0.1 s less CPU and wall, 4 MiB more RSS).
DECOMPRESS_CHUNK = 1 << 20


class Sink:
    """The object zstandard's stream_writer pushes decompressed bytes into."""

    __slots__ = ("write",)

    def __init__(self, write: Any) -> None:
        self.write = write


def window_error(window: int | None) -> SnapshotInvalidError:
    """The refusal of a zstd frame whose window is over MAX_WINDOW_BYTES (`zstd --long`)."""
    size = f"a {window / 1048576:,.0f} MiB" if window else "a larger"
    return SnapshotInvalidError(
        f"unsupported snapshot: its zstd frames need {size} window, over the "
        f"{MAX_WINDOW_BYTES >> 20} MiB limit that bounds the sidecar's memory (compressed with "
        "--long or --ultra); recompress it without --long: "
        "zstd -d --long=31 -c in.tar.zst | zstd -c > out.tar.zst"
    )


class Frames:
    """Follows zstd frame boundaries in the compressed bytes, so a truncated stream is caught.

    python-zstandard's streaming decoders do not say whether the last frame was complete.
    """

    _MAGIC, _FHD, _BLOCK_HDR, _SKIP_SIZE, _WINDOW = range(5)

    def __init__(self) -> None:
        self.frames = 0
        self._want = 4
        self._buf = bytearray()
        self._field = self._MAGIC
        self._skip = 0
        self._after_skip = self._MAGIC  # field expected once the skip ends
        self._checksum = False
        self._last = False
        self._rest = 0  # frame header bytes after the window descriptor

    @property
    def at_boundary(self) -> bool:
        """True when the bytes so far end exactly after a complete frame."""
        return self.frames > 0 and self._field == self._MAGIC and not self._buf and not self._skip

    def feed(self, mv: memoryview) -> None:
        pos, n = 0, len(mv)
        while pos < n:
            if self._skip:
                take = min(n - pos, self._skip)
                pos += take
                self._skip -= take
                if not self._skip:
                    self._end_skip()
                continue
            take = min(self._want - len(self._buf), n - pos)
            self._buf += mv[pos : pos + take]
            pos += take
            if len(self._buf) == self._want:
                raw = bytes(self._buf)
                self._buf.clear()
                self._on_field(raw)

    def _expect(self, field: int, size: int) -> None:
        self._field, self._want = field, size

    def _end_skip(self) -> None:
        if self._after_skip == self._BLOCK_HDR:
            self._expect(self._BLOCK_HDR, 3)
        else:
            self.frames += self._after_skip == -1
            self._expect(self._MAGIC, 4)

    def _skip_then(self, n: int, field: int) -> None:
        self._after_skip = field
        if n:
            self._skip = n
            self._field = -2  # inside a skip
        else:
            self._end_skip()

    def _on_field(self, raw: bytes) -> None:
        f = self._field
        if f == self._MAGIC:
            magic = int.from_bytes(raw, "little")
            if magic == 0xFD2FB528:
                self._expect(self._FHD, 1)
            elif 0x184D2A50 <= magic <= 0x184D2A5F:
                self._expect(self._SKIP_SIZE, 4)
            else:
                raise SnapshotInvalidError("corrupt snapshot: not a zstd stream (bad frame magic)")
        elif f == self._FHD:
            fhd = raw[0]
            if fhd & 0x08:
                raise SnapshotInvalidError(
                    "corrupt snapshot: reserved bit set in zstd frame header"
                )
            single = bool(fhd & 0x20)
            fcs = (0 if not single else 1, 2, 4, 8)[fhd >> 6]
            self._checksum = bool(fhd & 0x04)
            self._rest = (0, 1, 2, 4)[fhd & 3] + fcs  # dictionary id, content size
            if single:
                self._skip_then(self._rest, self._BLOCK_HDR)
            else:
                self._expect(self._WINDOW, 1)
        elif f == self._WINDOW:
            # Checked here, before the decoder sees the frame, to name the cause: python-zstandard
            # only says "Frame requires too much memory for decoding".
            exponent, mantissa = raw[0] >> 3, raw[0] & 7
            base = 1 << (10 + exponent)
            window = base + (base >> 3) * mantissa
            if window > MAX_WINDOW_BYTES:
                raise window_error(window)
            self._skip_then(self._rest, self._BLOCK_HDR)
        elif f == self._BLOCK_HDR:
            hdr = int.from_bytes(raw, "little")
            last, btype, size = hdr & 1, (hdr >> 1) & 3, hdr >> 3
            if btype == 3:
                raise SnapshotInvalidError("corrupt snapshot: reserved zstd block type")
            content = 1 if btype == 1 else size
            if not last:
                self._skip_then(content, self._BLOCK_HDR)
            else:
                self._skip_then(content + (4 if self._checksum else 0), -1)
        elif f == self._SKIP_SIZE:
            self._skip_then(int.from_bytes(raw, "little"), self._MAGIC)
