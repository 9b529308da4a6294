"""The local Supabase-Storage stand-in: signed URLs, Supabase's error answers, ranges, faults."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from sidecar.testing.snapshot_server import SnapshotServer

DATA = bytes(range(256)) * 4096  # 1 MiB


async def _get(url: str | URL, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def test_signed_url_serves_the_object(snapshot_server: SnapshotServer) -> None:
    """A fresh signed URL returns the whole object with a validator and Accept-Ranges."""
    snapshot_server.add("p/snap.tar.zst", DATA)
    status, headers, body = await _get(snapshot_server.url_for("p/snap.tar.zst"))
    assert status == 200
    assert body == DATA
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"].startswith('"')
    assert snapshot_server.gets("p/snap.tar.zst")[0].status == 200


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        ("expired", "InvalidJWT", "jwt expired"),
        ("bad_signature", "InvalidJWT", "invalid signature"),
        ("other_path", "InvalidSignature", "The url do not match the signature"),
        ("garbage", "InvalidJWT", "jwt malformed"),
    ],
)
async def test_bad_tokens_get_supabase_answers(
    snapshot_server: SnapshotServer, mutate: str, error: str, message: str
) -> None:
    """Expired, forged, mismatched and malformed tokens get 400 with Supabase's JSON body."""
    snapshot_server.add("a", DATA)
    snapshot_server.add("b", DATA)
    url = snapshot_server.url_for("a")
    if mutate == "expired":
        url = snapshot_server.url_for("a", expires_in=-10)
    elif mutate == "bad_signature":
        url = url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB")
    elif mutate == "other_path":
        url = url.replace("/snapshots/a?", "/snapshots/b?")
    else:
        url = url.split("?")[0] + "?token=not-a-jwt"
    status, _, body = await _get(url)
    assert status == 400
    assert json.loads(body) == {"statusCode": "400", "error": error, "message": message}


async def test_expire_tokens_knob(snapshot_server: SnapshotServer) -> None:
    """The expire_tokens knob turns a valid URL into Supabase's 'jwt expired' answer."""
    snapshot_server.add("a", DATA)
    snapshot_server.faults.expire_tokens = True
    status, _, body = await _get(snapshot_server.url_for("a"))
    assert status == 400
    assert b"jwt expired" in body


async def test_unknown_object_is_404(snapshot_server: SnapshotServer) -> None:
    """A validly signed URL for an object that does not exist answers 404."""
    status, _, body = await _get(snapshot_server.url_for("nope.tar.zst"))
    assert status == 404
    assert b"not_found" in body


@pytest.mark.parametrize(
    ("range_", "status", "content_range", "expected"),
    [
        ("bytes=100-", 206, f"bytes 100-{len(DATA) - 1}/{len(DATA)}", DATA[100:]),
        ("bytes=10-19", 206, f"bytes 10-19/{len(DATA)}", DATA[10:20]),
        ("bytes=-5", 206, f"bytes {len(DATA) - 5}-{len(DATA) - 1}/{len(DATA)}", DATA[-5:]),
        (f"bytes={len(DATA)}-", 416, f"bytes */{len(DATA)}", None),
        ("bytes=0-1,5-6", 200, None, DATA),
    ],
)
async def test_ranges(
    snapshot_server: SnapshotServer,
    range_: str,
    status: int,
    content_range: str | None,
    expected: bytes | None,
) -> None:
    """Single byte ranges answer 206 with Content-Range, out-of-range 416, multi-range 200."""
    snapshot_server.add("a", DATA)
    got_status, headers, body = await _get(snapshot_server.url_for("a"), Range=range_)
    assert got_status == status
    assert headers.get("Content-Range") == content_range
    if expected is not None:
        assert body == expected


async def test_if_range_mismatch_answers_full_object(snapshot_server: SnapshotServer) -> None:
    """A Range with a stale If-Range validator gets the whole object (200), per RFC 9110."""
    snapshot_server.add("a", DATA)
    url = snapshot_server.url_for("a")
    status, headers, _ = await _get(url, Range="bytes=5-")
    assert status == 206
    status, _, body = await _get(url, Range="bytes=5-", **{"If-Range": headers["ETag"]})
    assert (status, body) == (206, DATA[5:])
    status, _, body = await _get(url, Range="bytes=5-", **{"If-Range": '"stale"'})
    assert (status, body) == (200, DATA)


async def test_ignore_range_knob(snapshot_server: SnapshotServer) -> None:
    """With ignore_range the server answers 200 and the whole object to a Range request."""
    snapshot_server.add("a", DATA)
    snapshot_server.faults.ignore_range = True
    status, _, body = await _get(snapshot_server.url_for("a"), Range="bytes=100-")
    assert (status, len(body)) == (200, len(DATA))


async def test_fail_first_knob(snapshot_server: SnapshotServer) -> None:
    """fail_first answers the next N requests with the configured 5xx, then serves normally."""
    snapshot_server.add("a", DATA)
    snapshot_server.faults.fail_first = 2
    snapshot_server.faults.fail_status = 502
    url = snapshot_server.url_for("a")
    assert [(await _get(url))[0] for _ in range(3)] == [502, 502, 200]


async def test_drop_after_closes_mid_body(snapshot_server: SnapshotServer) -> None:
    """drop_after sends exactly N body bytes then closes: the client sees a short body."""
    snapshot_server.add("a", DATA)
    snapshot_server.faults.drop_after = [1000, None]
    url = snapshot_server.url_for("a")
    got = bytearray()

    async def read_all(r: aiohttp.ClientResponse) -> None:
        async for chunk in r.content.iter_chunked(4096):
            got.extend(chunk)

    async with aiohttp.ClientSession() as s, s.get(url) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(r)
    assert bytes(got) == DATA[:1000]
    assert (await _get(url))[2] == DATA
    assert [r.dropped for r in snapshot_server.gets("a")] == [True, False]


async def test_drop_at_absolute_offsets(snapshot_server: SnapshotServer) -> None:
    """drop_at drops once at each absolute offset, whichever request covers it."""
    snapshot_server.add("a", DATA)
    snapshot_server.faults.drop_at([300, 100])
    url = snapshot_server.url_for("a")
    sent = []
    for start in (0, 100, 300):
        async with (
            aiohttp.ClientSession() as s,
            s.get(url, headers={"Range": f"bytes={start}-"}) as r,
        ):
            try:
                body = await r.read()
            except aiohttp.ClientPayloadError:
                body = b""
            sent.append((r.status, len(body)))
    assert [r.sent for r in snapshot_server.gets("a")] == [100, 200, len(DATA) - 300]
    assert sent[-1] == (206, len(DATA) - 300)


async def test_corrupt_at_flips_one_byte(snapshot_server: SnapshotServer) -> None:
    """corrupt_at flips exactly the byte at that absolute offset, in full and ranged answers."""
    snapshot_server.add("a", DATA)
    snapshot_server.faults.corrupt_at = 777
    url = snapshot_server.url_for("a")
    _, _, body = await _get(url)
    diff = [i for i in range(len(DATA)) if body[i] != DATA[i]]
    assert diff == [777]
    _, _, part = await _get(url, Range="bytes=700-800")
    assert part[77] == DATA[777] ^ 0xFF


async def test_trickle_limits_rate(snapshot_server: SnapshotServer) -> None:
    """trickle caps the send rate (20 KB at 100 KB/s takes at least ~0.15 s)."""
    snapshot_server.add("a", DATA[:20_000])
    snapshot_server.faults.trickle = 100_000
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    _, _, body = await _get(snapshot_server.url_for("a"))
    assert body == DATA[:20_000]
    assert loop.time() - t0 >= 0.15


async def test_serves_files_from_a_directory_and_refuses_escapes(tmp_path: Path) -> None:
    """Files under root are objects of the bucket; paths escaping root are 404."""
    (tmp_path / "root" / "p").mkdir(parents=True)
    (tmp_path / "root" / "p" / "s.tar.zst").write_bytes(DATA[:10])
    (tmp_path / "secret").write_bytes(b"nope")
    async with SnapshotServer(tmp_path / "root") as server:
        assert (await _get(server.url_for("p/s.tar.zst")))[2] == DATA[:10]
        raw = server.url_for("p/%2E%2E/%2E%2E/secret").replace("%252E", "%2E")
        status, _, body = await _get(URL(raw, encoded=True))
        assert status in {400, 404}
        assert body != b"nope"
        assert server._lookup("snapshots/../secret") is None
        assert server._lookup("snapshots/p/../../secret") is None
        status, _, body = await _get(server.url_for("p/s.tar.zst"), Range="bytes=2-3")
        assert (status, body) == (206, DATA[2:4])


async def test_admin_sign_and_fault_endpoints(snapshot_server: SnapshotServer) -> None:
    """POST /_admin/sign returns a working URL; POST /_admin/fault sets knobs at runtime."""
    snapshot_server.add("x", DATA)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{snapshot_server.base_url}/_admin/sign", json={"path": "x", "expires_in": 60}
        ) as r:
            url = (await r.json())["url"]
        async with s.post(f"{snapshot_server.base_url}/_admin/fault", json={"fail_first": 1}) as r:
            assert (await r.json())["fail_first"] == 1
    assert (await _get(url))[0] == 503
    assert (await _get(url))[2] == DATA


async def test_standalone_server_prints_signed_urls(tmp_path: Path) -> None:
    """`python -m sidecar.testing.snapshot_server --sign P` prints a working signed URL."""
    (tmp_path / "s.bin").write_bytes(DATA[:64])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.testing.snapshot_server",
        "--dir",
        str(tmp_path),
        "--port",
        "0",
        "--secret",
        "s3cret-s3cret-s3cret",
        "--sign",
        "s.bin",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        url = line.decode().strip()
        assert "?token=" in url
        assert (await _get(url))[2] == DATA[:64]
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
