"""The real CLI as a subprocess, for the demo and the tests: `python -m sidecar ARGS`."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["sidecar_command", "spawn_sidecar", "stop_process"]


async def sidecar_command(
    env: Mapping[str, str],
    *args: str,
    timeout: float = 90.0,  # noqa: ASYNC109 - the process is killed when it runs out
) -> tuple[int, str, str]:
    """Run `python -m sidecar ARGS` with exactly `env`: (exit code, stdout, stderr).

    Raises TimeoutError (the process killed) when it takes longer than `timeout` seconds.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


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
