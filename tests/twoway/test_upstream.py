"""The PostgREST RPC client: versions, conflicts, retries, lost answers, auth failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.testing.rpc_server import RpcServer
from sidecar.twoway.upstream import ConflictError, Upstream, UpstreamError

PROJECT = "p1"


@pytest.fixture
async def rpc() -> AsyncIterator[RpcServer]:
    """A running RpcServer."""
    async with RpcServer() as server:
        yield server


@pytest.fixture
async def up(rpc: RpcServer) -> AsyncIterator[Upstream]:
    """An Upstream for PROJECT with near-zero backoff."""
    async with Upstream(
        rpc.url,
        PROJECT,
        apikey=rpc.anon_key,
        token=rpc.make_token(PROJECT),
        retries=3,
        backoff_initial=0.001,
        backoff_max=0.005,
    ) as client:
        yield client


async def test_upsert_delete_and_read_back(rpc: RpcServer, up: Upstream) -> None:
    """upsert/delete return the new head version; get and list_files read it back."""
    assert await up.upsert("a.txt", b"one\n", 0) == 1
    assert await up.upsert("a.txt", b"two\n", 1) == 2
    assert await up.upsert("img.bin", b"\x00\xff", None) == 1
    assert rpc.files(PROJECT) == {"a.txt": b"two\n", "img.bin": b"\x00\xff"}
    head = await up.get("a.txt")
    assert head is not None
    assert (head.version, head.content) == (2, b"two\n")
    assert await up.delete("a.txt", 2) == 3
    head = await up.get("a.txt")
    assert head is not None
    assert head.deleted
    assert await up.get("never") is None
    files = await up.list_files()
    assert {p: f.content for p, f in files.items()} == {"img.bin": b"\x00\xff"}


async def test_stale_expected_version_is_a_conflict(rpc: RpcServer, up: Upstream) -> None:
    """A stale expected_version raises ConflictError at once, naming the head version."""
    await rpc.editor_upsert(PROJECT, "a.txt", b"x")
    await rpc.editor_upsert(PROJECT, "a.txt", b"y")
    with pytest.raises(ConflictError) as info:
        await up.upsert("a.txt", b"mine", 1)
    assert (info.value.expected_version, info.value.current_version) == (1, 2)
    with pytest.raises(ConflictError):
        await up.delete("a.txt", 1)
    assert [name for name, _ in rpc.calls] == ["upsert_project_file", "delete_project_file"]


async def test_transient_errors_are_retried(rpc: RpcServer, up: Upstream) -> None:
    """503s and dropped connections are retried; the write lands once."""
    rpc.faults.fail_first = 2
    assert await up.upsert("a.txt", b"x", 0) == 1
    rpc.faults.drop_first = 2
    assert await up.upsert("a.txt", b"y", 1) == 2
    assert [v for r in rpc.history for v in [r.version]] == [1, 2]


async def test_retries_run_out(rpc: RpcServer, up: Upstream) -> None:
    """After the retries a transient failure becomes a non-transient UpstreamError."""
    rpc.faults.fail_first = 10
    with pytest.raises(UpstreamError) as info:
        await up.upsert("a.txt", b"x", 0)
    assert "after 4 attempts" in str(info.value)
    assert not isinstance(info.value, ConflictError)
    assert len(rpc.calls) == 4
    rpc.faults.reset()
    rpc.calls.clear()
    rpc.faults.fail_first = 1
    with pytest.raises(UpstreamError):
        await up.upsert("a.txt", b"x", 0, retries=0)
    assert len(rpc.calls) == 1


async def test_lost_answer_is_recognised(rpc: RpcServer, up: Upstream) -> None:
    """A write applied but unanswered, whose retry conflicts, is read back as our success."""
    await rpc.editor_upsert(PROJECT, "a.txt", b"base")
    rpc.faults.lose_response_first = 1
    assert await up.upsert("a.txt", b"mine", 1) == 2
    rpc.faults.lose_response_first = 1
    assert await up.delete("a.txt", 2) == 3
    assert len([r for r in rpc.history if r.path == "a.txt"]) == 3


async def test_lost_answer_then_real_conflict(rpc: RpcServer, up: Upstream) -> None:
    """If someone else wrote after our lost answer, the retry's conflict is real and raised."""
    await rpc.editor_upsert(PROJECT, "a.txt", b"base")
    rpc.faults.lose_response_first = 1
    editor: list[asyncio.Task[int]] = []

    def listener(_topic: str, _event: str, payload: dict[str, Any]) -> None:
        # Our write (version 2) was just applied: the editor writes before our retry.
        if payload.get("version") == 2 and not editor:
            editor.append(
                asyncio.get_running_loop().create_task(
                    rpc.editor_upsert(PROJECT, "a.txt", b"editor")
                )
            )

    rpc.add_listener(listener)
    up.backoff_initial = up.backoff_max = 0.05  # room for the editor's write before the retry
    with pytest.raises(ConflictError) as info:
        await up.upsert("a.txt", b"mine", 1)
    assert await editor[0] == 3
    assert info.value.expected_version == 1
    assert rpc.files(PROJECT) == {"a.txt": b"editor"}


async def test_auth_failures_are_not_retried(rpc: RpcServer) -> None:
    """401/403 raise UpstreamError after one call; a token provider is read per call."""
    tokens = [rpc.make_token("other-project"), rpc.make_token(PROJECT)]
    async with Upstream(
        rpc.url,
        PROJECT,
        apikey=rpc.anon_key,
        token=lambda: tokens[0],
        retries=5,
        backoff_initial=0.001,
    ) as up:
        with pytest.raises(UpstreamError) as info:
            await up.upsert("a.txt", b"x", 0)
        assert (info.value.status, info.value.code, info.value.transient) == (403, "42501", False)
        assert len(rpc.calls) == 1
        tokens.reverse()  # rotation: the provider now returns the right token
        assert await up.upsert("a.txt", b"x", 0) == 1
    async with Upstream(rpc.url, PROJECT, apikey="", token=rpc.make_token(PROJECT)) as up:
        with pytest.raises(UpstreamError) as info:
            await up.get("a.txt")
        assert info.value.status == 401
