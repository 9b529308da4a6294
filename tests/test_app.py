"""The app's phases in-process, against the real fakes (tests/e2e runs the same as a subprocess)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from sidecar import wiring
from sidecar.app import Sidecar, _Teardown
from sidecar.config import Settings
from sidecar.errors import ConfigError, NoSpaceError
from sidecar.live.subscription import Subscription
from sidecar.process.child import Supervisor
from sidecar.process.hooks import OnChangeHooks
from sidecar.wiring import (
    Live,
    LiveLoader,
    LoadedLive,
    LocalChanges,
    LocalChangesLater,
    NoChild,
    NoHooks,
    NoLive,
    NoLocalChanges,
    build,
)
from tests.e2e.e2e_stack import MemoryStack, base_env, read_tree, wait_for

SLEEPER = (sys.executable, "-c", "import time; time.sleep(60)")


class _Loaded(Exception):
    """Ends a TaskGroup once the live stack is loaded."""


def _settings(stack: MemoryStack | None, project_dir: Path, **overrides: str | None) -> Settings:
    return Settings.from_env(base_env(stack, project_dir, overrides=overrides))


async def _get(sidecar: Sidecar, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{sidecar.http_port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


async def _ready(sidecar: Sidecar) -> bool:
    if sidecar.http_port is None:
        return False
    status, _ = await _get(sidecar, "/readyz")
    return status == 200


async def _serving(sidecar: Sidecar, until: Callable[[], Awaitable[object]]) -> int:
    """Serve until `until` returns, then SIGTERM ourselves (the app's handler) and return the code."""
    task = asyncio.create_task(sidecar.serve())
    try:
        await until()
    except BaseException:
        task.cancel()
        raise
    os.kill(os.getpid(), signal.SIGTERM)
    return await asyncio.wait_for(task, 15)


async def test_run_hydrates_then_returns_the_childs_status(tmp_path: Path) -> None:
    """The child starts on the hydrated tree, and its exit status is the app's."""
    async with MemoryStack() as stack:
        settings = _settings(stack, tmp_path / "p")
        check = "import os, sys; sys.exit(3 if os.path.exists('src/app.js') else 9)"
        code = await Sidecar(settings, (sys.executable, "-c", check), hydrate_first=True).serve()
        assert code == 3
        assert read_tree(tmp_path / "p") == stack.files()


async def test_live_delta_lands_and_sigterm_stops_in_order(tmp_path: Path) -> None:
    """With Realtime wired, an edit in the database reaches the disk; SIGTERM stops the child,
    returns 128+15, and the teardown closes the listener."""
    async with MemoryStack() as stack:
        sidecar = Sidecar(_settings(stack, tmp_path / "p"), SLEEPER, hydrate_first=True)

        async def edit_and_wait() -> None:
            await wait_for(lambda: _ready(sidecar), 20, "ready")
            await stack.rpc.editor_upsert(stack.project, "src/app.js", b"v = 2\n")
            target = tmp_path / "p" / "src" / "app.js"
            await wait_for(lambda: target.read_bytes() == b"v = 2\n", 10, "the delta on disk")

        with capture_logs() as logs:
            code = await _serving(sidecar, edit_and_wait)
        assert code == 128 + signal.SIGTERM
        events = [e["event"] for e in logs]
        assert events.index("sidecar.stopping") < events.index("sidecar.stopped")
        assert "sidecar.shutdown_failed" not in events
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(sidecar, "/healthz")


async def test_child_starts_before_the_live_stack_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child waits for the files, not for the live stack's imports (realtime-py, aiohttp):
    with those held in their thread, the child runs on the hydrated tree while the sidecar is
    not subscribed (so not ready); an edit made meanwhile reaches the disk once the stack has
    loaded and joined (replay since the snapshot: delta rule 4, sidecar/live/__init__.py)."""
    release = threading.Event()
    real_import = wiring._import_live_stack

    def held_import() -> None:
        release.wait(30)
        real_import()

    monkeypatch.setattr(wiring, "_import_live_stack", held_import)
    marker = tmp_path / "child-ran"
    child = (
        sys.executable,
        "-c",
        f"import time; open({str(marker)!r}, 'w').close(); time.sleep(60)",
    )
    target = tmp_path / "p" / "src" / "app.js"
    async with MemoryStack() as stack:
        sidecar = Sidecar(_settings(stack, tmp_path / "p"), child, hydrate_first=True)

        async def scenario() -> None:
            try:
                await wait_for(marker.exists, 20, "the child running")
                assert sidecar.components is not None
                live = sidecar.components.live
                assert isinstance(live, LiveLoader)
                assert live.loaded is None
                assert read_tree(tmp_path / "p") == stack.files()
                status, body = await _get(sidecar, "/readyz")
                assert status == 503
                assert "not subscribed" in body
                await stack.rpc.editor_upsert(stack.project, "src/app.js", b"v = 3\n")
            finally:
                release.set()
            await wait_for(lambda: _ready(sidecar), 20, "ready")
            await wait_for(lambda: target.read_bytes() == b"v = 3\n", 10, "the edit on disk")

        assert await _serving(sidecar, scenario) == 128 + signal.SIGTERM


async def test_without_realtime_ready_with_null_live(tmp_path: Path) -> None:
    """REALTIME_URL unset: the null Live makes readiness not wait for a subscription."""
    async with MemoryStack() as stack:
        url, sha = stack.snapshot()
        settings = _settings(
            None,
            tmp_path / "p",
            SNAPSHOT_URL=url,
            SNAPSHOT_SHA256=sha,
            PROJECT_ID=stack.project,
        )
        sidecar = Sidecar(settings, SLEEPER, hydrate_first=True)

        async def ready_then_status() -> None:
            await wait_for(lambda: _ready(sidecar), 20, "ready")
            _, body = await _get(sidecar, "/status")
            assert '"subscribed": true' in body

        assert await _serving(sidecar, ready_then_status) == 128 + signal.SIGTERM
        assert read_tree(tmp_path / "p") == stack.files()


async def test_sync_only_refuses_an_unhydrated_dir_and_still_tears_down(tmp_path: Path) -> None:
    """`sidecar sync` on an empty PROJECT_DIR fails with ConfigError after closing what startup
    opened (the health listener no longer answers)."""
    sidecar = Sidecar(_settings(None, tmp_path / "p"), (), hydrate_first=False)
    with capture_logs() as logs, pytest.raises(ExceptionGroup) as info:
        await sidecar.serve()
    assert info.group_contains(ConfigError, match="not hydrated")
    assert "sidecar.stopping" in [e["event"] for e in logs]
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(sidecar, "/healthz")


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (NoSpaceError("/p/.sidecar/bases: no space left on device"), 128 + signal.SIGTERM),
        (RuntimeError("a bug in a teardown step"), None),
    ],
)
async def test_shutdown_fault_of_the_environment_keeps_the_childs_status(
    tmp_path: Path, failure: Exception, code: int | None
) -> None:
    """A teardown step that fails for the environment (disk full) is logged and the exit code
    stays the child's; a failure that is a bug is raised (exit 70 in the CLI)."""
    async with MemoryStack() as stack:
        sidecar = Sidecar(_settings(stack, tmp_path / "p"), SLEEPER, hydrate_first=True)

        async def fail_at_teardown() -> None:
            await wait_for(lambda: _ready(sidecar), 20, "ready")

            async def step() -> None:
                raise failure

            sidecar._teardown.push("bases", step)

        with capture_logs() as logs:
            if code is None:
                with pytest.raises(ExceptionGroup) as info:
                    await _serving(sidecar, fail_at_teardown)
                assert info.group_contains(RuntimeError)
            else:
                assert await _serving(sidecar, fail_at_teardown) == code
        assert ("sidecar.shutdown_failed", "bases") in [(e["event"], e.get("step")) for e in logs]


async def test_teardown_runs_every_step_newest_first_and_collects_failures() -> None:
    """A failing step is logged and kept; the steps pushed before it still run."""
    ran: list[str] = []

    def step(name: str, fail: bool = False) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            ran.append(name)
            if fail:
                raise OSError(f"{name} failed")

        return run

    teardown = _Teardown()
    teardown.push("first", step("first"))
    teardown.push("second", step("second", fail=True))
    teardown.push("third", step("third"))
    with capture_logs() as logs:
        failures = await teardown.run()
    assert ran == ["third", "second", "first"]
    assert [str(f) for f in failures] == ["second failed"]
    assert [(e["event"], e["step"]) for e in logs] == [("sidecar.shutdown_failed", "second")]


async def test_build_uses_null_objects_for_disabled_features(tmp_path: Path) -> None:
    """Without REALTIME_URL, on-change rules or a command, every optional part is a null object;
    with them, the real components (the live stack once LiveLoader has loaded it)."""
    off = build(_settings(None, tmp_path / "a"), ())
    off.state.close()
    assert isinstance(off.live, NoLive)
    assert isinstance(off.local, NoLocalChanges)
    assert isinstance(off.hooks, NoHooks)
    assert isinstance(off.child, NoChild)
    async with MemoryStack() as stack:
        on = build(
            _settings(
                stack, tmp_path / "b", SIDECAR_LOCAL_CHANGES="true", SIDECAR_ON_CHANGE="*=true"
            ),
            SLEEPER,
        )
        assert isinstance(on.live, LiveLoader)
        assert on.live.loaded is None
        assert isinstance(on.local, LocalChangesLater)
        assert isinstance(on.hooks, OnChangeHooks)
        assert isinstance(on.child, Supervisor)
        loaded: LoadedLive | None = None
        try:  # its tasks run in the group until it ends
            async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
                on.live.start(tg)
                loaded = await on.live.wait_loaded()
                raise _Loaded
        except* _Loaded:
            pass
        on.state.close()
        await on.live.close()
    assert loaded is not None
    assert isinstance(loaded.live, Live)
    assert isinstance(loaded.live.subscription, Subscription)
    assert loaded.live.engine.link is loaded.live.subscription
    assert isinstance(loaded.local, LocalChanges)
    assert loaded.applier.before_publish is not None
    assert loaded.http.closed
