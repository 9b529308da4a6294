"""`/_admin/*` of the test Realtime server: drive a standalone server (compose, the demo) over
HTTP. Every route calls the server's own Python API; see `server.py`'s docstring for the routes.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from sidecar.testing._server import json_body
from sidecar.testing.realtime import wire
from sidecar.testing.realtime.broker import Knobs, Policy
from sidecar.testing.realtime.socket import flex_bool

if TYPE_CHECKING:
    from sidecar.testing.realtime.server import RealtimeServer

__all__ = ["Admin"]

log = structlog.get_logger(component="realtime_server")


class Admin:
    """The admin routes of one RealtimeServer."""

    def __init__(self, server: RealtimeServer) -> None:
        self.server = server

    def routes(self, app: web.Application) -> None:
        """Add the `/_admin/*` routes."""
        app.router.add_post("/_admin/send", self.send)
        app.router.add_post("/_admin/fault", self.fault)
        app.router.add_post("/_admin/token", self.token)
        app.router.add_post("/_admin/knobs", self.knobs)
        app.router.add_post("/_admin/policy", self.policy)
        app.router.add_get("/_admin/state", self.state)

    async def send(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            topic, event = str(body["topic"]), str(body["event"])
        except KeyError as exc:
            raise web.HTTPBadRequest(text=f"missing {exc}") from None
        private = flex_bool(body.get("private", True))
        if "binary_b64" in body:
            row_id: str | None = self.server.send_binary(
                topic, event, base64.b64decode(body["binary_b64"]), private, id=body.get("id")
            )
        else:
            row_id = self.server.send_db(
                topic, event, body.get("payload"), private, id=body.get("id")
            )
        return web.json_response({"id": row_id})

    async def fault(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        kind = body.pop("kind", None)
        actions: dict[str, Callable[..., Any]] = {
            "crash": self.server.crash,
            "shutdown": self.server.shutdown,
            "expire_now": self.server.expire_now,
            "server_disconnect": self.server.server_disconnect,
            "close": self.server.close,
            "abort": self.server.abort,
            "refuse_connects": self.server.refuse_connects,
            "accept_connects": self.server.accept_connects,
            "stall": self.server.stall,
            "unstall": self.server.unstall,
            "oversize_frame": self.server.oversize_frame,
            "stale_close": self.server.stale_close,
            "zero_channel_sweep": self.server.zero_channel_sweep,
            "sweep_now": self.server.sweep_now,
            "rate_limit": self.server.rate_limit,
            "delay_next_join": self.server.delay_next_join,
        }
        action = actions.get(str(kind))
        if action is None:
            raise web.HTTPBadRequest(text=f"unknown fault kind {kind!r}; one of {sorted(actions)}")
        try:
            result = action(**body)
        except TypeError as exc:
            raise web.HTTPBadRequest(text=f"bad arguments for {kind}: {exc}") from None
        log.info("realtime_server.fault", kind=kind, args=body)
        return web.json_response({"ok": True, "result": result})

    async def token(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        claims = body.get("claims") or {}
        if not isinstance(claims, dict):
            raise web.HTTPBadRequest(text="claims must be an object")
        kwargs: dict[str, Any] = {**claims}
        for key in ("role", "exp_in", "sub"):
            if key in body:
                kwargs[key] = body[key]
        return web.json_response({"token": self.server.make_token(**kwargs)})

    async def knobs(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        names = {f.name for f in dataclasses.fields(Knobs)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown knobs {unknown}")
        for key, value in body.items():
            setattr(self.server.knobs, key, value)
        return web.json_response(self.server.knobs.to_json())

    async def policy(self, request: web.Request) -> web.Response:
        """{"read","write"} for every topic, plus optional per-sub-topic overrides in "topics"."""
        body = await json_body(request)
        default = Policy(read=bool(body.get("read", True)), write=bool(body.get("write", True)))
        per_topic = {
            str(t): Policy(read=bool(p.get("read", True)), write=bool(p.get("write", True)))
            for t, p in (body.get("topics") or {}).items()
        }

        def policy(_claims: Mapping[str, Any], topic: str) -> Policy:
            return per_topic.get(topic, default)

        self.server.policy = policy
        return web.json_response({"ok": True})

    async def state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.server.state(), dumps=wire.dumps)
