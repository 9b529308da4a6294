"""Fixtures for tests on a real PostgreSQL (`pg` marker); conftest files re-export them.

One cluster per test session (about 2 s), with the Supabase shim and the migration applied;
tests isolate themselves with fresh project uuids rather than fresh databases. Without the
server binaries the tests fail when CI=true and skip with the reason elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from sidecar.testing.pgrst import RpcError, call_rpc
from sidecar.testing.postgres import SUPERUSER, PostgresCluster, start_cluster, unavailable_reason

__all__ = ["Db", "db", "pg_cluster", "project"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """The session's cluster (shim + migration applied)."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Db:
    """Connections to the session cluster: PostgREST-style calls and superuser SQL."""

    cluster: PostgresCluster
    admin: psycopg.AsyncConnection[Any]
    api: psycopg.AsyncConnection[Any]

    async def call(self, fn: str, claims: dict[str, Any] | None, **args: Any) -> tuple[int, Any]:
        """One RPC as PostgREST runs it; (status, body) for success and failure alike."""
        try:
            return await call_rpc(self.api, fn, args, claims)
        except RpcError as exc:
            return exc.status, exc.body

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """A query as the superuser (autocommit)."""
        cur = await self.admin.execute(query.encode(), params or None)
        return await cur.fetchall() if cur.description else []

    async def connect_api(self) -> psycopg.AsyncConnection[Any]:
        """A new connection as `authenticator` (the caller closes it)."""
        return await psycopg.AsyncConnection.connect(self.cluster.dsn("authenticator"))


@pytest.fixture
async def db(pg_cluster: PostgresCluster) -> AsyncIterator[Db]:
    admin = await psycopg.AsyncConnection.connect(pg_cluster.dsn(SUPERUSER), autocommit=True)
    api = await psycopg.AsyncConnection.connect(pg_cluster.dsn("authenticator"))
    try:
        yield Db(pg_cluster, admin, api)
    finally:
        await api.close()
        await admin.close()


@pytest.fixture
async def project(db: Db) -> str:
    """A freshly registered project's uuid."""
    pid = str(uuid.uuid4())
    status, _ = await db.call("register_project", {"role": "service_role"}, project_uuid=pid)
    assert status == 200
    return pid
