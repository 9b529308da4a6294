"""`sidecar db sql` prints the migration; applying it again over live data is safe."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from sidecar.sql import migration_sql

from ..pgfixtures import Db

pytestmark = pytest.mark.pg


def sidecar_db_sql(*extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "db", "sql", *extra],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},  # needs no configuration at all
    )
    return proc.stdout


def test_prints_the_packaged_migration() -> None:
    out = sidecar_db_sql()
    assert out == migration_sql()
    assert "create or replace function public.upsert_project_file" in out
    assert "editor token broadcasts" not in out
    assert "editor token broadcasts" in sidecar_db_sql("--allow-client-broadcast")


async def test_reapplying_keeps_data_and_behaviour(db: Db, project: str) -> None:
    claims = {"role": "authenticated", "project_id": project}
    args = {"project_uuid": project, "p_file_path": "a"}
    await db.call("upsert_project_file", claims, **args, p_content="1")
    async with await psycopg.AsyncConnection.connect(db.cluster.dsn("postgres")) as conn:
        await conn.execute(sidecar_db_sql().encode())
    status, body = await db.call("upsert_project_file", claims, **args, p_content="2")
    assert (status, body["version"], body["seq"]) == (200, 2, 2)
    # Still no right for anon after the re-run (grants are re-revoked).
    status, _ = await db.call("get_project_file", None, **args)
    assert status == 401
