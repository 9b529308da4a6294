"""The resumable snapshot download: retries, Range resume, restarts, expiry, integrity."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from sidecar.config import SnapshotSettings
from sidecar.errors import SnapshotExpiredError, SnapshotInvalidError, SnapshotUnavailableError
from sidecar.metrics import Metrics
from sidecar.snapshot.download import download, fetch
from sidecar.testing.snapshot_server import ServedRequest, SnapshotServer

DATA = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
SHA = hashlib.sha256(DATA).hexdigest()


class MemorySink:
    """Collects the bytes; forgets them on restart."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.restarts = 0

    async def write(self, chunk: bytes) -> None:
        self.buf += chunk

    async def restart(self) -> None:
        self.buf.clear()
        self.restarts += 1


class SyncMemorySink:
    """MemorySink for the blocking `fetch`."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, chunk: bytes) -> None:
        self.buf += chunk

    def restart(self) -> None:
        self.buf.clear()


def _retries(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "sidecar_snapshot_retries_total", {"project_id": "local", "session_id": "local"}
    )
    return value or 0.0


async def test_plain_download(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """Without faults the sink gets the object once, in order, with its sha256."""
    snapshot_server.add("s.tar.zst", DATA)
    sink = MemorySink()
    totals: list[int | None] = []
    result = await download(
        snapshot_server.url_for("s.tar.zst"),
        sink,
        settings=fast_snapshot_settings,
        hash_bytes=True,
        on_total=totals.append,
    )
    assert bytes(sink.buf) == DATA
    assert (result.size, result.retries, result.restarts, result.sha256) == (len(DATA), 0, 0, SHA)
    assert totals == [len(DATA)]


async def test_twenty_drops_resume_with_range(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """Twenty dropped connections are resumed with Range/If-Range and every byte arrives once."""
    snapshot_server.add("s.tar.zst", DATA)
    offsets = random.Random(1).sample(range(1, len(DATA)), 20)
    snapshot_server.faults.drop_at(offsets)
    sink = MemorySink()
    metrics = Metrics()
    result = await download(
        snapshot_server.url_for("s.tar.zst"),
        sink,
        settings=fast_snapshot_settings,
        metrics=metrics,
        expected_sha256=SHA,
    )
    assert bytes(sink.buf) == DATA
    assert result.retries == 20
    assert result.transferred == len(DATA)
    assert _retries(metrics) == 20
    gets = snapshot_server.gets("s.tar.zst")
    assert len(gets) == 21
    assert [g.start for g in gets[1:]] == sorted(offsets)
    assert all(g.status == 206 and g.if_range for g in gets[1:])


async def test_range_ignored_restarts_the_sink(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """A server answering 200 to a Range request makes the sink start over, and it ends right."""
    snapshot_server.add("s.tar.zst", DATA)
    snapshot_server.faults.ignore_range = True
    snapshot_server.faults.drop_after = [1_000_000, 2_000_000]
    sink = MemorySink()
    result = await download(
        snapshot_server.url_for("s.tar.zst"),
        sink,
        settings=fast_snapshot_settings,
        expected_sha256=SHA,
    )
    assert bytes(sink.buf) == DATA
    assert sink.restarts == 2
    assert result.restarts == 2
    assert result.transferred == len(DATA) + 3_000_000


async def test_object_changed_between_attempts_restarts(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """If-Range: when the object changes after a drop, the server's 200 restarts the sink."""
    new = DATA[::-1]
    snapshot_server.add("s.tar.zst", DATA)

    def rule(req: ServedRequest) -> int | None:
        if len(snapshot_server.requests) > 1:
            return None
        snapshot_server.add("s.tar.zst", new)  # replaced while this response is cut short
        return 500_000

    snapshot_server.faults.drop_after = rule
    sink = MemorySink()
    await download(snapshot_server.url_for("s.tar.zst"), sink, settings=fast_snapshot_settings)
    assert bytes(sink.buf) == new
    assert sink.restarts == 1
    second = snapshot_server.gets("s.tar.zst")[1]
    assert (second.range, second.status) == ("bytes=500000-", 200)


async def test_expired_url_fails_at_once(snapshot_server: SnapshotServer) -> None:
    """400 InvalidJWT is SnapshotExpiredError within a second, with no retries and no token."""
    snapshot_server.add("s.tar.zst", DATA)
    url = snapshot_server.url_for("s.tar.zst", expires_in=-1)
    slow = SnapshotSettings(retries=8, backoff_initial=5, backoff_max=10)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with capture_logs() as logs, pytest.raises(SnapshotExpiredError) as info:
        await download(url, MemorySink(), settings=slow)
    assert loop.time() - t0 < 1.0
    message = str(info.value)
    assert "jwt expired" in message
    assert "token=" not in message
    assert url.split("?")[0] in message
    assert "\n" not in message
    assert len(snapshot_server.gets()) == 1
    assert not [e for e in logs if e["event"] == "snapshot.retry_scheduled"]


async def test_not_found_is_unavailable(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """404 is SnapshotUnavailableError (not expired), without retries."""
    with pytest.raises(SnapshotUnavailableError) as info:
        await download(
            snapshot_server.url_for("missing"), MemorySink(), settings=fast_snapshot_settings
        )
    assert not isinstance(info.value, SnapshotExpiredError)
    assert "404" in str(info.value)
    assert len(snapshot_server.gets()) == 1


async def test_5xx_then_success(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """Three 503s are retried with logged backoff, counted, and then the download succeeds."""
    snapshot_server.add("s.tar.zst", DATA)
    snapshot_server.faults.fail_first = 3
    metrics = Metrics()
    with capture_logs() as logs:
        result = await download(
            snapshot_server.url_for("s.tar.zst"),
            sink := MemorySink(),
            settings=fast_snapshot_settings,
            metrics=metrics,
        )
    assert bytes(sink.buf) == DATA
    assert result.retries == 3
    assert _retries(metrics) == 3
    scheduled = [e for e in logs if e["event"] == "snapshot.retry_scheduled"]
    assert [e["attempt"] for e in scheduled] == [1, 2, 3]
    assert all("wait_for" in e and e["reason"] == "HTTP 503" for e in scheduled)
    assert all("token=" not in repr(e) for e in logs)


async def test_5xx_forever_gives_up(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """A server that keeps failing exhausts the retries: SnapshotUnavailableError."""
    snapshot_server.add("s.tar.zst", DATA)
    snapshot_server.faults.fail_first = 1000
    settings = dataclasses.replace(fast_snapshot_settings, retries=3)
    with pytest.raises(SnapshotUnavailableError, match="after 3 retries"):
        await download(snapshot_server.url_for("s.tar.zst"), MemorySink(), settings=settings)
    assert len(snapshot_server.gets()) == 4


async def test_read_timeout_is_retried(snapshot_server: SnapshotServer) -> None:
    """A stalled body hits the sock_read timeout and is resumed where it stopped."""
    snapshot_server.add("s.tar.zst", DATA)
    snapshot_server.faults.trickle = 2.0  # one byte, then half a second of silence

    def rule(req: ServedRequest) -> int | None:
        if len(snapshot_server.requests) > 1:
            snapshot_server.faults.trickle = None
        return None

    snapshot_server.faults.drop_after = rule
    settings = SnapshotSettings(
        retries=2, backoff_initial=0.001, backoff_max=0.001, read_timeout=0.2
    )
    sink = MemorySink()
    with capture_logs() as logs:
        await download(snapshot_server.url_for("s.tar.zst"), sink, settings=settings)
    assert bytes(sink.buf) == DATA
    reasons = [e["reason"] for e in logs if e["event"] == "snapshot.retry_scheduled"]
    assert len(reasons) == 1
    assert "timed out" in reasons[0]
    assert snapshot_server.gets()[1].range == "bytes=1-"


async def test_connection_refused_gives_up(fast_snapshot_settings: SnapshotSettings) -> None:
    """Nothing listening: connection errors are retried, then SnapshotUnavailableError."""
    async with SnapshotServer() as server:
        url = server.url_for("s.tar.zst")
    settings = dataclasses.replace(fast_snapshot_settings, retries=2)
    with pytest.raises(SnapshotUnavailableError, match="after 2 retries"):
        await download(url, MemorySink(), settings=settings)


async def test_sha256_mismatch_is_invalid(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """Bytes that do not hash to SNAPSHOT_SHA256 raise SnapshotInvalidError."""
    snapshot_server.add("s.tar.zst", DATA)
    with pytest.raises(SnapshotInvalidError, match="sha256 mismatch"):
        await download(
            snapshot_server.url_for("s.tar.zst"),
            MemorySink(),
            settings=fast_snapshot_settings,
            expected_sha256="0" * 64,
        )


async def test_file_url(tmp_path: Path, fast_snapshot_settings: SnapshotSettings) -> None:
    """A file:// URL (snapshot on a mounted volume) streams through the same sink protocol."""
    path = tmp_path / "s.tar.zst"
    path.write_bytes(DATA)
    sink = MemorySink()
    result = await download(
        path.as_uri(), sink, settings=fast_snapshot_settings, expected_sha256=SHA
    )
    assert bytes(sink.buf) == DATA
    assert result.size == len(DATA)
    with pytest.raises(SnapshotUnavailableError, match="cannot be read"):
        await download(
            (tmp_path / "missing").as_uri(), MemorySink(), settings=fast_snapshot_settings
        )


async def test_conditional_request_304_and_changed_object(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """If-None-Match with the ETag of the last download: 304, nothing delivered; once the
    object is replaced, 200 with the new bytes and its new ETag. Without an ETag the
    Last-Modified date is sent as If-Modified-Since."""
    snapshot_server.add("s.tar.zst", DATA)
    first = await asyncio.to_thread(
        fetch,
        snapshot_server.url_for("s.tar.zst"),
        SyncMemorySink(),
        settings=fast_snapshot_settings,
    )
    assert first.etag
    assert first.last_modified
    sink = SyncMemorySink()
    again = await asyncio.to_thread(
        fetch,
        snapshot_server.url_for("s.tar.zst"),
        sink,
        settings=fast_snapshot_settings,
        if_none_match=first.etag,
        expected_sha256="0" * 64,  # not checked: no bytes came
    )
    assert (again.not_modified, again.transferred, bytes(sink.buf)) == (True, 0, b"")
    assert snapshot_server.gets()[-1].status == 304
    since = await asyncio.to_thread(
        fetch,
        snapshot_server.url_for("s.tar.zst"),
        SyncMemorySink(),
        settings=fast_snapshot_settings,
        if_modified_since=first.last_modified,
    )
    assert since.not_modified
    new = DATA[::-1]
    snapshot_server.add("s.tar.zst", new)
    sink = SyncMemorySink()
    changed = await asyncio.to_thread(
        fetch,
        snapshot_server.url_for("s.tar.zst"),
        sink,
        settings=fast_snapshot_settings,
        if_none_match=first.etag,
    )
    assert not changed.not_modified
    assert bytes(sink.buf) == new
    assert changed.etag != first.etag


async def test_a_sink_error_is_not_retried(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """What the sink raises (a full disk in the extractor) ends the download as it is."""
    snapshot_server.add("s.tar.zst", DATA)

    class Full(SyncMemorySink):
        def write(self, chunk: bytes) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        await asyncio.to_thread(
            fetch, snapshot_server.url_for("s.tar.zst"), Full(), settings=fast_snapshot_settings
        )
    assert len(snapshot_server.gets()) == 1


async def test_redirects_are_followed_and_bounded(
    snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> None:
    """A 302/307 to the signed URL (a CDN in front of Storage) is followed; a loop is refused."""
    snapshot_server.add("s.tar.zst", DATA)
    target = snapshot_server.url_for("s.tar.zst")

    async def hop(request: web.Request) -> web.Response:
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        raise web.HTTPTemporaryRedirect(target)

    app = web.Application()
    app.router.add_get("/{name}", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        sink = MemorySink()
        result = await download(
            f"http://127.0.0.1:{port}/start?token=x", sink, settings=fast_snapshot_settings
        )
        assert bytes(sink.buf) == DATA
        assert result.size == len(DATA)
        with pytest.raises(SnapshotUnavailableError, match="redirects more than 5 times"):
            await download(
                f"http://127.0.0.1:{port}/loop", MemorySink(), settings=fast_snapshot_settings
            )
    finally:
        await runner.cleanup()
