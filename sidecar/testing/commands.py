"""The real CLI as a subprocess, for the demo and the tests: `python -m sidecar ARGS`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping

__all__ = ["sidecar_command"]


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
