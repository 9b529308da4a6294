"""A PostgREST-compatible RPC gateway over a real PostgreSQL, for tests, the demo and compose.

`POST /rest/v1/rpc/<fn>` (and `/rpc/<fn>`, PostgREST's own path) with a JSON object of named
arguments. What happens is what Supabase's gateway and PostgREST do:

1. The `apikey` header must be a JWT signed with the project's secret (Kong's key check);
   missing: 401. `Authorization: Bearer <jwt>` is verified with PyJWT (HS256; `exp`/`nbf`/`iat`
   with 30 s of leeway, `aud` not checked, as PostgREST without `jwt-aud`); bad: 401 PGRST301,
   expired: 401 PGRST303. No Authorization header means the anon role.
2. One READ COMMITTED transaction on a connection logged in as `authenticator`, with `role`,
   `request.jwt.claims`, `request.method`, `request.path`, `request.headers` set locally, and the
   function called with named arguments (sidecar/testing/pgrst.py).
3. The answer: the function's JSON (200), 204 for `void`, or PostgREST's error body
   `{code, message, details, hint}` with its status for the SQLSTATE.

Versions, conflicts, seq and broadcasts all come from the SQL (sidecar/sql/); the gateway only
transports. `faults` inject the same transport failures as the in-memory RpcServer's;
`faults.content_trickle` slows the answers of `get_project_file`, the call that fetches the
bodies too large for an event (the migration's counterpart of the RpcServer's content_url).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import jwt
import psycopg
import structlog
from aiohttp import web
from psycopg.pq import TransactionStatus

from sidecar.testing._server import LoopbackServer, until_terminated
from sidecar.testing.pgrst import FunctionInfo, call_rpc
from sidecar.testing.postgrest_auth import RpcError, TokenIssuer, decode_token
from sidecar.testing.rpc_server import RpcFaults

__all__ = ["Gateway", "main"]

log = structlog.get_logger(component="gateway")

_LEEWAY = 30  # seconds, as PostgREST
_MAX_IDLE = 8


class Gateway(TokenIssuer, LoopbackServer):
    """PostgREST-style RPC endpoint over PostgreSQL; an async context manager.

    Args:
        dsn: libpq connection string of the `authenticator` login role.
        jwt_secret: HS256 secret of tokens (default: random; read `.jwt_secret`).
        anon_key: the accepted `apikey` (default: an anon JWT signed with the secret).
    """

    def __init__(
        self,
        dsn: str,
        *,
        jwt_secret: str | None = None,
        anon_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        jwks: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(host, port)
        self.dsn = dsn
        self.jwt_secret = jwt_secret or secrets.token_urlsafe(32)
        # PostgREST's `jwt-secret` as a JWKS: ES256/RS256 tokens are verified by their `kid`.
        self.jwt_jwks: Mapping[str, Any] | None = jwks
        self.anon_key = anon_key or self.make_token(None, role="anon", exp_in=10 * 365 * 86400)
        self.faults = RpcFaults()
        self.calls: list[tuple[str, int]] = []  # (function, status) for assertions
        self.rpc_seconds: list[float] = []  # time spent in the database per successful call
        self.trickled = 0  # body bytes of get_project_file answers sent under content_trickle
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._schema: dict[tuple[str, frozenset[str]], FunctionInfo] = {}  # PostgREST's cache

    # -- lifecycle --

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/rest/v1/rpc/{name}", self._handle_rpc)
        app.router.add_post("/rpc/{name}", self._handle_rpc)
        app.router.add_post("/_admin/token", self._handle_token)
        app.router.add_get("/healthz", self._handle_health)

    async def stop(self) -> None:
        await super().stop()
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    @property
    def url(self) -> str:
        """The SUPABASE_URL-like root (RPCs under /rest/v1/rpc/)."""
        return self.base_url

    # -- calls --

    async def call(
        self, name: str, args: dict[str, Any], claims: dict[str, Any] | None
    ) -> tuple[int, Any]:
        """Run one RPC with already verified claims (what an editor's request would do)."""
        async with self._connection() as conn:
            return await call_rpc(conn, name, args, claims, cache=self._schema)

    async def register_project(self, project_id: str) -> None:
        """Make a project known (register_project as the service role)."""
        await self.call("register_project", {"project_uuid": project_id}, {"role": "service_role"})

    # -- plumbing --

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = self._idle.pop() if self._idle else await psycopg.AsyncConnection.connect(self.dsn)
        try:
            yield conn
        finally:
            # An RPC error rolled its transaction back: the connection is reusable if idle.
            reusable = not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
            if reusable and len(self._idle) < _MAX_IDLE and self._runner is not None:
                self._idle.append(conn)
            else:
                await conn.close()

    def _claims(self, request: web.Request) -> dict[str, Any] | None:
        apikey = request.headers.get("apikey")
        if not apikey:
            raise RpcError(
                401,
                None,
                "No API key found in request",
                hint="No `apikey` request header or url param was found.",
            )
        try:
            jwt.decode(
                apikey,
                self.jwt_secret,
                algorithms=["HS256"],
                options={"verify_aud": False, "verify_exp": False},
            )
        except jwt.InvalidTokenError:
            raise RpcError(401, None, "Invalid API key") from None
        auth = request.headers.get("Authorization", "")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RpcError(401, "PGRST301", "No suitable key or wrong key type")
        try:
            claims = decode_token(token.strip(), self.jwt_secret, self.jwt_jwks, leeway=_LEEWAY)
        except jwt.ExpiredSignatureError:
            raise RpcError(401, "PGRST303", "JWT expired") from None
        except jwt.InvalidTokenError as exc:
            raise RpcError(401, "PGRST301", f"JWT invalid: {type(exc).__name__}") from None
        return claims

    async def _handle_rpc(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        status = 0
        try:
            if self.faults.delay:
                await asyncio.sleep(self.faults.delay)
            if self.faults.drop_first > 0:
                self.faults.drop_first -= 1
                return _drop(request)
            self.faults.raise_injected()
            claims = self._claims(request)
            args = await _arguments(request)
            started = time.perf_counter()
            headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
            async with self._connection() as conn:
                status, body = await call_rpc(
                    conn, name, args, claims, headers=headers, cache=self._schema
                )
            spent = time.perf_counter() - started
            self.rpc_seconds.append(spent)
            if self.faults.lose_response_first > 0 and name not in _READS:
                self.faults.lose_response_first -= 1
                status = 0
                return _drop(request)
            # The database's share of the request, for benchmarks (scripts/bench_db_latency).
            timing = {"Server-Timing": f"db;dur={spent * 1000:.3f}"}
            if status == 204:
                return web.Response(status=204, headers=timing)
            data = json.dumps(body).encode()
            trickle = self.faults.content_trickle
            if trickle and name == "get_project_file":
                return await self._trickle(request, status, data, trickle, timing)
            return web.Response(
                status=status,
                body=data,
                content_type="application/json",
                charset="utf-8",
                headers=timing,
            )
        except RpcError as exc:
            status = exc.status
            return web.Response(
                status=exc.status,
                body=json.dumps(exc.body).encode(),
                content_type="application/json",
                charset="utf-8",
            )
        except psycopg.OperationalError as exc:
            status = 503
            log.warning("gateway.database_unavailable", error=str(exc))
            body = {
                "code": "PGRST000",
                "message": "Could not connect with the database",
                "details": None,
                "hint": None,
            }
            return web.json_response(body, status=503)
        finally:
            self.calls.append((name, status))

    async def _trickle(
        self, request: web.Request, status: int, data: bytes, rate: float, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send `data` at about `rate` bytes per second, counting what went out in `trickled`
        (a test sees a body fetch half way); a client that goes away ends it."""
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/json"
        resp.charset = "utf-8"
        resp.content_length = len(data)
        await resp.prepare(request)
        step = max(1024, int(rate / 20))
        try:
            for at in range(0, len(data), step):
                chunk = data[at : at + step]
                await resp.write(chunk)
                self.trickled += len(chunk)
                await asyncio.sleep(len(chunk) / rate)
            await resp.write_eof()
        except ConnectionResetError:
            log.info("gateway.trickle_aborted", sent=self.trickled)
        return resp

    async def _handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


_READS = frozenset(
    {"get_project_file", "list_current_files", "project_snapshot", "project_events_since"}
)


async def _arguments(request: web.Request) -> dict[str, Any]:
    try:
        args = await request.json()
    except ValueError:
        raise RpcError(400, "PGRST102", "Empty or invalid json") from None
    if not isinstance(args, dict):
        raise RpcError(400, "PGRST102", "The request body must be a JSON object")
    return args


def _drop(request: web.Request) -> web.Response:
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)  # never reaches the client


async def _serve(args: argparse.Namespace) -> None:
    gateway = Gateway(
        args.dsn,
        jwt_secret=args.jwt_secret,
        anon_key=args.anon_key,
        host=args.host,
        port=args.port,
        jwks=json.loads(args.jwks) if args.jwks else None,
    )
    async with gateway:
        log.info("gateway.listening", url=gateway.url)
        await until_terminated()


def main(argv: list[str] | None = None) -> None:
    """Run standalone: `python -m sidecar.testing.gateway --dsn DSN --jwt-secret S --port P`."""
    p = argparse.ArgumentParser(prog="gateway", description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True, help="libpq DSN of the authenticator role")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--jwt-secret", default=None)
    p.add_argument("--anon-key", default=None)
    p.add_argument("--jwks", default=None, help='public keys for ES256 tokens: {"keys": [...]}')
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
