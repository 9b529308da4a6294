"""`sidecar token mint`: the real command, checked by the gateway (RpcServer) and the Realtime
test server, with HS256 (legacy secret) and ES256 (signing key verified through a JWKS)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from sidecar.orch.token import SigningKey, mint_token, parse_ttl, signing_key_from_env
from sidecar.testing.realtime.server import Knobs, Policy, RealtimeServer
from sidecar.testing.rpc_server import RpcServer

SECRET = "orchestrator-test-secret-" + "x" * 24
PROJECT = str(uuid.uuid4())
OTHER = str(uuid.uuid4())


def es256_keys(kid: str = "key-1") -> tuple[dict[str, Any], dict[str, Any]]:
    """(private JWK with kid, as `supabase gen signing-key` prints it; public JWKS)."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private))
    jwk.update(kid=kid, alg="ES256", use="sig", key_ops=["sign", "verify"])
    public: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    public.update(kid=kid, alg="ES256", use="sig")
    return jwk, {"keys": [public]}


def mint_cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "LOG_"))}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "token", "mint", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def project_policy(claims: Mapping[str, Any], topic: str) -> Policy:
    """The migration's realtime.messages policy: a project token reads its own channel only."""
    mine = topic == f"project:{claims.get('project_id')}"
    return Policy(read=mine, write=False)


@pytest.fixture
async def stack() -> AsyncIterator[tuple[RealtimeServer, RpcServer, dict[str, Any]]]:
    """Realtime + gateway sharing the legacy secret and a JWKS with one ES256 key."""
    jwk, jwks = es256_keys()
    knobs = Knobs(channel_error_backoff=0.02, connect_error_backoff=0.0)
    async with (
        RealtimeServer(jwt_secret=SECRET, jwks=jwks, knobs=knobs, policy=project_policy) as rt,
        RpcServer(realtime=rt) as rpc,
    ):
        yield rt, rpc, jwk


async def rpc_call(rpc: RpcServer, name: str, token: str, project: str) -> tuple[int, Any]:
    args: dict[str, Any] = {"project_uuid": project}
    if name == "upsert_project_file":
        args |= {"p_file_path": "a.txt", "p_content": "hello", "p_file_type": "text"}
    headers = {"apikey": rpc.anon_key, "Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{rpc.url}/rest/v1/rpc/{name}", json=args, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def join_state(rt: RealtimeServer, token: str, project: str) -> RealtimeSubscribeStates:
    """Subscribe the real realtime-py client to project:<project>; its first final state."""
    client = AsyncRealtimeClient(rt.url, token=rt.anon_key)
    states: list[RealtimeSubscribeStates] = []
    try:
        await client.set_auth(token)
        params: Any = {"config": {"private": True}}
        ch = client.channel(f"project:{project}", params)
        await ch.subscribe(lambda state, _err: states.append(state))
        deadline = time.monotonic() + 10
        while not states and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert states, "no subscribe state within 10 s"
        return states[0]
    finally:
        await client.close()
        for channel in list(client.channels.values()):
            channel.rejoin_timer.reset()


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
async def test_minted_token_is_scoped_to_its_project(
    stack: tuple[RealtimeServer, RpcServer, dict[str, Any]], alg: str
) -> None:
    """Accepted by the gateway and Realtime for its project, refused for another; read-only
    cannot write; the claims are exactly the scoped ones (no sub, never service_role)."""
    rt, rpc, jwk = stack
    env = {"SUPABASE_JWT_SECRET": SECRET}
    if alg == "ES256":
        env = {"SUPABASE_JWT_SIGNING_KEY": json.dumps(jwk)}
    proc = mint_cli(env, "--project", PROJECT, "--session", "sess-1", "--ttl", "15m")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert token.count(".") == 2
    assert token not in proc.stderr  # logs never carry the token
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg
    assert header.get("kid") == (jwk["kid"] if alg == "ES256" else None)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"aud", "role", "iat", "exp", "project_id", "session_id", "read_only"}
    assert claims["role"] == "authenticated"
    assert claims["exp"] - claims["iat"] == 900
    assert (claims["project_id"], claims["session_id"], claims["read_only"]) == (
        PROJECT,
        "sess-1",
        False,
    )

    assert (await rpc_call(rpc, "upsert_project_file", token, PROJECT))[0] == 200
    assert (await rpc_call(rpc, "list_current_files", token, PROJECT))[0] == 200
    status, body = await rpc_call(rpc, "list_current_files", token, OTHER)
    assert (status, body["code"]) == (403, "42501")
    assert await join_state(rt, token, PROJECT) == RealtimeSubscribeStates.SUBSCRIBED
    assert await join_state(rt, token, OTHER) == RealtimeSubscribeStates.CHANNEL_ERROR

    proc = mint_cli(env, "--project", PROJECT, "--session", "s2", "--ttl", "60", "--read-only")
    assert proc.returncode == 0, proc.stderr
    read_only = proc.stdout.strip()
    status, body = await rpc_call(rpc, "upsert_project_file", read_only, PROJECT)
    assert (status, body["code"]) == (403, "42501")
    assert (await rpc_call(rpc, "list_current_files", read_only, PROJECT))[0] == 200


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
async def test_expired_token_is_refused(
    stack: tuple[RealtimeServer, RpcServer, dict[str, Any]], alg: str
) -> None:
    """A token past its exp: 401 PGRST303 at the gateway, refused by Realtime."""
    rt, rpc, jwk = stack
    env = {"SUPABASE_JWT_SECRET": SECRET} if alg == "HS256" else {}
    if alg == "ES256":
        env = {"SUPABASE_JWT_SIGNING_KEY": json.dumps(jwk)}
    key = signing_key_from_env(env)
    token = mint_token(key, project_id=PROJECT, session_id="s", ttl=60, now=time.time() - 3600)
    status, body = await rpc_call(rpc, "list_current_files", token, PROJECT)
    assert (status, body["code"]) == (401, "PGRST303")
    assert rt.verify_token(token).kind == "expired"  # type: ignore[union-attr]
    assert await join_state(rt, token, PROJECT) == RealtimeSubscribeStates.CHANNEL_ERROR


async def test_es256_needs_the_key_in_the_jwks(
    stack: tuple[RealtimeServer, RpcServer, dict[str, Any]],
) -> None:
    """A signing key the servers do not trust (unknown kid) is refused by both."""
    rt, rpc, _ = stack
    stranger, _ = es256_keys(kid="not-imported")
    token = mint_token(
        signing_key_from_env({"SUPABASE_JWT_SIGNING_KEY": json.dumps(stranger)}),
        project_id=PROJECT,
        session_id="s",
        ttl=60,
    )
    assert (await rpc_call(rpc, "list_current_files", token, PROJECT))[0] == 401
    assert rt.verify_token(token).kind == "signer"  # type: ignore[union-attr]


def test_refusals_are_one_line_config_errors(tmp_path: Path) -> None:
    """service_role, a non-UUID sub or project, no key at all: exit 78 with the reason."""
    env = {"SUPABASE_JWT_SECRET": SECRET}
    cases: list[tuple[dict[str, str], list[str], str]] = [
        (env, ["--project", PROJECT, "--session", "s", "--role", "service_role"], "service_role"),
        (env, ["--project", PROJECT, "--session", "s", "--sub", "user-7"], "--sub must be a UUID"),
        (env, ["--project", "p1", "--session", "s"], "--project must be a UUID"),
        (env, ["--project", PROJECT, "--session", "s", "--ttl", "forever"], "--ttl"),
        ({}, ["--project", PROJECT, "--session", "s"], "SUPABASE_JWT_SIGNING_KEY"),
        ({"SUPABASE_JWT_SECRET": "short"}, ["--project", PROJECT, "--session", "s"], "32"),
    ]
    for case_env, args, reason in cases:
        proc = mint_cli(case_env, *args)
        assert proc.returncode == 78, (args, proc.stderr)
        assert proc.stdout == ""
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("sidecar: error:"), last
        assert reason in last, last
    public = es256_keys()[1]["keys"][0]
    proc = mint_cli(
        {"SUPABASE_JWT_SIGNING_KEY": json.dumps(public)}, "--project", PROJECT, "--session", "s"
    )
    assert proc.returncode == 78
    assert "public key" in proc.stderr


def test_sub_only_as_a_uuid() -> None:
    user = str(uuid.uuid4())
    token = mint_token(
        SigningKey("HS256", SECRET), project_id=PROJECT, session_id="s", ttl=60, sub=user.upper()
    )
    assert jwt.decode(token, SECRET, algorithms=["HS256"], audience="authenticated")["sub"] == user


def test_ttl_parsing() -> None:
    assert [parse_ttl(t) for t in ("15m", "900", "900s", "1h", "1.5m")] == [900, 900, 900, 3600, 90]
    for bad in ("0", "25h", "-1m", "15 minutes", ""):
        with pytest.raises(ValueError, match="--ttl"):
            parse_ttl(bad)


def test_out_replaces_the_file_atomically_with_mode_0600(tmp_path: Path) -> None:
    """--out: the old token until the rename, then the new one; 0600; no temp file left."""
    out = tmp_path / "token"
    out.write_text("old-token\n")
    out.chmod(0o644)
    old_inode = out.stat().st_ino
    proc = mint_cli(
        {"SUPABASE_JWT_SECRET": SECRET}, "--project", PROJECT, "--session", "s", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    token = out.read_text().strip()
    assert (
        jwt.decode(token, SECRET, algorithms=["HS256"], audience="authenticated")["project_id"]
        == PROJECT
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]
    assert out.stat().st_ino != old_inode  # renamed over, never rewritten in place
