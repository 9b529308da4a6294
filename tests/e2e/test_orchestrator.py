"""The orchestrator's chain end to end on a real PostgreSQL: `sidecar snapshot publish` and
`sidecar token mint` give the container its environment, `sidecar snapshot worker` answers the
containers' snapshot requests (made through the database with their scoped tokens), and every
real `sidecar run` converges on the database's files."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from sidecar.testing.pgstack import PgStack
from sidecar.testing.postgres import PostgresCluster

from .e2e_stack import SAMPLE, running_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

BUCKET = "project-snapshots"


@pytest.fixture
async def stack(pg_cluster: PostgresCluster) -> AsyncIterator[PgStack]:
    async with PgStack(pg_cluster, SAMPLE) as s:
        s.snaps.buckets.add(BUCKET)
        yield s


def orchestrator_env(stack: PgStack) -> dict[str, str]:
    """What the orchestrator holds: the database URL, the service key, the JWT secret."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SUPABASE_", "SIDECAR_", "DATABASE_", "SNAPSHOT_", "REALTIME_"))
    }
    return base | {
        "DATABASE_URL": stack.cluster.url("postgres"),
        "SUPABASE_URL": stack.snaps.base_url,
        "SUPABASE_SERVICE_ROLE_KEY": stack.snaps.service_role_key,
        "SUPABASE_JWT_SECRET": stack.rt.jwt_secret,
        "LOG_FORMAT": "json",
    }


async def command(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_publish_mint_worker_and_two_containers_converge(
    stack: PgStack, tmp_path: Path
) -> None:
    """Container A starts from `snapshot publish`'s URL with a minted token; container B's URL
    has expired, so it asks the database for a snapshot and the worker's snapshot:ready (sent
    by realtime.send, so with meta.id) hydrates it. Both then follow the editor's writes."""
    env = orchestrator_env(stack)
    out = await command(env, "snapshot", "publish", "--project", stack.project)
    published = dict(line.split("=", 1) for line in out.strip().splitlines())
    tokens = [
        (await command(env, "token", "mint", "--project", stack.project, "--session", s)).strip()
        for s in ("box-a", "box-b")
    ]
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "snapshot",
        "worker",
        "--sweep-interval",
        "1",
        env=env,
        stdout=worker_log,
        stderr=worker_log,
    )
    worker_log.close()
    try:
        expired = stack.snaps.url_for("gone.tar.zst", expires_in=-60)
        async with AsyncExitStack() as containers:
            a = await containers.enter_async_context(
                running_sidecar(
                    stack,  # type: ignore[arg-type]
                    tmp_path,
                    name="a",
                    token=tokens[0],
                    snapshot=(published["SNAPSHOT_URL"], published["SNAPSHOT_SHA256"]),
                    upstream=True,
                )
            )
            b = await containers.enter_async_context(
                running_sidecar(
                    stack,  # type: ignore[arg-type]
                    tmp_path,
                    name="b",
                    token=tokens[1],
                    snapshot=(expired, ""),
                    upstream=True,
                    env_overrides={"SNAPSHOT_SHA256": None},
                    ready_timeout=60,
                )
            )
            want = await stack.files()
            assert a.tree() == want
            assert b.tree() == want
            assert b.events("sync.snapshot_requested")  # the expired URL: asked the database
            assert b.events("sync.snapshot_ready_received")  # and the worker's answer came
            assert not a.events("sync.snapshot_requested")
            await stack.editor_upsert("src/app.js", b"export const v = 3;\n")
            await stack.editor_delete("notes.txt")
            want = await stack.files()
            await a.wait_tree(lambda: want)
            await b.wait_tree(lambda: want)
        answered = (tmp_path / "worker.log").read_text()
        assert '"event": "worker.answered"' in answered
        assert "token=" not in answered
    finally:
        worker.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await worker.wait() == 0


async def test_token_mint_out_rotates_a_running_containers_token(
    stack: PgStack, tmp_path: Path
) -> None:
    """The orchestrator re-mints with `--out` onto REALTIME_TOKEN_FILE before the short token's
    exp: the sidecar pushes the new token to its channel, which outlives the old exp."""
    import jwt

    from .e2e_stack import until_wall_clock

    env = orchestrator_env(stack)
    out = await command(env, "snapshot", "publish", "--project", stack.project)
    published = dict(line.split("=", 1) for line in out.strip().splitlines())
    token_path = tmp_path / "secrets" / "token"
    token_path.parent.mkdir()
    mint = ("token", "mint", "--project", stack.project, "--session", "box-r")
    await command(env, *mint, "--ttl", "12s", "--out", str(token_path))
    first = token_path.read_text().strip()
    exp = jwt.decode(first, options={"verify_signature": False})["exp"]
    async with running_sidecar(
        stack,  # type: ignore[arg-type]
        tmp_path,
        name="r",
        token_file=token_path,
        snapshot=(published["SNAPSHOT_URL"], published["SNAPSHOT_SHA256"]),
    ) as sc:
        assert time.time() < exp - 2, "the sidecar took too long to start for this scenario"
        refreshes = stack.rt.counters.refreshes
        await command(env, *mint, "--ttl", "15m", "--out", str(token_path))
        assert token_path.read_text().strip() != first
        await sc.wait(lambda: stack.rt.counters.refreshes > refreshes, "new token pushed")
        await until_wall_clock(exp + 1.5)
        await stack.editor_upsert("after-exp.txt", b"after the first token's exp\n")
        await sc.wait_file("after-exp.txt", b"after the first token's exp\n")
        await sc.wait_ready()
