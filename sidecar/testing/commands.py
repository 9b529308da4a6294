"""The real CLI as a subprocess, for the demo and the tests: `python -m sidecar ARGS`."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["CommandTimeoutError", "sidecar_command", "spawn_sidecar", "stop_process"]


class CommandTimeoutError(TimeoutError):
    """The command ran out of time and was killed; `out` and `err` are what it had printed."""

    def __init__(self, args: Sequence[str], timeout: float, out: str, err: str) -> None:
        super().__init__(f"sidecar {list(args)} did not exit within {timeout}s")
        self.out, self.err = out, err


async def sidecar_command(
    env: Mapping[str, str],
    *args: str,
    timeout: float = 90.0,  # noqa: ASYNC109 - the process is killed when it runs out
    cwd: Path | None = None,
    wrap: Sequence[str] = (),
) -> tuple[int, str, str]:
    """Run `[*WRAP] python -m sidecar ARGS` with exactly `env`, stdin closed: (exit code,
    stdout, stderr).

    Raises CommandTimeoutError (the process killed) when it takes longer than `timeout` seconds.
    """
    proc = await asyncio.create_subprocess_exec(
        *wrap,
        sys.executable,
        "-m",
        "sidecar",
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise CommandTimeoutError(args, timeout, _text(out), _text(err)) from None
    assert proc.returncode is not None
    return proc.returncode, _text(out), _text(err)


def _text(data: bytes) -> str:
    return data.decode(errors="replace")


async def spawn_sidecar(
    env: Mapping[str, str], *args: str, log: Path
) -> asyncio.subprocess.Process:
    """Start `python -m sidecar ARGS` with exactly `env` in the background (a worker, a
    container), stdin closed, stdout and stderr written to `log`."""
    with log.open("wb") as out:  # the child holds its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            *args,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited after `grace` seconds; its exit status."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
        except TimeoutError:
            proc.kill()
    return await proc.wait()
