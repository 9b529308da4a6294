"""A local Supabase Realtime for tests and the demo: Phoenix V1 (and V2) over aiohttp, with faults.

Faithful to supabase/realtime 2.129.8 for what a realtime-py 2.34.1 client on a private broadcast
channel can observe: the handshake and its HTTP
error bodies, heartbeats, the join checks with their exact `reason` strings and the 5 s error
backoff, RLS emulated by a policy function, replay, duplicate joins, token expiry and refresh,
client broadcasts, `realtime.send` and the REST broadcast API, the per-tenant rate limits, and
every server-side fault (`faults.py`). Frames of one socket are handled one at a time, like the Phoenix
transport process: a slow join holds the socket, and channel pushes queue behind it.

Parts: this module is the listener (a `LoopbackServer`), the handshake and REST handlers and
the test helpers; `broker.py` the tenant's shared state (subscribers, store, replay, fan-out,
limits, RLS) and the injection paths; `faults.py` the server-side faults (mixed into
`RealtimeServer`); `admin.py` the `/_admin/*` routes; `socket.py` one Phoenix socket and its
channels; `wire.py` the frame encodings; `jwt.py` the token checks.

Use it as `async with RealtimeServer() as rt:` (127.0.0.1, port 0) and point the client at
`rt.url`, or run `python -m sidecar.testing.realtime.server` and drive it over `/_admin/*`:
POST /_admin/send {topic, event, payload, private?, id?} → {"id"}; POST /_admin/fault
{"kind": <fault method name>, ...its keyword arguments}; POST /_admin/token {role, exp_in, sub,
claims} → {"token"}; POST /_admin/knobs {field: value}; POST /_admin/policy {read, write,
topics: {sub_topic: {read, write}}}; GET /_admin/state.

Auth modes (`knobs.auth_mode`): "gateway" (default) puts Kong in front, so the URL apikey must be
one of the configured keys (`anon_key`, `publishable_key`, `service_role_key`, `secret_key`) and
Kong's 401 bodies come back immediately; "jwt" is Realtime alone: any JWT signed with the secret
that has `role` and `exp`, refused with Realtime's `{"error": ...}` after connect_error_backoff.

Protocol versions: V1 (`vsn=1.0.0`, realtime-py) and V2 (`vsn=2.0.0`, realtime-js' default):
array text frames, binary user broadcasts (kind 3 in, kind 4 out), binary payloads for V2 only.

Not modelled: presence tracking (`presence` pushes are acknowledged, `presence_state` is empty,
no `presence_diff`), postgres_changes (bindings are echoed with ids, nothing is streamed), JWKS
and asymmetric JWTs (only HS256/384/512), the REST batch-size rate limit, and Realtime's
`persist` broadcast option.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from aiohttp import web

from sidecar.testing._server import LoopbackServer, run_standalone, until_terminated
from sidecar.testing.realtime import wire
from sidecar.testing.realtime.admin import Admin
from sidecar.testing.realtime.broker import (
    Broker,
    Counters,
    Knobs,
    Policy,
    PolicyFn,
    allow_all,
)
from sidecar.testing.realtime.faults import Faults, _Refusal
from sidecar.testing.realtime.jwt import TokenFailure, mint
from sidecar.testing.realtime.socket import (
    Channel,
    Frame,
    RealtimeSocket,
    StoredMessage,
    flex_bool,
)

__all__ = [
    "Channel",
    "Counters",
    "Frame",
    "Knobs",
    "Policy",
    "PolicyFn",
    "RealtimeServer",
    "RealtimeSocket",
    "StoredMessage",
    "allow_all",
    "main",
]

log = structlog.get_logger(component="realtime_server")

WS_PATHS = ("/realtime/v1/websocket", "/socket/websocket")


def _wire_topic(topic: str) -> str:
    return topic if topic.startswith("realtime:") else f"realtime:{topic}"


def _vsn_major(vsn: str) -> int | None:
    """1 or 2 when `vsn` matches `~> 1.0.0` or `~> 2.0.0` (Phoenix negotiate_serializer)."""
    core, _, _build = vsn.partition("+")
    if "-" in core:
        return None  # pre-releases do not match a plain requirement
    bits = core.split(".")
    if len(bits) != 3 or not all(b.isdigit() and (b == "0" or not b.startswith("0")) for b in bits):
        return None
    major, minor = int(bits[0]), int(bits[1])
    if minor == 0 and major in (1, 2):
        return major
    return None


class RealtimeServer(Faults, Broker, LoopbackServer):
    """A Supabase Realtime stand-in on 127.0.0.1 (port 0 by default); see the module docstring.

    Keys: `anon_key` (an anon JWT, or the `anon_key` given), `service_role_key`,
    `publishable_key` and `secret_key` (opaque `sb_…` keys the gateway maps to JWTs).
    """

    shutdown_timeout = 1.0

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        jwt_secret: str | None = None,
        anon_key: str | None = None,
        knobs: Knobs | None = None,
        policy: PolicyFn | None = None,
        admin: bool = True,
        jwks: Mapping[str, Any] | None = None,
    ) -> None:
        LoopbackServer.__init__(self, host, port)
        Broker.__init__(
            self, jwt_secret or secrets.token_urlsafe(32), knobs or Knobs(), policy or allow_all
        )
        self.jwt_jwks = jwks
        self.admin = admin
        now = int(time.time())
        ten_years = 10 * 365 * 86400
        anon_jwt = mint(
            self.jwt_secret, {"iss": "supabase", "role": "anon", "iat": now, "exp": now + ten_years}
        )
        service_jwt = mint(
            self.jwt_secret,
            {"iss": "supabase", "role": "service_role", "iat": now, "exp": now + ten_years},
        )
        self.anon_key = anon_key or anon_jwt
        self.service_role_key = service_jwt
        self.publishable_key = "sb_publishable_" + secrets.token_urlsafe(16)
        self.secret_key = "sb_secret_" + secrets.token_urlsafe(16)
        anon_target = self.anon_key if self.anon_key.count(".") == 2 else anon_jwt
        # Kong key-auth consumers and the JWT its request-transformer hands to Realtime.
        self.gateway_keys: dict[str, str] = {
            self.anon_key: anon_target,
            self.publishable_key: anon_jwt,
            self.service_role_key: service_jwt,
            self.secret_key: service_jwt,
        }
        self.sockets: list[RealtimeSocket] = []
        self._refusal: _Refusal | None = None
        self._next_sock_id = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- lifecycle ------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        """The WebSocket endpoints, the REST broadcast API and (with `admin`) `/_admin/*`."""
        for path in WS_PATHS:
            app.router.add_get(path, self._handle_ws)
        for prefix in ("/realtime/v1/api", "/api"):
            app.router.add_post(f"{prefix}/broadcast", self._handle_rest_batch)
            app.router.add_post(
                f"{prefix}/broadcast/{{topic}}/events/{{event}}", self._handle_rest_single
            )
        if self.admin:
            Admin(self).routes(app)

    async def start(self) -> None:
        """Start listening (idempotent)."""
        if self._runner is not None:
            return
        await super().start()
        self._restart_sweeper()
        log.info("realtime_server.started", url=self.url)

    async def stop(self) -> None:
        """Drop every socket and stop listening (idempotent)."""
        if self._runner is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for sock in self.open_sockets:
            sock.abort()
        await super().stop()
        log.info("realtime_server.stopped")

    @property
    def url(self) -> str:
        """What a Supabase client is given: `http://HOST:PORT/realtime/v1`."""
        return f"{self.base_url}/realtime/v1"

    @property
    def ws_url(self) -> str:
        """`ws://HOST:PORT/realtime/v1/websocket` (add `?apikey=…&vsn=1.0.0`)."""
        return f"ws{self.base_url.removeprefix('http')}/realtime/v1/websocket"

    def make_token(
        self,
        *,
        role: str | None = "authenticated",
        exp_in: float | None = 3600,
        sub: str | None = "00000000-0000-4000-8000-000000000001",
        alg: str = "HS256",
        secret: str | None = None,
        **claims: Any,
    ) -> str:
        """An HS256 JWT signed with the project secret; a claim given as None is left out."""
        now = time.time()
        body: dict[str, Any] = {
            "iss": "supabase",
            "iat": int(now),
            "role": role,
            "sub": sub,
            "exp": int(now + exp_in) if exp_in is not None else None,
            **claims,
        }
        return mint(
            secret or self.jwt_secret, {k: v for k, v in body.items() if v is not None}, alg=alg
        )

    def _restart_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="realtime-sweeper")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.knobs.zero_channel_sweep, 0.01))
            self.sweep_now()

    # ---- introspection ---------------------------------------------------------------------------

    @property
    def open_sockets(self) -> list[RealtimeSocket]:
        """Sockets still connected."""
        return [s for s in self.sockets if not s.closed]

    def channels(self, topic: str | None = None) -> list[Channel]:
        """Live channels, optionally only those for `topic` (sub-topic or `realtime:` form)."""
        out: list[Channel] = []
        for sock in self.open_sockets:
            for ch in sock.channels.values():
                if topic is None or ch.topic == _wire_topic(topic):
                    out.append(ch)
        return out

    def joined(self, topic: str) -> bool:
        """True when some socket has `topic` joined."""
        return bool(self.channels(topic))

    def joined_topics(self) -> set[str]:
        """Sub-topics (without `realtime:`) joined on any open socket."""
        return {ch.sub_topic for ch in self.channels()}

    def frames_out(self, event: str | None = None, topic: str | None = None) -> list[Any]:
        """Parsed text frames sent to clients (V1 dicts or V2 lists), optionally filtered."""
        out = []
        for sock in self.sockets:
            for f in sock.frames_out:
                d = f.data
                if d is None:
                    continue
                ev, tp = (d.get("event"), d.get("topic")) if isinstance(d, dict) else (d[3], d[2])
                if (event is None or ev == event) and (topic is None or tp == _wire_topic(topic)):
                    out.append(d)
        return out

    def frames_in(self, event: str | None = None, topic: str | None = None) -> list[Any]:
        """Parsed text frames received from clients, optionally filtered."""
        out = []
        for sock in self.sockets:
            for f in sock.frames_in:
                d = f.data
                if isinstance(d, dict):
                    ev, tp = d.get("event"), d.get("topic")
                elif isinstance(d, list) and len(d) >= 5:
                    ev, tp = d[3], d[2]
                else:
                    continue
                if (event is None or ev == event) and (topic is None or tp == _wire_topic(topic)):
                    out.append(d)
        return out

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109 - test helper API
        """Wait until `predicate()` is true (re-checked on every server event); TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._change.clear()
                waiter = asyncio.ensure_future(self._change.wait())
                try:
                    # Some conditions depend on time only (a client-side timer): poll too.
                    await asyncio.wait({waiter}, timeout=0.05)
                finally:
                    waiter.cancel()

    async def wait_joined(self, topic: str, timeout: float = 5.0) -> Channel:  # noqa: ASYNC109 - test helper API
        """Wait until `topic` is joined on some socket; the newest such channel."""
        await self.wait_until(lambda: self.joined(topic), timeout)
        return max(self.channels(topic), key=lambda c: c.joined_at)

    async def wait_connected(self, count: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - test helper API
        """Wait until at least `count` handshakes were accepted in total."""
        await self.wait_until(lambda: self.counters.accepted >= count, timeout)

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot for `/_admin/state` and debugging."""
        return {
            "url": self.url,
            "replication_up": self.replication_up,
            "rate_limited": self._events_triggered(),
            "counters": dataclasses.asdict(self.counters),
            "knobs": self.knobs.to_json(),
            "joined_topics": sorted(self.joined_topics()),
            "messages": len(self.messages),
            "sockets": [
                {
                    "id": s.id,
                    "vsn": s.vsn,
                    "path": s.path,
                    "closed": s.closed,
                    "close_code": s.close_code,
                    "stalled": s.stalled,
                    "frames_in": len(s.frames_in),
                    "frames_out": len(s.frames_out),
                    "channels": [
                        {
                            "topic": c.topic,
                            "join_ref": c.join_ref,
                            "private": c.private,
                            "exp": c.claims.get("exp"),
                        }
                        for c in s.channels.values()
                    ],
                }
                for s in self.sockets
            ],
        }

    # ---- internals shared with sockets -----------------------------------------------------------

    def _socket_closed(self, sock: RealtimeSocket) -> None:
        self.counters.disconnects += 1
        log.info("realtime_server.disconnected", socket=sock.id, close_code=sock.close_code)
        self._changed()

    def _users(self) -> int:
        return sum(1 for s in self.open_sockets if s.counted_user)

    # ---- HTTP handlers ---------------------------------------------------------------------------

    async def _refuse(self, status: int, error: str, *, backoff: bool = True) -> web.Response:
        self.counters.refused += 1
        self._changed()
        if backoff and self.knobs.connect_error_backoff > 0:
            await asyncio.sleep(self.knobs.connect_error_backoff)
        return web.json_response({"error": error}, status=status, dumps=wire.dumps)

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        self.counters.handshakes += 1
        self._changed()
        k = self.knobs
        refusal = self._refusal
        if refusal is not None and refusal.until is not None and time.monotonic() >= refusal.until:
            self._refusal = refusal = None
        if refusal is not None:
            self.counters.refused += 1
            if refusal.backoff and k.connect_error_backoff > 0:
                await asyncio.sleep(k.connect_error_backoff)
            return web.Response(
                status=refusal.status, body=refusal.body, content_type=refusal.content_type
            )
        if k.auth_mode == "gateway":
            # Kong key-auth runs first; its request-transformer hands Realtime a JWT.
            key = request.headers.get("apikey") or request.query.get("apikey")
            if not key:
                self.counters.refused += 1
                return web.json_response({"message": "No API key found in request"}, status=401)
            token: str | None = self.gateway_keys.get(key)
            if token is None:
                self.counters.refused += 1
                return web.json_response(
                    {"message": "Invalid authentication credentials"}, status=401
                )
        else:
            token = request.headers.get("x-api-key") or request.query.get("apikey")
        vsn = request.query.get("vsn", "1.0.0")
        major = _vsn_major(vsn)
        if major is None:
            # Phoenix refuses before connect/3 runs: no backoff, empty body.
            self.counters.refused += 1
            log.info("realtime_server.bad_vsn", vsn=vsn)
            return web.Response(status=403, body=b"")
        if k.suspended:
            return await self._refuse(403, "Realtime was disabled for this tenant")
        if token is None:
            return await self._refuse(401, "API key is missing")
        claims = self.verify_token(token)
        if isinstance(claims, TokenFailure):
            status, error = claims.connect_error()
            log.info("realtime_server.handshake_refused", status=status, error=error)
            return await self._refuse(status, error)
        if k.max_concurrent_users is not None and self._users() >= k.max_concurrent_users:
            return await self._refuse(429, "Too many connected users")
        if self._joins_triggered():
            return await self._refuse(429, "Too many joins per second")
        ws = web.WebSocketResponse(
            autoping=False,
            autoclose=True,
            compress=False,
            # aiohttp refuses sizes >= max_msg_size; cowboy > max.
            max_msg_size=k.max_frame_size + 1,
            heartbeat=None,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="expected a WebSocket upgrade")
        await ws.prepare(request)
        self._next_sock_id += 1
        sock = RealtimeSocket(
            self,
            request,
            ws,
            vsn=vsn,
            vsn_major=major,
            tenant_token=token,
            claims=claims,
            sock_id=self._next_sock_id,
        )
        self.sockets.append(sock)
        self.counters.accepted += 1
        log.info("realtime_server.connected", socket=sock.id, vsn=vsn, path=request.path)
        self._changed()
        await sock.run()
        return ws

    def _rest_token(self, request: web.Request) -> str | web.Response:
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if self.knobs.auth_mode == "gateway":
            key = request.headers.get("apikey") or request.query.get("apikey")
            if not key:
                return web.json_response({"message": "No API key found in request"}, status=401)
            mapped = self.gateway_keys.get(key)
            if mapped is None:
                return web.json_response(
                    {"message": "Invalid authentication credentials"}, status=401
                )
            return bearer if bearer and not bearer.startswith("sb_") else mapped
        token = bearer or request.headers.get("apikey")
        if not token:
            return web.json_response({"message": "Unauthorized"}, status=401)
        return token

    @staticmethod
    def _rest_response(status: int, body: Any) -> web.Response:
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status, dumps=wire.dumps)

    async def _handle_rest_batch(self, request: web.Request) -> web.Response:
        token = self._rest_token(request)
        if isinstance(token, web.Response):
            return token
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"message": "Bad Request"}, status=400)
        messages = body.get("messages") if isinstance(body, dict) else None
        return self._rest_response(*self.send_rest_batch(messages or [], token=token))

    async def _handle_rest_single(self, request: web.Request) -> web.Response:
        token = self._rest_token(request)
        if isinstance(token, web.Response):
            return token
        topic = request.match_info["topic"]
        event = request.match_info["event"]
        private = flex_bool(request.query.get("private", "false"))
        ctype = request.content_type
        body: Any
        if ctype == "application/octet-stream":
            body = await request.read()
        elif ctype == "application/json":
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"message": "Bad Request"}, status=400)
        else:
            return web.Response(status=415)
        return self._rest_response(*self.send_rest_single(topic, event, body, private, token=token))


async def _serve_forever(args: argparse.Namespace) -> None:
    knobs = Knobs(
        auth_mode=args.auth_mode,
        channel_error_backoff=args.channel_error_backoff,
        connect_error_backoff=args.connect_error_backoff,
    )
    if args.plan:
        knobs = Knobs.plan(
            args.plan,
            auth_mode=args.auth_mode,
            channel_error_backoff=args.channel_error_backoff,
            connect_error_backoff=args.connect_error_backoff,
        )
    server = RealtimeServer(
        args.host,
        args.port,
        jwt_secret=args.jwt_secret,
        anon_key=args.anon_key,
        knobs=knobs,
        jwks=json.loads(args.jwks) if args.jwks else None,
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(server)
        if args.postgres:
            from sidecar.testing.realtime.database import PostgresMode

            await stack.enter_async_context(PostgresMode(server, args.postgres))
        log.info(
            "realtime_server.listening",
            url=server.url,
            port=server.port,
            auth_mode=knobs.auth_mode,
            postgres=bool(args.postgres),
        )
        await until_terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Realtime server standalone until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(
        prog="python -m sidecar.testing.realtime.server",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4000)
    p.add_argument("--jwt-secret", default=None, help="HS256 project secret (random if absent)")
    p.add_argument(
        "--anon-key",
        default=None,
        help="the gateway's anon key (a JWT signed with --jwt-secret, or an sb_ key)",
    )
    p.add_argument("--jwks", default=None, help='public keys for ES256 tokens: {"keys": [...]}')
    p.add_argument("--auth-mode", choices=("gateway", "jwt"), default="gateway")
    p.add_argument("--plan", choices=("free", "pro"), default=None)
    p.add_argument(
        "--postgres",
        default=None,
        metavar="DSN",
        help="PostgreSQL mode: RLS joins, live rows and replay from realtime.messages at DSN "
        "(a superuser, e.g. the test cluster's supabase_admin)",
    )
    p.add_argument("--channel-error-backoff", type=float, default=5.0)
    p.add_argument("--connect-error-backoff", type=float, default=2.0)
    args = p.parse_args(argv)
    if not math.isfinite(args.channel_error_backoff) or args.channel_error_backoff < 0:
        p.error("--channel-error-backoff must be >= 0")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    run_standalone(main)
