"""The authorization matrix on a real PostgreSQL: the RPCs as PostgREST calls them, and the
private channel as Realtime checks it (the RLS probe of sidecar/testing/realtime/database.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from sidecar.testing.realtime.database import ChannelAccess, RlsPolicyError, authorize_channel

from ..pgfixtures import Db

pytestmark = pytest.mark.pg


def tokens(project: str) -> dict[str, dict[str, Any] | None]:
    return {
        "own": {"role": "authenticated", "project_id": project, "session_id": "s"},
        "other": {"role": "authenticated", "project_id": str(uuid.uuid4()), "session_id": "s"},
        "read_only": {
            "role": "authenticated",
            "project_id": project,
            "session_id": "s",
            "read_only": True,
        },
        "no_claim": {"role": "authenticated", "sub": str(uuid.uuid4())},
        "anon_jwt": {"role": "anon"},
        "no_jwt": None,
        "service": {"role": "service_role"},
    }


# who -> (read status, write status) through PostgREST.
RPC_MATRIX = {
    "own": (200, 200),
    "other": (403, 403),
    "read_only": (200, 403),
    "no_claim": (403, 403),
    "anon_jwt": (403, 403),
    "no_jwt": (401, 401),
    "service": (200, 200),
}

# who -> (read, write) at join, as Realtime evaluates the realtime.messages policies.
JOIN_MATRIX = {
    "own": ChannelAccess(read=True, write=False),
    "other": ChannelAccess(read=False, write=False),
    "read_only": ChannelAccess(read=True, write=False),
    "no_claim": ChannelAccess(read=False, write=False),
    "anon_jwt": ChannelAccess(read=False, write=False),
    "service": ChannelAccess(read=True, write=True),
}


@pytest.mark.parametrize("who", list(RPC_MATRIX))
async def test_rpc_matrix(db: Db, project: str, who: str) -> None:
    claims = tokens(project)[who]
    want_read, want_write = RPC_MATRIX[who]
    await db.call(
        "upsert_project_file",
        {"role": "service_role"},
        project_uuid=project,
        p_file_path="seed",
        p_content="seed",
    )
    reads: dict[str, dict[str, object]] = {
        "get_project_file": {"p_file_path": "seed"},
        "list_current_files": {},
        "project_snapshot": {},
        "project_events_since": {"after_seq": 0},
        "request_snapshot": {},
    }
    for fn, args in reads.items():
        status, body = await db.call(fn, claims, project_uuid=project, **args)
        assert status == want_read, (fn, body)
        if status != 200:
            assert body["code"] == "42501"
    writes: dict[str, dict[str, object]] = {
        "upsert_project_file": {"p_file_path": "w", "p_content": f"by {who}"},
        "delete_project_file": {"p_file_path": "seed"},
        "bulk_upsert_project_files": {"files": [{"file_path": "b", "content": who}]},
        "report_local_change": {"payload": {"file_path": "w"}},
    }
    for fn, args in writes.items():
        status, body = await db.call(fn, claims, project_uuid=project, **args)
        assert status == (
            204 if fn == "report_local_change" and want_write == 200 else want_write
        ), (
            fn,
            body,
        )
        if status >= 400:
            assert body["code"] == "42501"
    # A refused caller left nothing behind: only the service role's seed (and, for writers,
    # their own writes) are in the log.
    [(n,)] = await db.sql("select count(*) from sidecar.events where project_id = %s", project)
    assert n == (1 if want_write != 200 else 4)


@pytest.mark.parametrize("who", list(RPC_MATRIX))
async def test_table_reads_follow_the_same_rule(db: Db, project: str, who: str) -> None:
    """An editor reading project_files / project_files_current directly (supabase-js) sees only
    its project; nobody but the RPCs writes the table."""
    await db.call(
        "upsert_project_file",
        {"role": "service_role"},
        project_uuid=project,
        p_file_path="seed",
        p_content="seed",
    )
    claims = tokens(project)[who]
    role = "anon" if claims is None else str(claims["role"])

    conn = await db.connect_api()
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute(
                "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                (role, json.dumps({**(claims or {}), "role": role})),
            )
            try:
                rows = await (
                    await conn.execute(
                        "select file_path from public.project_files_current where project_id = %s",
                        (project,),
                    )
                ).fetchall()
            except psycopg.errors.InsufficientPrivilege:
                rows = []
        visible = [r[0] for r in rows]
        assert visible == (["seed"] if RPC_MATRIX[who][0] == 200 else [])
        if role != "service_role":

            async def write_directly() -> None:
                async with conn.transaction(force_rollback=True):
                    await conn.execute(
                        "select set_config('role', %s, true),"
                        " set_config('request.jwt.claims', %s, true)",
                        (role, json.dumps({**(claims or {}), "role": role})),
                    )
                    await conn.execute(
                        "update public.project_files set content = 'x' where project_id = %s",
                        (project,),
                    )

            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await write_directly()
    finally:
        await conn.close()


@pytest.mark.parametrize("who", list(JOIN_MATRIX))
async def test_join_matrix(db: Db, project: str, who: str) -> None:
    claims = tokens(project)[who]
    assert claims is not None
    with psycopg.connect(db.cluster.dsn("supabase_admin")) as conn:
        access = authorize_channel(conn, f"project:{project}", claims)
        assert access == JOIN_MATRIX[who]
        # Another project's channel is never readable by a project token.
        other = authorize_channel(conn, f"project:{uuid.uuid4()}", claims)
        assert other.read == (who == "service")
    # The probes were rolled back: nothing stored.
    assert (
        await db.sql("select 1 from realtime.messages where topic = %s", f"project:{project}") == []
    )


async def test_join_refused_for_an_unknown_role(db: Db, project: str) -> None:
    with (
        psycopg.connect(db.cluster.dsn("supabase_admin")) as conn,
        pytest.raises(RlsPolicyError, match="22023"),
    ):
        authorize_channel(conn, f"project:{project}", {"role": "nobody", "project_id": project})
    status, body = await db.call(
        "get_project_file", {"role": "nobody"}, project_uuid=project, p_file_path="x"
    )
    assert (status, body["code"]) == (401, "22023")


async def test_client_broadcast_option_lets_only_editor_tokens_write(db: Db, project: str) -> None:
    """The opt-in policy (sidecar db sql --allow-client-broadcast): an `editor` token may
    broadcast on its own channel; container tokens still may not."""
    from sidecar.sql import option_sql

    topic = f"project:{project}"
    editor = {"role": "authenticated", "project_id": project, "editor": True}
    container = {"role": "authenticated", "project_id": project}
    other = {"role": "authenticated", "project_id": str(uuid.uuid4()), "editor": True}
    with psycopg.connect(db.cluster.dsn("postgres")) as conn:
        # Applied in a transaction that is rolled back: the other tests keep the default. The
        # checks run on the same connection (savepoints) so that they see the policy.
        with conn.transaction(force_rollback=True):
            conn.execute(option_sql("client_broadcast").encode())
            assert authorize_channel(conn, topic, editor) == ChannelAccess(read=True, write=True)
            assert authorize_channel(conn, topic, container) == ChannelAccess(
                read=True, write=False
            )
            assert authorize_channel(conn, topic, other).write is False
        assert authorize_channel(conn, topic, editor).write is False
