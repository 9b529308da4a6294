"""What PostgREST does in the database for `POST /rpc/<fn>`, over a psycopg connection.

One request is one READ COMMITTED transaction on a connection logged in as `authenticator`:
`set_config('role', <role claim or anon>, true)`, `request.jwt.claims` = the verified claims with
`role` set, `request.method`, `request.path`, `request.headers` (PostgREST's `txVarQuery` in
src/library/PostgREST/Query/PreQuery.hs), then the function called with named arguments
(`"public"."fn"("a" := ...)`). `call_rpc` returns the JSON PostgREST would send and its status,
or raises `RpcError` with PostgREST's status and `{code, message, details, hint}` body
(`mapSQLtoHTTP` in Error.hs). Used by the gateway (sidecar/testing/gateway.py) and by the SQL
tests, so both see exactly the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from sidecar.testing.postgrest_auth import RpcError

__all__ = ["FunctionInfo", "RpcError", "call_rpc", "http_status", "lookup_function"]


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """The schema-cache entry PostgREST keeps for one function."""

    name: str
    args: tuple[tuple[str, str], ...]  # (name, type) of the input arguments
    required: frozenset[str]
    returns_set: bool
    returns_void: bool
    volatile: bool


async def lookup_function(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    given: frozenset[str],
    cache: dict[tuple[str, frozenset[str]], FunctionInfo] | None = None,
) -> FunctionInfo:
    """The public function `name` whose arguments fit the given names (PGRST202 if none).

    `cache` plays PostgREST's schema cache (functions are looked up once per argument set).
    """
    if cache is not None and (name, given) in cache:
        return cache[(name, given)]
    rows = await (
        await conn.execute(
            """
            select p.proargnames, p.proargmodes, p.proargtypes::regtype[]::text[],
                   p.pronargs, p.pronargdefaults, p.proretset, p.prorettype = 'void'::regtype,
                   p.provolatile = 'v'
              from pg_proc p
             where p.pronamespace = 'public'::regnamespace and p.proname = %s
            """,
            (name,),
        )
    ).fetchall()
    for names, modes, types, nargs, ndefaults, retset, void, volatile in rows:
        in_names = [
            n for i, n in enumerate(names or []) if modes is None or modes[i] in ("i", "b", "v")
        ][:nargs]
        args = tuple(zip(in_names, types, strict=True))
        required = frozenset(in_names[: nargs - ndefaults])
        if required <= given <= frozenset(in_names):
            info = FunctionInfo(name, args, required, bool(retset), bool(void), bool(volatile))
            if cache is not None:
                cache[(name, given)] = info
            return info
    raise RpcError(
        404,
        "PGRST202",
        f"Could not find the function public.{name}({', '.join(sorted(given))}) in the "
        "schema cache",
        hint=None,
    )


async def call_rpc(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    args: dict[str, Any],
    claims: dict[str, Any] | None,
    *,
    headers: dict[str, str] | None = None,
    cache: dict[tuple[str, frozenset[str]], FunctionInfo] | None = None,
) -> tuple[int, Any]:
    """Run one RPC the way PostgREST does; (status, JSON body or None for 204).

    `conn` must be an idle connection logged in as `authenticator` (autocommit off).
    `claims` are the verified JWT claims, None when the request had no token (anon).
    With a `cache` (see lookup_function) the transaction is pipelined: one round trip for
    BEGIN, the settings and the call, one for COMMIT.

    Raises:
        RpcError: PostgREST's answer for the failure (status + body).
    """
    had_jwt = claims is not None
    role = str((claims or {}).get("role") or "anon")
    full_claims = {**(claims or {}), "role": role}
    try:
        given = frozenset(args)
        if cache is not None and (name, given) in cache:
            info = cache[(name, given)]
        else:
            async with conn.transaction():
                info = await lookup_function(conn, name, given, cache)
        async with conn.pipeline(), conn.transaction():
            await conn.execute(
                "select set_config('search_path', '\"public\"', true),"
                " set_config('role', %s, true),"
                " set_config('request.jwt.claims', %s, true),"
                " set_config('request.method', 'POST', true),"
                " set_config('request.path', %s, true),"
                " set_config('request.headers', %s, true),"
                " set_config('request.cookies', '{}', true)",
                (
                    role,
                    json.dumps(full_claims),
                    f"/rpc/{name}",
                    json.dumps({k.lower(): v for k, v in (headers or {}).items()}),
                ),
            )
            call = _call_sql(info, args)
            params = [_param(args[n]) for n, _ in info.args if n in args]
            row = await (await conn.execute(call, params)).fetchone()
    except psycopg.Error as exc:
        raise _rpc_error(exc, had_jwt) from exc
    if info.returns_void:
        return 204, None
    value = None if row is None else row[0]
    return 200, value


def _call_sql(info: FunctionInfo, args: dict[str, Any]) -> sql.Composed:
    named = sql.SQL(", ").join(
        sql.SQL("{} := %s::{}").format(sql.Identifier(n), sql.SQL(t))  # t: a regtype's name
        for n, t in info.args
        if n in args
    )
    fn = sql.SQL("{}.{}({})").format(sql.Identifier("public"), sql.Identifier(info.name), named)
    if info.returns_set:
        return sql.SQL("select coalesce(json_agg(r), '[]'::json) from {} r").format(fn)
    return sql.SQL("select to_json({})").format(fn)


def _param(value: Any) -> str | None:
    # Arguments reach the function as text cast to the parameter type, as json_to_record does.
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value)


def http_status(sqlstate: str | None, *, had_jwt: bool) -> int:
    """PostgREST's HTTP status for a SQLSTATE (mapSQLtoHTTP)."""
    code = sqlstate or ""
    if code.startswith("PT") and len(code) == 5 and code[2:].isdigit():
        return int(code[2:])
    if code == "P0001":
        return 400
    if code.startswith("P0"):
        return 500
    if code == "42501":
        return 403 if had_jwt else 401
    if code in {"23503", "23505"}:
        return 409
    if code.startswith("40") or code == "57014":
        return 500
    if code == "25006":
        return 405
    if code in {"42883", "42P01"}:
        return 404
    if code.startswith(("08", "53")):
        return 503
    if code.startswith(("0L", "0P", "28")):
        return 403  # invalid grantor / role specification / authorization specification
    return 400


def _rpc_error(exc: psycopg.Error, had_jwt: bool) -> RpcError:
    diag = exc.diag
    code = exc.sqlstate
    message = diag.message_primary or str(exc)
    if code == "22023" and message.startswith("role ") and message.endswith("does not exist"):
        return RpcError(401, code, message)  # an unknown role claim
    return RpcError(
        http_status(code, had_jwt=had_jwt),
        code,
        message,
        details=diag.message_detail,
        hint=diag.message_hint,
    )
