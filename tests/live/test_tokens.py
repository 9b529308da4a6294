"""TokenSource: fixed and file tokens, rotation (plain and k8s symlink swap), expiry, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import jwt
import pytest

from sidecar.config import RealtimeSettings
from sidecar.errors import ConfigError
from sidecar.live.tokens import TokenSource, token_expiry
from sidecar.redact import Secret, redact

SECRET = "test-secret-with-at-least-32-bytes!!"


def make_token(role: str = "authenticated", exp_in: float = 3600, **claims: object) -> str:
    now = int(time.time())
    body = {"role": role, "exp": now + exp_in, "iat": now, "sub": "u1", **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


async def wait_changed(src: TokenSource, version: int, timeout: float = 5.0) -> str:
    async with asyncio.timeout(timeout):
        return await src.changed(version)


def test_fixed_token_and_expiry() -> None:
    """A fixed token is current, its exp claim is exposed, and refresh_at is at 80% of its life."""
    tok = make_token(exp_in=100)
    src = TokenSource(tok)
    assert src.current == tok
    assert src.version == 1
    exp, iat = token_expiry(tok)
    assert src.expires_at == exp
    assert iat is not None
    assert exp is not None
    assert src.refresh_at == pytest.approx(iat + 0.8 * (exp - iat))
    assert not src.expired()
    assert len(src.fingerprint) == 8
    assert src.fingerprint not in tok


def test_non_jwt_token_has_no_expiry() -> None:
    """An opaque token is accepted but has no expiry and no refresh time."""
    src = TokenSource("opaque-token-value")
    assert src.expires_at is None
    assert src.refresh_at is None
    assert not src.expired()


@pytest.mark.parametrize("via_file", [False, True])
def test_service_role_is_refused(tmp_path: Path, via_file: bool) -> None:
    """A token whose role claim is service_role is refused with ConfigError."""
    tok = make_token(role="service_role")
    (tmp_path / "token").write_text(tok)
    kwargs = {"token_file": tmp_path / "token"} if via_file else {"token": tok}
    with pytest.raises(ConfigError, match="service_role"):
        TokenSource(**kwargs)


def test_missing_token_is_a_config_error(tmp_path: Path) -> None:
    """No token, or a missing or empty file, is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="REALTIME_TOKEN"):
        TokenSource()
    with pytest.raises(ConfigError, match="REALTIME_TOKEN_FILE"):
        TokenSource(token_file=tmp_path / "absent")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        TokenSource(token_file=tmp_path / "empty")


def test_from_settings_prefers_the_file(tmp_path: Path) -> None:
    """from_settings reads the file when both a token and a file are configured."""
    file_tok, env_tok = make_token(sub="file"), make_token(sub="env")
    (tmp_path / "token").write_text(file_tok + "\n")
    rs = RealtimeSettings(token=Secret(env_tok), token_file=tmp_path / "token")
    assert TokenSource.from_settings(rs).current == file_tok
    assert TokenSource.from_settings(RealtimeSettings(token=Secret(env_tok))).current == env_tok


async def test_file_rotation_is_picked_up(tmp_path: Path) -> None:
    """Rewriting the token file wakes changed() with the new token; empty rewrites are ignored."""
    path = tmp_path / "token"
    first = make_token(sub="a")
    path.write_text(first)
    src = TokenSource(token_file=path, poll_interval=30)
    task = asyncio.create_task(src.run())
    try:
        path.write_text("")  # a writer truncating before writing: keep the old token
        second = make_token(sub="b")
        tmp = tmp_path / "token.tmp"
        tmp.write_text(second)
        tmp.replace(path)
        assert await wait_changed(src, 1) == second
        assert src.version == 2
        assert src.current == second
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_kubernetes_symlink_swap(tmp_path: Path) -> None:
    """A k8s-style secret volume (token -> ..data/token, ..data swapped atomically) rotates."""
    (tmp_path / "..2024_01").mkdir()
    first = make_token(sub="k8s-1")
    (tmp_path / "..2024_01" / "token").write_text(first)
    os.symlink("..2024_01", tmp_path / "..data")
    os.symlink("..data/token", tmp_path / "token")
    src = TokenSource(token_file=tmp_path / "token", poll_interval=30)
    assert src.current == first
    task = asyncio.create_task(src.run())
    try:
        second = make_token(sub="k8s-2")
        (tmp_path / "..2024_02").mkdir()
        (tmp_path / "..2024_02" / "token").write_text(second)
        os.symlink("..2024_02", tmp_path / "..data_tmp")
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")
        assert await wait_changed(src, 1) == second
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_poll_fallback_rereads(tmp_path: Path) -> None:
    """reload() and the poll fallback pick up a change even without a watch event."""
    path = tmp_path / "token"
    path.write_text(make_token(sub="a"))
    src = TokenSource(token_file=path)
    second = make_token(sub="b")
    path.write_text(second)
    assert src.reload() is True
    assert src.reload() is False
    assert src.current == second
    assert TokenSource(make_token()).reload() is False


async def test_runtime_service_role_is_refused_and_the_current_token_kept(
    tmp_path: Path,
) -> None:
    """A service_role token written at runtime is never used: run() goes on with the current
    token, the refusal is counted once (not on every re-read) and named for /status, the key
    is redacted from logs, and a later scoped token is accepted again."""
    path = tmp_path / "token"
    first = make_token()
    path.write_text(first)
    src = TokenSource(token_file=path, poll_interval=0.05)
    task = asyncio.create_task(src.run())
    try:
        bad = make_token(role="service_role")
        path.write_text(bad)
        async with asyncio.timeout(5):
            while src.refused == 0:
                await asyncio.sleep(0.01)
        assert src.reload() is False  # re-read: not alarmed twice
        assert src.refused == 1
        assert src.current == first
        assert not task.done()
        assert src.last_refusal is not None
        assert "service_role" in src.last_refusal
        assert bad not in redact(f"leaked {bad}")
        second = make_token(sub="next")
        path.write_text(second)
        async with asyncio.timeout(5):
            await src.changed()
        assert src.current == second
        assert src.last_refusal is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_fixed_token_run_returns() -> None:
    """run() returns at once when there is no file to watch."""
    async with asyncio.timeout(1):
        await TokenSource(make_token()).run()


def _context_switches() -> int:
    """Voluntary context switches of every thread of this process (each is one wake-up)."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


async def test_idle_token_file_watch_wakes_rarely(tmp_path: Path) -> None:
    """An idle token-file watch wakes a few times a second, not once every 20 ms.

    watchfiles' Rust loop sleeps `step` between checks even when nothing changes; at the old
    step of 20 ms this process woke about 150 times in 3 s.
    """
    path = tmp_path / "token"
    path.write_text(make_token())
    src = TokenSource(token_file=path, poll_interval=30)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.sleep(0.5)  # the watcher thread is up
        before = _context_switches()
        await asyncio.sleep(3.0)  # idle: what is measured is what happens meanwhile
        woken = _context_switches() - before
        assert woken < 40, f"{woken} wake-ups in 3 s of an idle token watch"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
