"""Hand-made tar and .tar.zst bytes for tests, including the broken and hostile ones tarfile
refuses to write: raw headers, pax and GNU long-name records, and snapshot manifests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import zstandard

BLOCK = 512
EOA = bytes(2 * BLOCK)


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\x00"


def header(
    name: str | bytes,
    *,
    size: int = 0,
    typeflag: bytes = b"0",
    mode: int = 0o644,
    linkname: str | bytes = b"",
    prefix: bytes = b"",
    magic: bytes = b"ustar\x0000",
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
    devmajor: int = 0,
    devminor: int = 0,
    size_field: bytes | None = None,
    bad_checksum: bool = False,
) -> bytes:
    """One 512-byte ustar header; `size_field` overrides the encoded size (e.g. base-256)."""
    raw_name = name.encode() if isinstance(name, str) else name
    raw_link = linkname.encode() if isinstance(linkname, str) else linkname
    assert len(raw_name) <= 100
    assert len(raw_link) <= 100
    assert len(prefix) <= 155
    buf = bytearray(BLOCK)
    buf[0 : len(raw_name)] = raw_name
    buf[100:108] = _octal(mode, 8)
    buf[108:116] = _octal(uid, 8)
    buf[116:124] = _octal(gid, 8)
    buf[124:136] = size_field if size_field is not None else _octal(size, 12)
    buf[136:148] = _octal(mtime, 12)
    buf[156:157] = typeflag
    buf[157 : 157 + len(raw_link)] = raw_link
    buf[257:265] = magic
    buf[329:337] = _octal(devmajor, 8)
    buf[337:345] = _octal(devminor, 8)
    buf[345 : 345 + len(prefix)] = prefix
    buf[148:156] = b" " * 8
    chk = sum(buf) + (1 if bad_checksum else 0)
    buf[148:156] = f"{chk:06o}".encode() + b"\x00 "
    return bytes(buf)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str | bytes, data: bytes = b"", *, typeflag: bytes = b"0", **kw: object) -> bytes:
    """Header plus padded data; `size` in kw overrides the declared size."""
    size = kw.pop("size", len(data))
    return header(name, size=size, typeflag=typeflag, **kw) + pad(data)  # type: ignore[arg-type]


def pax_record(key: str, value: str | bytes) -> bytes:
    v = value.encode() if isinstance(value, str) else value
    body = key.encode() + b"=" + v + b"\n"
    n = len(body) + 2
    while len(str(n)) + 1 + len(body) != n:
        n = len(str(n)) + 1 + len(body)
    return str(n).encode() + b" " + body


def pax(records: Mapping[str, str | bytes], *, typeflag: bytes = b"x") -> bytes:
    """A pax extended header member ('x', or 'g' for global) with the given records."""
    data = b"".join(pax_record(k, v) for k, v in records.items())
    return member("././@PaxHeader", data, typeflag=typeflag)


def gnu_long(name: str | bytes, *, typeflag: bytes = b"L") -> bytes:
    """A GNU long-name ('L') or long-link ('K') member carrying `name`."""
    raw = (name.encode() if isinstance(name, str) else name) + b"\x00"
    return member("././@LongLink", raw, typeflag=typeflag, magic=b"ustar  \x00")


def zst(data: bytes, *, frames: int = 1, level: int = 3) -> bytes:
    """zstd-compress data, split into `frames` independent frames."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    if frames <= 1:
        return cctx.compress(data)
    step = max(1, -(-len(data) // frames))
    return b"".join(cctx.compress(data[i : i + step]) for i in range(0, len(data), step))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Snap:
    """A snapshot under construction: files for the manifest and the archive members."""

    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    project_id: str = "proj"
    snapshot_id: str = "snap-1"
    created_at: int = 1_700_000_000_000
    seq: int | None = 7
    version: int = 1

    def entries(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for path, data in sorted(self.files.items()):
            out.append(
                {
                    "path": path,
                    "size": len(data),
                    "sha256": sha(data),
                    "mode": self.modes.get(path, 0o644),
                    "version": self.version,
                }
            )
        for path, target in sorted(self.symlinks.items()):
            out.append(
                {
                    "path": path,
                    "size": len(target.encode()),
                    "sha256": sha(target.encode()),
                    "mode": 0o777,
                    "version": self.version,
                    "type": "symlink",
                    "target": target,
                }
            )
        return out

    def manifest(self, entries: Iterable[Mapping[str, object]] | None = None) -> bytes:
        doc: dict[str, object] = {
            "format": 1,
            "project_id": self.project_id,
            "snapshot_id": self.snapshot_id,
            "created_at": self.created_at,
            "files": list(entries) if entries is not None else self.entries(),
        }
        if self.seq is not None:
            doc["seq"] = self.seq
        return json.dumps(doc).encode()

    def manifest_member(self, raw: bytes | None = None) -> bytes:
        return member(".snapshot.json", raw if raw is not None else self.manifest())

    def members(self) -> bytes:
        """Directories, files and symlinks the way a well-behaved producer writes them."""
        out = bytearray()
        dirs = sorted({p.rpartition("/")[0] for p in [*self.files, *self.symlinks]} - {""})
        for d in dirs:
            out += member(d + "/", typeflag=b"5", mode=0o755)
        for path, data in sorted(self.files.items()):
            out += _named(path, data, mode=self.modes.get(path, 0o644))
        for path, target in sorted(self.symlinks.items()):
            out += member(path, typeflag=b"2", linkname=target)
        return bytes(out)

    def tar(self, *, extra: bytes = b"", manifest: bytes | None = None) -> bytes:
        return self.manifest_member(manifest) + self.members() + extra + EOA

    def zst(self, **kw: object) -> bytes:
        return zst(self.tar(**kw))  # type: ignore[arg-type]


def _named(path: str, data: bytes, *, mode: int) -> bytes:
    """A regular file member, with a pax path record when the name does not fit in 100 bytes."""
    raw = path.encode()
    if len(raw) <= 100:
        return member(raw, data, mode=mode)
    return pax({"path": path}) + member(raw[-100:], data, mode=mode)
