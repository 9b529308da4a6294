"""A minted token against the PostgREST-style gateway over the real database (the migration's
sidecar.authorize): its project only, never after exp, read-only cannot write."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sidecar.orch.token import mint_token, signing_key_from_env
from sidecar.testing.gateway import Gateway
from sidecar.testing.postgres import PostgresCluster

from .test_token import es256_keys

pytestmark = pytest.mark.pg


JWK, JWKS = es256_keys()


@pytest.fixture
async def gateway(pg_cluster: PostgresCluster) -> AsyncIterator[Gateway]:
    async with Gateway(pg_cluster.dsn("authenticator"), jwks=JWKS) as gw:
        yield gw


async def rpc(gateway: Gateway, token: str, fn: str, **args: Any) -> tuple[int, Any]:
    headers = {"apikey": gateway.anon_key, "Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gateway.url}/rest/v1/rpc/{fn}", json=args, headers=headers) as r,
    ):
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None)


async def mint_cli(key: dict[str, str], *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPABASE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "token",
        "mint",
        *args,
        env=env | key,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
async def test_minted_token_through_the_gateway(gateway: Gateway, alg: str) -> None:
    """HS256 with the legacy secret, ES256 with a signing key the gateway has in its JWKS."""
    key = (
        {"SUPABASE_JWT_SECRET": gateway.jwt_secret}
        if alg == "HS256"
        else {"SUPABASE_JWT_SIGNING_KEY": json.dumps(JWK)}
    )
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    for pid in (mine, other):
        await gateway.register_project(pid)
    token = await mint_cli(key, "--project", mine, "--session", "s-1")
    status, body = await rpc(
        gateway,
        token,
        "upsert_project_file",
        project_uuid=mine,
        p_file_path="a.txt",
        p_content="hi",
    )
    assert status == 200, body
    assert body["seq"] == 1
    events = await rpc(gateway, token, "project_events_since", project_uuid=mine, after_seq=0)
    assert events[1][0]["payload"]["sender"] == "s-1"  # session_id is the events' sender
    status, body = await rpc(gateway, token, "list_current_files", project_uuid=other)
    assert (status, body["code"]) == (403, "42501")

    read_only = await mint_cli(key, "--project", mine, "--session", "s-2", "--read-only")
    status, body = await rpc(
        gateway,
        read_only,
        "upsert_project_file",
        project_uuid=mine,
        p_file_path="b.txt",
        p_content="no",
    )
    assert (status, body["code"]) == (403, "42501")
    assert (await rpc(gateway, read_only, "list_current_files", project_uuid=mine))[0] == 200

    expired = mint_token(
        signing_key_from_env(key),
        project_id=mine,
        session_id="s",
        ttl=60,
        now=time.time() - 3600,
    )
    status, body = await rpc(gateway, expired, "list_current_files", project_uuid=mine)
    assert (status, body["code"]) == (401, "PGRST303")
