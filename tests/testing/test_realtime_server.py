"""RealtimeServer conformance: the checklist of what a client can observe, with real realtime-py 2.34.1 and raw WebSockets.

Protocol-level checks use a raw aiohttp WebSocket client ("RawClient"); `sync()` sends a heartbeat
and returns the frames that arrived before its reply, which makes "nothing was sent" assertions
deterministic (the server handles a socket's frames in order). Client-behaviour checks
drive the real realtime-py client. All but one test use near-zero error backoffs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from sidecar.testing.realtime import wire
from sidecar.testing.realtime.server import Knobs, Policy, RealtimeServer

SUBSCRIBED = RealtimeSubscribeStates.SUBSCRIBED
CHANNEL_ERROR = RealtimeSubscribeStates.CHANNEL_ERROR
CLOSED = RealtimeSubscribeStates.CLOSED
TOPIC = "project:p1"
WIRE = f"realtime:{TOPIC}"
JS_DIR = Path(__file__).parent.parent / "js"


def fast_knobs(**overrides: Any) -> Knobs:
    return Knobs(**{"channel_error_backoff": 0.02, "connect_error_backoff": 0.0, **overrides})


@pytest.fixture
async def rt() -> AsyncIterator[RealtimeServer]:
    """A server with near-zero backoffs."""
    async with RealtimeServer(knobs=fast_knobs()) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession() as session:
        yield session


def _is_heartbeat_reply(ref: str) -> Callable[[Any], bool]:
    return lambda f: f["topic"] == "phoenix" and f["ref"] == ref


class RawClient:
    """A raw V1 WebSocket client with helpers for frames and refs."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ref = 100

    def ref(self) -> str:
        self._ref += 1
        return str(self._ref)

    async def send(self, frame: Any) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 3.0) -> Any:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    async def recv_until(self, pred: Callable[[Any], bool], timeout: float = 3.0) -> list[Any]:
        frames = []
        async with asyncio.timeout(timeout):
            while True:
                frames.append(await self.recv(timeout))
                if pred(frames[-1]):
                    return frames

    async def sync(self) -> list[Any]:
        """Two heartbeat round trips; the other frames received meanwhile.

        Heartbeats are answered by the transport, channel pushes are queued (as in Phoenix), so
        a channel's reaction to an earlier frame may follow the first reply; it always precedes
        the second, which the client only sends once the first reply arrived.
        """
        frames: list[Any] = []
        for _ in range(2):
            ref = self.ref()
            await self.send({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": ref})
            got = await self.recv_until(_is_heartbeat_reply(ref))
            frames += got[:-1]
        return frames

    async def expect_close(self, timeout: float = 3.0) -> int | None:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type == aiohttp.WSMsgType.CLOSE:
                    return int(msg.data)
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return self.ws.close_code

    async def join(
        self,
        topic: str = WIRE,
        *,
        token: str | None = None,
        private: bool = True,
        broadcast: dict[str, Any] | None = None,
        ref: str | None = None,
        extra: dict[str, Any] | None = None,
        **config: Any,
    ) -> dict[str, Any]:
        """Send phx_join and return its reply."""
        ref = ref or self.ref()
        payload: dict[str, Any] = {
            "config": {
                "broadcast": broadcast or {"ack": False, "self": False},
                "presence": {"key": "", "enabled": False},
                "private": private,
                "postgres_changes": [],
                **config,
            }
        }
        if token is not None:
            payload["access_token"] = token
        payload.update(extra or {})
        await self.send(
            {"topic": topic, "event": "phx_join", "payload": payload, "ref": ref, "join_ref": ref}
        )
        frames = await self.recv_until(
            lambda f: f["event"] == "phx_reply" and f["ref"] == ref and f["topic"] == topic
        )
        reply: dict[str, Any] = frames[-1]
        return reply


@contextlib.asynccontextmanager
async def raw(
    rt: RealtimeServer,
    *,
    apikey: str | None = None,
    vsn: str = "1.0.0",
    path: str = "/realtime/v1/websocket",
) -> AsyncIterator[RawClient]:
    """A connected RawClient (V1 by default)."""
    url = f"{rt.base_url}{path}?apikey={apikey or rt.anon_key}&vsn={vsn}"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, autoping=False, max_msg_size=0, compress=0) as ws,
    ):
        yield RawClient(ws)


class States:
    """Records subscribe callback states."""

    def __init__(self) -> None:
        self.items: list[tuple[RealtimeSubscribeStates, Exception | None]] = []
        self.times: list[float] = []

    def __call__(self, state: RealtimeSubscribeStates, err: Exception | None) -> None:
        self.items.append((state, err))
        self.times.append(time.monotonic())

    @property
    def states(self) -> list[RealtimeSubscribeStates]:
        return [s for s, _ in self.items]


@contextlib.asynccontextmanager
async def py_client(rt: RealtimeServer, **kwargs: Any) -> AsyncIterator[AsyncRealtimeClient]:
    """A realtime-py client built like the sidecar does: anon key as `token`."""
    client = AsyncRealtimeClient(rt.url, token=rt.anon_key, **kwargs)
    try:
        yield client
    finally:
        await client.close()
        for ch in list(client.channels.values()):
            ch.rejoin_timer.reset()


async def py_subscribe(
    client: AsyncRealtimeClient,
    token: str,
    topic: str = TOPIC,
    broadcast: dict[str, Any] | None = None,
    private: bool = True,
) -> tuple[Any, States, list[dict[str, Any]]]:
    """set_auth + private channel subscribe; (channel, states, received broadcasts)."""
    await client.set_auth(token)
    states = States()
    got: list[Any] = []
    params: Any = {
        "config": {"broadcast": broadcast or {"ack": False, "self": False}, "private": private}
    }
    ch = client.channel(topic, params)
    ch.on_broadcast("*", got.append)
    await ch.subscribe(states)
    return ch, states, got


def frame_keys_ok(frames: list[Any]) -> bool:
    return all(set(f) == {"topic", "event", "payload", "ref"} for f in frames)


# ---- handshake ---------------------------------------------------------------------------


async def test_handshake_paths_vsn_and_403(rt: RealtimeServer, http: aiohttp.ClientSession) -> None:
    """Both paths upgrade; vsn defaults to 1.0.0; other majors get 403 with an empty body."""
    for path in ("/realtime/v1/websocket", "/socket/websocket"):
        async with raw(rt, path=path) as c:
            assert await c.sync() == []
    async with http.ws_connect(f"{rt.ws_url}?apikey={rt.anon_key}&log_level=info") as ws:
        await ws.send_str(
            json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "1"})
        )
        assert json.loads((await ws.receive(timeout=3)).data)["ref"] == "1"
    assert rt.sockets[-1].vsn == "1.0.0"
    for vsn in ("3.0.0", "1.1.0", "2.0", "potato", "1.0.0-rc1"):
        async with http.get(f"{rt.ws_url}?apikey={rt.anon_key}&vsn={vsn}") as resp:
            assert resp.status == 403
            assert await resp.read() == b""


async def test_gateway_mode_keys(rt: RealtimeServer, http: aiohttp.ClientSession) -> None:
    """Gateway mode: missing or unknown keys get Kong's 401; the configured keys connect."""
    async with http.get(f"{rt.ws_url}?vsn=1.0.0") as resp:
        assert resp.status == 401
        assert await resp.json() == {"message": "No API key found in request"}
    user_jwt = rt.make_token()
    async with http.get(f"{rt.ws_url}?apikey={user_jwt}&vsn=1.0.0") as resp:
        assert resp.status == 401
        assert await resp.json() == {"message": "Invalid authentication credentials"}
    for key in (rt.anon_key, rt.publishable_key, rt.service_role_key, rt.secret_key):
        async with raw(rt, apikey=key) as c:
            assert await c.sync() == []
    assert [s.claims["role"] for s in rt.sockets] == [
        "anon",
        "anon",
        "service_role",
        "service_role",
    ]


async def test_jwt_mode_errors_after_connect_backoff(http: aiohttp.ClientSession) -> None:
    """JWT mode: the real server's status and `{"error": ...}` bodies, each after connect_error_backoff."""
    async with RealtimeServer(knobs=fast_knobs(auth_mode="jwt", connect_error_backoff=0.2)) as rt:
        header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(b'{"role":"anon","exp":9999999999}').rstrip(b"=").decode()
        cases = [
            (None, 401, "API key is missing"),
            (rt.make_token(exp_in=-10), 401, "Token has expired"),
            ("potato", 401, "The token provided is not a valid JWT"),
            (rt.make_token(role=None), 401, "Fields `role` and `exp` are required in JWT"),
            (rt.make_token(exp_in=None), 401, "Fields `role` and `exp` are required in JWT"),
            (rt.make_token(secret="x" * 40), 401, "Failed to validate JWT signature"),
            (
                f"{header}.{body}.",
                401,
                "Failed to generate JWT signer, check your JWT secret or JWKS configuration",
            ),
            (rt.make_token(iat="yesterday"), 500, "Error connecting to Realtime"),
        ]
        for token, status, error in cases:
            url = f"{rt.ws_url}?vsn=1.0.0" + (f"&apikey={token}" if token else "")
            started = time.monotonic()
            async with http.get(url) as resp:
                assert (resp.status, await resp.json()) == (status, {"error": error}), token
            assert time.monotonic() - started >= 0.2
        async with raw(rt, apikey=rt.make_token()) as c:
            assert await c.sync() == []
        # x-api-key wins over the query parameter.
        url = f"{rt.ws_url}?vsn=1.0.0&apikey=potato"
        async with http.ws_connect(url, headers={"x-api-key": rt.make_token(role="x")}) as ws:
            await ws.close()
        assert rt.sockets[-1].claims["role"] == "x"


async def test_idle_timeout_and_ping(http: aiohttp.ClientSession) -> None:
    """Pings are answered and count as activity; silence for idle_timeout closes with 1000."""
    async with RealtimeServer(knobs=fast_knobs(idle_timeout=0.4)) as rt, raw(rt) as c:
        for i in range(4):
            if i:
                await asyncio.sleep(0.2)  # keep-alive cadence below the idle timeout
            await c.ws.ping(b"hi")
            msg = await c.ws.receive(timeout=1)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"hi")
        started = time.monotonic()
        assert await c.expect_close() == 1000
        assert 0.3 < time.monotonic() - started < 2.0
        assert rt.sockets[0].close_code == 1000


async def test_inbound_frame_cap_closes_1009(rt: RealtimeServer) -> None:
    """A 5,000,000-byte frame is accepted (and ignored as malformed); one byte more → 1009."""
    async with raw(rt) as c:
        await c.send("x" * 5_000_000)
        assert await c.sync() == []
        assert rt.counters.malformed == 1
        with contextlib.suppress(ConnectionError):  # the server may reset while we still write
            await c.send("x" * 5_000_001)
        assert await c.expect_close(timeout=10) in (1009, 1006, None)
        await rt.wait_until(lambda: rt.sockets[0].closed)
        assert rt.sockets[0].close_code == 1009


async def test_suspended_tenant(rt: RealtimeServer, http: aiohttp.ClientSession) -> None:
    """A suspended tenant: handshakes get 403, joins on open sockets RealtimeDisabledForTenant."""
    async with raw(rt) as c:
        rt.knobs.suspended = True
        reply = await c.join(token=rt.make_token())
        assert reply["payload"]["response"]["reason"] == (
            "RealtimeDisabledForTenant: Realtime disabled for this tenant"
        )
        async with http.get(f"{rt.ws_url}?apikey={rt.anon_key}&vsn=1.0.0") as resp:
            assert (resp.status, await resp.json()) == (
                403,
                {"error": "Realtime was disabled for this tenant"},
            )


# ---- heartbeat and parsing -----------------------------------------------------------


async def test_heartbeat_reply(rt: RealtimeServer) -> None:
    """Heartbeats get `phx_reply` ok {} echoing `ref` (string or null), without any join."""
    async with raw(rt) as c:
        for ref in ("hb-1", None):
            await c.send(
                {
                    "topic": "phoenix",
                    "event": "heartbeat",
                    "payload": {},
                    "ref": ref,
                    "join_ref": None,
                }
            )
            assert await c.recv() == {
                "topic": "phoenix",
                "event": "phx_reply",
                "payload": {"status": "ok", "response": {}},
                "ref": ref,
            }


async def test_inbound_parsing_rules(rt: RealtimeServer) -> None:
    """Malformed frames are ignored; unjoined topics get `unmatched topic`; stale join_refs drop."""
    async with raw(rt) as c:
        await c.send("{not json")
        await c.send({"topic": WIRE, "event": "broadcast", "payload": {}})  # no "ref" key
        await c.send(["an", "array"])
        assert await c.sync() == []
        assert rt.counters.malformed == 3
        await c.send({"topic": WIRE, "event": "broadcast", "payload": {}, "ref": "9"})
        assert await c.recv() == {
            "topic": WIRE,
            "event": "phx_reply",
            "ref": "9",
            "payload": {"status": "error", "response": {"reason": "unmatched topic"}},
        }
        reply = await c.join("room:1")
        assert reply["payload"] == {"status": "error", "response": {"reason": "unmatched topic"}}
        await c.send({"topic": WIRE, "event": "phx_leave", "payload": {}, "ref": "10"})
        assert (await c.recv())["payload"] == {"status": "ok", "response": {}}
        reply = await c.join(
            WIRE, token=rt.make_token(), ref="20", broadcast={"ack": True, "self": True}
        )
        assert reply["payload"]["status"] == "ok"
        await c.send(
            {
                "topic": WIRE,
                "event": "broadcast",
                "ref": "21",
                "join_ref": "19",
                "payload": {"type": "broadcast", "event": "e", "payload": {}},
            }
        )
        assert await c.sync() == []  # stale join_ref: dropped without a reply
        await c.send({"topic": WIRE, "event": "what", "ref": "22", "join_ref": "20", "payload": {}})
        assert await c.sync() == []  # unknown event on a joined topic: ignored


async def test_frames_of_a_socket_are_sequential(rt: RealtimeServer) -> None:
    """A slow join (knob join_delay_s) holds the socket: a later heartbeat waits for its reply."""
    rt.knobs.join_delay_s = 0.3
    async with raw(rt) as c:
        started = time.monotonic()
        await c.send(
            {
                "topic": WIRE,
                "event": "phx_join",
                "ref": "1",
                "join_ref": "1",
                "payload": {"config": {"private": True}, "access_token": rt.make_token()},
            }
        )
        await c.send({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "2"})
        first, second = await c.recv(), await c.recv()
        assert (first["topic"], first["ref"], second["topic"]) == (WIRE, "1", "phoenix")
        assert time.monotonic() - started >= 0.3


# ---- phx_join ------------------------------------------------------------------------------


def _deny_unless_ok(claims: Any, _topic: str) -> Policy:
    return Policy(read=bool(claims.get("ok")), write=bool(claims.get("ok")))


def _raise(_claims: Any, _topic: str) -> Policy:
    raise RuntimeError("policy exploded")


JOIN_ERRORS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # (id, knobs, join kwargs (token given as make_token kwargs under "tok"), reason)
    (
        "topic-required",
        {},
        {"topic": "realtime:"},
        "TopicNameRequired: You must provide a topic name",
    ),
    ("expired", {}, {"tok": {"exp_in": -5}}, "InvalidJWTToken: Token has expired 5 seconds ago"),
    (
        "missing-role",
        {},
        {"tok": {"role": None}},
        "InvalidJWTToken: Fields `role` and `exp` are required in JWT",
    ),
    ("malformed", {}, {"token": "potato"}, "MalformedJWT: The token provided is not a valid JWT"),
    ("empty", {}, {"token": ""}, "MalformedJWT: The token provided is not a valid JWT"),
    (
        "signature",
        {},
        {"tok": {"secret": "s" * 40}},
        "JwtSignatureError: Failed to validate JWT signature",
    ),
    ("float-exp-past", {}, {"tok": {"exp": 1.5}}, "Unknown Error on Channel"),
    (
        "private-only",
        {"private_only": True},
        {"private": False},
        "PrivateOnly: This project only allows private channels",
    ),
    (
        "restarting",
        {"restarting": True},
        {},
        "RealtimeRestarting: Realtime is restarting, please standby",
    ),
    ("db-down", {"db_down": True}, {}, "Realtime was unable to connect to the project database"),
    (
        "db-unreachable",
        {"db_unreachable": True},
        {},
        "UnableToConnectToProject: Realtime was unable to connect to the project database",
    ),
    (
        "missing-partition",
        {"missing_partition": True},
        {},
        "MissingPartition: Realtime was unable to find the expected messages partition",
    ),
    ("unknown", {"unknown_error": True}, {}, "Unknown Error on Channel"),
    (
        "policy-raises-knob",
        {"policy_raises": True},
        {},
        f"Unauthorized: You do not have permissions to read from this Channel topic: {TOPIC}",
    ),
    (
        "replay-public",
        {},
        {"private": False, "broadcast": {"replay": {"since": 0}}},
        "UnableToReplayMessages: Replay is not allowed for public channels",
    ),
    (
        "replay-float",
        {},
        {"broadcast": {"replay": {"since": 1.5}}},
        "UnableToReplayMessages: Replay params are not valid",
    ),
    (
        "replay-no-since",
        {},
        {"broadcast": {"replay": {}}},
        "UnableToReplayMessages: Replay params are not valid",
    ),
    (
        "replay-str-limit",
        {},
        {"broadcast": {"replay": {"since": 0, "limit": "5"}}},
        "UnableToReplayMessages: Replay params are not valid",
    ),
    (
        "replay-out-of-range",
        {},
        {"broadcast": {"replay": {"since": 10**16}}},
        "UnableToReplayMessages: Replay params are not valid",
    ),
    (
        "replay-fails",
        {"replay_fails": True},
        {"broadcast": {"replay": {"since": 0}}},
        "UnableToReplayMessages: Realtime was unable to replay messages",
    ),
]


@pytest.mark.parametrize(
    ("knobs", "join", "reason"), [c[1:] for c in JOIN_ERRORS], ids=[c[0] for c in JOIN_ERRORS]
)
async def test_join_error_reasons(knobs: dict[str, Any], join: dict[str, Any], reason: str) -> None:
    """Each refused join replies `{"status":"error","response":{"reason":...}}` with the real server's text."""
    async with RealtimeServer(knobs=fast_knobs(**knobs)) as rt, raw(rt) as c:
        join = dict(join)
        tok = join.pop("tok", {})
        token = join.pop("token", None)
        reply = await c.join(
            join.pop("topic", WIRE),
            token=token if token is not None else rt.make_token(**tok),
            **join,
        )
        assert reply["payload"] == {"status": "error", "response": {"reason": reason}}
        assert frame_keys_ok([reply])
        assert not rt.joined(TOPIC)


async def test_policy_denied_and_raising_policy(rt: RealtimeServer) -> None:
    """read=false and a raising policy both give Unauthorized; service_role bypasses RLS."""
    denied = f"Unauthorized: You do not have permissions to read from this Channel topic: {TOPIC}"
    async with raw(rt) as c:
        rt.policy = _deny_unless_ok
        assert (await c.join(token=rt.make_token()))["payload"]["response"]["reason"] == denied
        rt.policy = _raise
        assert (await c.join(token=rt.make_token()))["payload"]["response"]["reason"] == denied
        assert (await c.join(token=rt.make_token(role="service_role")))["payload"]["status"] == "ok"
        rt.policy = _deny_unless_ok
        assert (await c.join("realtime:pub", token=rt.make_token(), private=False))["payload"][
            "status"
        ] == "ok"  # public channels evaluate no policy


async def test_join_rate_limited_replies_then_closes_1001(rt: RealtimeServer) -> None:
    """ClientJoinRateLimitReached is answered, then the socket is closed with 1001."""
    rt.knobs.join_rate_limited = True
    async with raw(rt) as c:
        reply = await c.join(token=rt.make_token())
        assert reply["payload"]["response"]["reason"] == (
            "ClientJoinRateLimitReached: Too many joins per second"
        )
        assert await c.expect_close() == 1001


async def test_max_channels_and_concurrent_users(
    rt: RealtimeServer, http: aiohttp.ClientSession
) -> None:
    """Per-plan limits: channels per client, concurrent users (join error and handshake 429)."""
    free = Knobs.plan("free")
    assert (free.max_payload_kb, free.max_events_per_second, free.max_concurrent_users) == (
        256,
        100.0,
        200,
    )
    rt.knobs.max_channels_per_client = 1
    rt.knobs.max_concurrent_users = 1
    async with raw(rt) as c:
        assert (await c.join(token=rt.make_token()))["payload"]["status"] == "ok"
        reply = await c.join("realtime:other", token=rt.make_token())
        assert (
            reply["payload"]["response"]["reason"] == "ChannelRateLimitReached: Too many channels"
        )
        async with http.get(f"{rt.ws_url}?apikey={rt.anon_key}&vsn=1.0.0") as resp:
            assert (resp.status, await resp.json()) == (429, {"error": "Too many connected users"})
    rt.knobs.max_concurrent_users = 2
    async with raw(rt) as a, raw(rt) as b:
        assert (await a.join(token=rt.make_token()))["payload"]["status"] == "ok"
        rt.knobs.max_concurrent_users = 1
        reply = await b.join(token=rt.make_token())
        assert reply["payload"]["response"]["reason"] == (
            "ConnectionRateLimitReached: Too many connected users"
        )


async def test_error_reply_waits_for_channel_error_backoff() -> None:
    """Every join error is delayed by channel_error_backoff; success is not."""
    async with RealtimeServer(knobs=fast_knobs(channel_error_backoff=0.5)) as rt, raw(rt) as c:
        started = time.monotonic()
        assert (await c.join(token="potato"))["payload"]["status"] == "error"
        assert time.monotonic() - started >= 0.3
        started = time.monotonic()
        assert (await c.join(token=rt.make_token()))["payload"]["status"] == "ok"
        assert time.monotonic() - started < 0.4


async def test_token_choice(rt: RealtimeServer) -> None:
    """access_token, else user_token (which wins when both are set), else the socket's apikey."""
    async with raw(rt) as c:
        cases = [
            ({"access_token": rt.make_token(role="a")}, "a"),
            ({"user_token": rt.make_token(role="u")}, "u"),
            ({"access_token": rt.make_token(role="a"), "user_token": rt.make_token(role="u")}, "u"),
            ({"access_token": "sb_publishable_xyz"}, "anon"),
            ({}, "anon"),
        ]
        for i, (extra, role) in enumerate(cases):
            topic = f"realtime:t{i}"
            assert (await c.join(topic, extra=extra))["payload"]["status"] == "ok"
            assert rt.channels(topic)[0].claims["role"] == role


async def test_join_success_and_followups(rt: RealtimeServer) -> None:
    """ok reply with postgres_changes [], then replication-ready system ok, then presence_state."""
    async with raw(rt) as c:
        ref = c.ref()
        await c.send(
            {
                "topic": WIRE,
                "event": "phx_join",
                "ref": ref,
                "join_ref": ref,
                "payload": {
                    "config": {
                        "broadcast": {"replication_ready": True},
                        "presence": {"enabled": "TRUE"},
                        "private": "true",
                    },
                    "access_token": rt.make_token(),
                },
            }
        )
        frames = [await c.recv() for _ in range(3)]
        assert frames == [
            {
                "topic": WIRE,
                "event": "phx_reply",
                "ref": ref,
                "payload": {"status": "ok", "response": {"postgres_changes": []}},
            },
            {
                "topic": WIRE,
                "event": "system",
                "ref": None,
                "payload": {
                    "channel": TOPIC,
                    "extension": "system",
                    "message": "Replication connection established",
                    "status": "ok",
                },
            },
            {"topic": WIRE, "event": "presence_state", "payload": {}, "ref": None},
        ]
        assert rt.channels(TOPIC)[0].private
        assert all("join_ref" not in f.data for f in rt.sockets[0].frames_out)


async def test_replication_ready_timeout(rt: RealtimeServer) -> None:
    """Without replication, replication_ready ends in a system error and phx_close."""
    rt.knobs.replication_up = False
    rt.knobs.replication_ready_timeout = 0.3
    async with raw(rt) as c:
        reply = await c.join(token=rt.make_token(), ref="5", broadcast={"replication_ready": True})
        assert reply["payload"]["status"] == "ok"
        assert [await c.recv(), await c.recv()] == [
            {
                "topic": WIRE,
                "event": "system",
                "ref": None,
                "payload": {
                    "channel": TOPIC,
                    "extension": "system",
                    "status": "error",
                    "message": "Replication connection was not established in time",
                },
            },
            {"topic": WIRE, "event": "phx_close", "payload": {}, "ref": "5"},
        ]


async def test_duplicate_join_replies_then_closes_old(rt: RealtimeServer) -> None:
    """A second join on a joined topic: new reply first, then phx_close with the OLD join_ref."""
    async with raw(rt) as c:
        assert (await c.join(token=rt.make_token(), ref="1"))["payload"]["status"] == "ok"
        await c.send(
            {
                "topic": WIRE,
                "event": "phx_join",
                "ref": "2",
                "join_ref": "2",
                "payload": {"config": {"private": True}, "access_token": rt.make_token()},
            }
        )
        assert [await c.recv(), await c.recv()] == [
            {
                "topic": WIRE,
                "event": "phx_reply",
                "ref": "2",
                "payload": {"status": "ok", "response": {"postgres_changes": []}},
            },
            {"topic": WIRE, "event": "phx_close", "payload": {}, "ref": "1"},
        ]
        assert [ch.join_ref for ch in rt.channels(TOPIC)] == ["2"]


async def test_leave(rt: RealtimeServer) -> None:
    """phx_leave: ok reply with the leave's ref, then phx_close with the join_ref."""
    async with raw(rt) as c:
        await c.join(token=rt.make_token(), ref="3")
        await c.send(
            {"topic": WIRE, "event": "phx_leave", "payload": {}, "ref": "4", "join_ref": "3"}
        )
        assert [await c.recv(), await c.recv()] == [
            {
                "topic": WIRE,
                "event": "phx_reply",
                "ref": "4",
                "payload": {"status": "ok", "response": {}},
            },
            {"topic": WIRE, "event": "phx_close", "payload": {}, "ref": "3"},
        ]
        assert not rt.joined(TOPIC)


# ---- token lifecycle -----------------------------------------------------------------------


async def test_py_token_expiry_closes_channel(rt: RealtimeServer) -> None:
    """Expiry while joined → system error + phx_close → CHANNEL_ERROR, CLOSED, removed."""
    async with py_client(rt) as client:
        ch, states, _ = await py_subscribe(client, rt.make_token(exp_in=2))
        assert states.states == [SUBSCRIBED]
        await rt.wait_until(lambda: CLOSED in states.states, timeout=5)
        assert states.states == [SUBSCRIBED, CHANNEL_ERROR, CLOSED]
        # "0 seconds ago" unless the loop was late by a second (slow CI).
        assert re.search(r"Token has expired [01] seconds ago", str(states.items[1][1]))
        assert ch.topic not in client.channels
        system, close = rt.frames_out(topic=TOPIC)[-2:]
        assert re.fullmatch(r"Token has expired [01] seconds ago", system["payload"]["message"])
        system["payload"]["message"] = "Token has expired 0 seconds ago"
        assert system == {
            "topic": WIRE,
            "event": "system",
            "ref": None,
            "payload": {
                "channel": TOPIC,
                "extension": "system",
                "status": "error",
                "message": "Token has expired 0 seconds ago",
            },
        }
        assert close == {"topic": WIRE, "event": "phx_close", "payload": {}, "ref": "1"}
        assert rt.open_sockets  # the socket stays open


async def test_py_refresh_keeps_channel_alive_without_reply(rt: RealtimeServer) -> None:
    """Set_auth before exp keeps the channel past the old exp; no reply is sent."""
    async with py_client(rt) as client:
        short = rt.make_token(exp_in=2)
        old_exp = jwt.decode(short, options={"verify_signature": False})["exp"]
        ch, states, _ = await py_subscribe(client, short)
        longer = rt.make_token(exp_in=3600)
        await client.set_auth(longer)
        await rt.wait_until(lambda: rt.channels(TOPIC)[0].token == longer)
        await rt.wait_until(lambda: time.time() > old_exp + 1.2, timeout=5)
        assert rt.joined(TOPIC)
        assert ch.is_joined
        assert states.states == [SUBSCRIBED]
        pushes = rt.frames_in(event="access_token")
        assert len(pushes) == 1
        assert not [f for f in rt.frames_out(event="phx_reply") if f["ref"] == pushes[0]["ref"]]
        assert rt.counters.refreshes == 1


async def test_access_token_refresh_rules(rt: RealtimeServer) -> None:
    """sb_/same/null/non-string tokens are ignored; failures send a system error + phx_close."""
    async with raw(rt) as c:
        token = rt.make_token()
        await c.join(token=token, ref="1")

        async def push(value: Any) -> None:
            await c.send(
                {
                    "topic": WIRE,
                    "event": "access_token",
                    "ref": c.ref(),
                    "join_ref": "1",
                    "payload": {"access_token": value},
                }
            )

        for value in ("sb_publishable_abc", token, None, 42):
            await push(value)
        assert await c.sync() == []
        await push(rt.make_token(role="other"))
        assert await c.sync() == []  # success: no reply at all
        assert rt.channels(TOPIC)[0].claims["role"] == "other"
        await push("potato")
        assert await c.sync() == [
            {
                "topic": WIRE,
                "event": "system",
                "ref": None,
                "payload": {
                    "channel": TOPIC,
                    "extension": "system",
                    "status": "error",
                    "message": "The token provided is not a valid JWT",
                },
            },
            {"topic": WIRE, "event": "phx_close", "payload": {}, "ref": "1"},
        ]

        # read true → false while presence read remains: "no longer have permission".
        rt.policy = lambda claims, _t: Policy(
            read=bool(claims.get("ok")), write=True, presence_read=True
        )
        await c.join(token=rt.make_token(ok=True), ref="7", presence={"enabled": True})
        assert (await c.recv())["event"] == "presence_state"
        await c.send(
            {
                "topic": WIRE,
                "event": "access_token",
                "ref": "8",
                "join_ref": "7",
                "payload": {"access_token": rt.make_token(ok=False)},
            }
        )
        frames = await c.sync()
        assert frames[0]["payload"]["message"] == (
            f"You no longer have permission to read from this Channel topic: {TOPIC}"
        )
        assert frames[1] == {"topic": WIRE, "event": "phx_close", "payload": {}, "ref": "7"}


async def test_expiry_timer_uses_confirm_interval(rt: RealtimeServer) -> None:
    """The expiry check re-arms every confirm_token_interval and closes once exp has passed."""
    rt.knobs.confirm_token_interval = 0.1
    async with raw(rt) as c:
        await c.join(token=rt.make_token(exp_in=1), ref="1")
        frames = await c.recv_until(lambda f: f["event"] == "phx_close", timeout=3)
        assert frames[0]["payload"]["message"].startswith("Token has expired")


# ---- client broadcast ------------------------------------------------------------------------


async def test_client_broadcast_relay_ack_self_and_write_cache(rt: RealtimeServer) -> None:
    """Verbatim relay to others (and self with self:true), ack replies, write policy once per token."""
    async with raw(rt) as a, raw(rt) as b, raw(rt) as pub:
        await a.join(token=rt.make_token(), ref="1", broadcast={"ack": True, "self": False})
        await b.join(token=rt.make_token(), ref="1", broadcast={"ack": False, "self": True})
        await pub.join(token=rt.make_token(), ref="1", private=False)
        body = {
            "type": "broadcast",
            "event": "file:update",
            "payload": {"path": "a.txt"},
            "extra": [1],
        }
        for ref in ("2", "3"):
            await a.send(
                {"topic": WIRE, "event": "broadcast", "payload": body, "ref": ref, "join_ref": "1"}
            )
        assert await a.sync() == [
            {
                "topic": WIRE,
                "event": "phx_reply",
                "ref": r,
                "payload": {"status": "ok", "response": {}},
            }
            for r in ("2", "3")
        ]
        relayed = {"topic": WIRE, "event": "broadcast", "payload": body, "ref": None}
        assert await b.sync() == [relayed, relayed]
        assert await pub.sync() == []  # private and public are separate topics
        assert rt.policy_calls.count(("write", TOPIC)) == 1
        await b.send(
            {"topic": WIRE, "event": "broadcast", "payload": body, "ref": "4", "join_ref": "1"}
        )
        assert await b.sync() == [relayed]  # self:true echoes, no ack
        assert await a.sync() == [relayed]
        await a.send(
            {
                "topic": WIRE,
                "event": "access_token",
                "ref": "5",
                "join_ref": "1",
                "payload": {"access_token": rt.make_token(role="r2")},
            }
        )
        await a.send(
            {"topic": WIRE, "event": "broadcast", "payload": body, "ref": "6", "join_ref": "1"}
        )
        await a.sync()
        assert rt.policy_calls.count(("write", TOPIC)) == 3  # a again after refresh, b once


async def test_write_denied_and_size_limit(rt: RealtimeServer) -> None:
    """Write denied: silent even with ack. Too big: ack error (string or object), else dropped."""
    rt.policy = lambda claims, _t: Policy(read=True, write=bool(claims.get("w")))
    rt.knobs.max_payload_kb = 1
    big = {"type": "broadcast", "event": "e", "payload": {"pad": "x" * 1600}}
    async with raw(rt) as a, raw(rt) as b:
        await a.join(token=rt.make_token(), ref="1", broadcast={"ack": True})
        await b.join(token=rt.make_token(w=True), ref="1", broadcast={"ack": True})
        await a.send(
            {
                "topic": WIRE,
                "event": "broadcast",
                "ref": "2",
                "join_ref": "1",
                "payload": {"type": "broadcast", "event": "e", "payload": {}},
            }
        )
        assert await a.sync() == []
        assert await b.sync() == []
        await b.send(
            {"topic": WIRE, "event": "broadcast", "ref": "3", "join_ref": "1", "payload": big}
        )
        assert await b.sync() == [
            {
                "topic": WIRE,
                "event": "phx_reply",
                "ref": "3",
                "payload": {"status": "error", "response": "payload_size_exceeded"},
            }
        ]
        rt.knobs.payload_size_reply = "object"
        await b.send(
            {"topic": WIRE, "event": "broadcast", "ref": "4", "join_ref": "1", "payload": big}
        )
        assert (await b.sync())[0]["payload"]["response"] == {"error": "payload_size_exceeded"}
        assert await a.sync() == []  # nothing was relayed


# ---- injection API -------------------------------------------------------------------------


async def test_py_send_db_reaches_on_broadcast(rt: RealtimeServer) -> None:
    """SUBSCRIBED; send_db arrives with meta.id and payload.id, without `type`."""
    async with py_client(rt) as client:
        _, states, got = await py_subscribe(client, rt.make_token())
        assert states.states == [SUBSCRIBED]
        row_id = rt.send_db(TOPIC, "file:update", {"path": "a.txt"})
        await rt.wait_until(lambda: len(got) == 1)
        assert got == [
            {
                "event": "file:update",
                "payload": {"path": "a.txt", "id": row_id},
                "meta": {"id": row_id},
            }
        ]
        assert frame_keys_ok(rt.frames_out())


async def test_send_db_rules(rt: RealtimeServer) -> None:
    """Non-objects are refused; an explicit payload.id is kept; rows store inserted_at."""
    async with raw(rt) as c:
        await c.join(token=rt.make_token(), ref="1")
        assert rt.send_db(TOPIC, "e", ["not", "a", "dict"]) is None
        assert rt.send_db(TOPIC, "e", {"id": "mine", "v": 1}, id="row-1") == "row-1"
        assert await c.sync() == [
            {
                "topic": WIRE,
                "event": "broadcast",
                "ref": None,
                "payload": {
                    "event": "e",
                    "payload": {"id": "mine", "v": 1},
                    "type": "broadcast",
                    "meta": {"id": "row-1"},
                },
            }
        ]
        assert rt.messages[-1].inserted_at.tzinfo is not None
        rt.send_db(TOPIC, "e", {"v": 2}, private=False)
        assert await c.sync() == []  # public namespace: this private channel does not get it
        rt.knobs.replication_up = False
        rid = rt.send_db(TOPIC, "e", {"v": 3})
        assert rid is not None
        assert rt.messages[-1].id == rid
        assert await c.sync() == []  # stored for replay only
        rt.knobs.missing_partition = True
        assert rt.send_db(TOPIC, "e", {"v": 4}) is None


async def test_py_replay_latest_25_and_float_since(rt: RealtimeServer) -> None:
    """Since=0 with 30 rows gives the latest 25 oldest first; a float since is refused."""
    ids = [rt.send_db(TOPIC, "file:update", {"n": n}) for n in range(30)]
    async with py_client(rt) as client:
        _, _states, got = await py_subscribe(
            client, rt.make_token(), broadcast={"replay": {"since": 0}}
        )
        await rt.wait_until(lambda: len(got) == 25)
        assert [m["payload"]["n"] for m in got] == list(range(5, 30))
        assert all(m["meta"] == {"id": ids[m["payload"]["n"]], "replayed": True} for m in got)
        # A live message whose id was replayed is not delivered again to that channel.
        rt.send_db(TOPIC, "file:update", {"n": 99}, id=ids[29])
        rt.send_db(TOPIC, "file:update", {"n": 100})
        await rt.wait_until(lambda: len(got) == 26)
        assert got[-1]["payload"]["n"] == 100
        _, states2, _ = await py_subscribe(
            client,
            rt.make_token(),
            topic="project:p2",
            broadcast={"replay": {"since": time.time() * 1000}},
        )
        assert states2.states == [CHANNEL_ERROR]
        assert "UnableToReplayMessages: Replay params are not valid" in str(states2.items[0][1])


async def test_replay_limit_clamp_and_since(rt: RealtimeServer) -> None:
    """limit is clamped to 1..25 and `since` filters by inserted_at (ms, inclusive)."""
    for n in range(3):
        rt.send_db(TOPIC, "e", {"n": n})
    async with raw(rt) as c:
        await c.join(token=rt.make_token(), broadcast={"replay": {"since": 0, "limit": 0}})
        assert [f["payload"]["payload"]["n"] for f in await c.sync()] == [2]
        since = rt.messages[1].inserted_ms
        await c.join(
            "realtime:project:p1",
            token=rt.make_token(),
            broadcast={"replay": {"since": since, "limit": 100}},
        )
        frames = await c.sync()
        assert [f["event"] for f in frames[:1]] == ["phx_close"]  # duplicate join closes old
        assert [f["payload"]["payload"]["n"] for f in frames[1:]][-2:] == [1, 2]


async def test_rest_routes(rt: RealtimeServer, http: aiohttp.ClientSession) -> None:
    """POST /realtime/v1/api/broadcast and /broadcast/{topic}/events/{event}: 202/401/403/422/429."""
    rt.policy = lambda claims, _t: Policy(read=True, write=bool(claims.get("w")))
    writer, reader = rt.make_token(w=True), rt.make_token()
    base = f"{rt.url}/api/broadcast"
    async with raw(rt) as priv, raw(rt) as pub:
        await priv.join(token=rt.make_token(), ref="1")
        await pub.join(token=rt.make_token(), ref="1", private=False)
        headers = {"apikey": rt.anon_key, "Authorization": f"Bearer {reader}"}
        batch = {
            "messages": [
                {"topic": TOPIC, "event": "a", "payload": {"x": 1}, "private": True, "id": "m1"},
                {"topic": TOPIC, "event": "b", "payload": {"x": 2}},
            ]
        }
        async with http.post(base, json=batch, headers=headers) as resp:
            assert resp.status == 202
            assert await resp.read() == b""
        assert await priv.sync() == []  # reader may not write: silently skipped
        assert await pub.sync() == [
            {
                "topic": WIRE,
                "event": "broadcast",
                "ref": None,
                "payload": {"payload": {"x": 2}, "event": "b", "type": "broadcast"},
            }
        ]
        headers["Authorization"] = f"Bearer {writer}"
        async with http.post(base, json=batch, headers=headers) as resp:
            assert resp.status == 202
        assert len(await pub.sync()) == 1  # the public item again
        assert (await priv.sync())[0]["payload"] == {
            "payload": {"x": 1},
            "event": "a",
            "type": "broadcast",
            "meta": {"id": "m1"},
        }
        single = f"{base}/{TOPIC.replace(':', '%3A')}/events/ping"
        async with http.post(
            single, params={"private": "true"}, json=[1, 2], headers=headers
        ) as resp:
            assert resp.status == 202
        assert (await priv.sync())[0]["payload"] == {
            "event": "ping",
            "payload": {"_json": [1, 2]},
            "type": "broadcast",
        }
        headers["Authorization"] = f"Bearer {reader}"
        async with http.post(single, params={"private": "true"}, json={}, headers=headers) as resp:
            assert (resp.status, await resp.json()) == (403, {"message": "Unauthorized"})
        headers["Authorization"] = "Bearer potato"
        async with http.post(single, json={}, headers=headers) as resp:
            assert (resp.status, await resp.json()) == (401, {"message": "Unauthorized"})
        async with http.post(single, json={}, headers={"apikey": "nope"}) as resp:
            assert resp.status == 401
        octet = {"apikey": rt.anon_key, "Content-Type": "application/octet-stream"}
        async with http.post(single, data=b"\x00bin", headers=octet) as resp:
            assert resp.status == 202
        assert await pub.sync() == []  # binary bodies are invisible to V1 sockets
        rt.knobs.max_payload_kb = 1
        async with http.post(
            base,
            json={"messages": [{"topic": "t", "event": "e", "payload": {"pad": "x" * 2000}}]},
            headers={"apikey": rt.anon_key},
        ) as resp:
            assert resp.status == 422
            assert (await resp.json())["errors"]["messages"][0] == {
                "payload": ["Payload size exceeds tenant limit"]
            }
        rt.rate_limit(True)
        async with http.post(base, json=batch, headers={"apikey": rt.anon_key}) as resp:
            assert (resp.status, await resp.json()) == (
                429,
                {"message": "You have exceeded your rate limit"},
            )


async def test_py_http_send(rt: RealtimeServer) -> None:
    """realtime-py's channel.http_send() reaches subscribers through the single REST route."""
    async with py_client(rt) as client:
        ch, _, got = await py_subscribe(client, rt.make_token())
        await ch.http_send("file:update", {"path": "b.txt"})
        await rt.wait_until(lambda: len(got) == 1)
        assert got == [{"event": "file:update", "payload": {"path": "b.txt"}}]


async def test_send_binary_never_reaches_v1(rt: RealtimeServer) -> None:
    """send_binary rows are stored but never delivered to V1 sockets, live or on replay."""
    async with raw(rt) as c:
        await c.join(token=rt.make_token())
        rid = rt.send_binary(TOPIC, "blob", b"\x00\x01")
        assert await c.sync() == []
        assert rt.messages[-1].id == rid
        assert rt.messages[-1].binary_payload == b"\x00\x01"
        await c.join(
            "realtime:project:p1", token=rt.make_token(), broadcast={"replay": {"since": 0}}
        )
        assert [f["event"] for f in await c.sync()] == ["phx_close"]


async def test_v2_protocol(rt: RealtimeServer, http: aiohttp.ClientSession) -> None:
    """V2 arrays: join/heartbeat replies carry join_ref; realtime.send arrives as binary kind 4."""
    url = f"{rt.ws_url}?apikey={rt.anon_key}&vsn=2.0.0"
    async with http.ws_connect(url) as ws, raw(rt) as v1:
        await v1.join(token=rt.make_token())
        await ws.send_str(
            json.dumps(
                [
                    "1",
                    "1",
                    WIRE,
                    "phx_join",
                    {"config": {"private": True}, "access_token": rt.make_token()},
                ]
            )
        )
        assert json.loads((await ws.receive(timeout=3)).data) == [
            "1",
            "1",
            WIRE,
            "phx_reply",
            {"status": "ok", "response": {"postgres_changes": []}},
        ]
        rid = rt.send_db(TOPIC, "e", {"v": 1})
        msg = await ws.receive(timeout=3)
        assert msg.type == aiohttp.WSMsgType.BINARY
        assert msg.data == wire.encode_user_broadcast(
            WIRE,
            "e",
            json.dumps({"v": 1, "id": rid}, separators=(",", ":")).encode(),
            json_encoded=True,
            metadata={"id": rid},
        )
        await v1.sync()
        # A V2 binary user broadcast push (kind 3) reaches V1 subscribers as JSON.
        push = bytes([3, 1, 1, len(WIRE), 4, 0, 1]) + b"12" + WIRE.encode() + b"evt!" + b'{"k":"v"}'
        await ws.send_bytes(push)
        assert await v1.sync() == [
            {
                "topic": WIRE,
                "event": "broadcast",
                "ref": None,
                "payload": {"event": "evt!", "payload": {"k": "v"}, "type": "broadcast"},
            }
        ]


# ---- faults -------------------------------------------------------------------------------


async def test_py_crash_rejoins(rt: RealtimeServer) -> None:
    """crash(): phx_error with the join_ref → CHANNEL_ERROR, rejoin after ~1 s, SUBSCRIBED."""
    async with py_client(rt) as client:
        _, states, _ = await py_subscribe(client, rt.make_token())
        assert rt.crash(TOPIC) == 1
        await rt.wait_until(lambda: states.states.count(SUBSCRIBED) == 2, timeout=4)
        assert states.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED]
        assert 0.8 < states.times[2] - states.times[1] < 2.0
        assert {"topic": WIRE, "event": "phx_error", "payload": {}, "ref": "1"} in rt.frames_out()


async def test_py_shutdown_closes_channel(rt: RealtimeServer) -> None:
    """shutdown(): system error with the message, then phx_close → CHANNEL_ERROR then CLOSED."""
    async with py_client(rt) as client:
        ch, states, _ = await py_subscribe(client, rt.make_token())
        rt.shutdown(TOPIC, "Too many messages per second")
        await rt.wait_until(lambda: CLOSED in states.states)
        assert states.states == [SUBSCRIBED, CHANNEL_ERROR, CLOSED]
        assert "Too many messages per second" in str(states.items[1][1])
        assert ch.topic not in client.channels
        assert not rt.joined(TOPIC)


async def test_server_disconnect_and_close_codes(rt: RealtimeServer) -> None:
    """server_disconnect(): system ok without `channel`, then 1012; close(code) uses the code."""
    async with raw(rt) as c:
        await c.join(token=rt.make_token())
        rt.server_disconnect()
        assert await c.recv() == {
            "topic": WIRE,
            "event": "system",
            "ref": None,
            "payload": {
                "extension": "system",
                "status": "ok",
                "message": "Server requested disconnect",
            },
        }
        assert await c.expect_close() == 1012
    for code in (1000, 1001, 1012):
        async with raw(rt) as c:
            await c.sync()
            rt.close(code)
            assert await c.expect_close() == code


async def test_py_abort_reconnects_with_latest_token(rt: RealtimeServer) -> None:
    """Abort() → CHANNEL_ERROR, immediate reconnect, rejoin with the newest token."""
    async with py_client(rt) as client:
        _, states, _ = await py_subscribe(client, rt.make_token())
        newest = rt.make_token(role="newest")
        await client.set_auth(newest)
        await rt.wait_until(lambda: rt.channels(TOPIC)[0].token == newest)
        aborted_at = time.monotonic()
        rt.abort()
        await rt.wait_until(lambda: states.states.count(SUBSCRIBED) == 2)
        assert states.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED]
        assert states.times[2] - aborted_at < 1.0
        rejoin = next(f.data for f in rt.sockets[1].frames_in if f.data["event"] == "phx_join")
        assert rejoin["payload"]["access_token"] == newest
        assert rt.channels(TOPIC)[0].claims["role"] == "newest"


async def test_py_gives_up_after_refused_reconnects(rt: RealtimeServer) -> None:
    """Refuse_connects(401) + abort() → 5 failed attempts, InvalidStatus in _listen_task."""
    async with py_client(rt, initial_backoff=0.02) as client:
        await py_subscribe(client, rt.make_token())
        rt.refuse_connects(401)
        rt.abort()
        await rt.wait_until(lambda: client._listen_task is None or client._listen_task.done())
        assert client._listen_task is not None
        exc = client._listen_task.exception()
        assert isinstance(exc, websockets.exceptions.InvalidStatus)
        assert exc.response.status_code == 401
        assert json.loads(exc.response.body) == {"error": "Token has expired"}
        assert rt.counters.handshakes == 1 + 5
        assert not client.is_connected


async def test_stall_stops_pongs_and_client_keepalive_fails(rt: RealtimeServer) -> None:
    """stall(): no reads, no pongs; a websockets client with a short keepalive closes with 1011."""
    url = f"{rt.ws_url}?apikey={rt.anon_key}&vsn=1.0.0"
    # realtime-py keeps websockets' defaults (ping every 20 s, 20 s timeout, 10 s close timeout).
    async with websockets.connect(
        url, ping_interval=0.2, ping_timeout=0.3, close_timeout=0.3
    ) as ws:
        await ws.send(
            json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "1"})
        )
        await ws.recv()
        rt.stall()
        with pytest.raises(websockets.exceptions.ConnectionClosedError) as info:
            async with asyncio.timeout(3):
                await ws.recv()
        assert info.value.sent is not None
        assert info.value.sent.code == 1011
        assert info.value.rcvd is None  # the stalled server never answered
    rt.abort()
    async with raw(rt) as c:  # new sockets are not stalled
        assert await c.sync() == []


async def test_py_oversize_frame_1009_then_reconnect(rt: RealtimeServer) -> None:
    """oversize_frame(): realtime-py closes with 1009, reconnects and rejoins."""
    async with py_client(rt) as client:
        _, states, got = await py_subscribe(client, rt.make_token())
        rt.oversize_frame(1_100_000)
        await rt.wait_until(lambda: states.states.count(SUBSCRIBED) == 2)
        assert rt.sockets[0].close_code == 1009
        assert states.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED]
        assert got == []


async def test_py_stale_close_removes_channel_server_keeps_it(rt: RealtimeServer) -> None:
    """stale_close(): realtime-py removes the channel on any phx_close; the server keeps it."""
    async with py_client(rt) as client:
        ch, states, got = await py_subscribe(client, rt.make_token())
        rt.stale_close(TOPIC, ref="0")
        await rt.wait_until(lambda: CLOSED in states.states)
        assert ch.topic not in client.channels
        assert rt.joined(TOPIC)
        rt.send_db(TOPIC, "e", {"lost": True})
        await rt.wait_until(
            lambda: any(f.data["event"] == "broadcast" for f in rt.sockets[0].frames_out)
        )
        assert got == []  # silently discarded by the client


async def test_py_slow_join_stale_close_bug(rt: RealtimeServer) -> None:
    """A join slower than the client's push timeout reproduces realtime-py's stale-close bug.

    1. realtime-py (push timeout 1 s here, 10 s by default) reports TIMED_OUT and rejoins.
    2. The server answers the slow join, then handles the rejoin as a duplicate join: ok reply,
       then phx_close with the old join_ref.
    3. realtime-py reports SUBSCRIBED, then CLOSED, and drops the channel the server still has.
    """
    rt.delay_next_join(1.5)
    async with py_client(rt, timeout=1) as client:
        ch, states, _ = await py_subscribe(client, rt.make_token())
        await rt.wait_until(lambda: CLOSED in states.states, timeout=6)
        assert states.states == [
            RealtimeSubscribeStates.TIMED_OUT,
            SUBSCRIBED,
            CLOSED,
        ]
        assert ch.topic not in client.channels
        assert [c.join_ref for c in rt.channels(TOPIC)] == ["2"]
        assert {"topic": WIRE, "event": "phx_close", "payload": {}, "ref": "1"} in rt.frames_out()


async def test_zero_channel_sweep(rt: RealtimeServer) -> None:
    """Sockets that had channels and now have none are dropped (TCP) by the sweep."""
    async with raw(rt) as idle, raw(rt) as left:
        await left.join(token=rt.make_token(), ref="1")
        await left.send(
            {"topic": WIRE, "event": "phx_leave", "payload": {}, "ref": "2", "join_ref": "1"}
        )
        await left.sync()
        rt.zero_channel_sweep(0.05)
        assert await left.expect_close() == 1006
        assert rt.sockets[1].aborted
        assert not rt.sockets[0].aborted
        assert await idle.sync() == []


async def test_rate_limit(rt: RealtimeServer) -> None:
    """rate_limit(): send_db dropped, next delivered message shuts the channel down; knob too."""
    async with raw(rt) as a, raw(rt) as b:
        await a.join(token=rt.make_token(), ref="1")
        await b.join(token=rt.make_token(), ref="1")
        rt.rate_limit(True)
        assert rt.send_db(TOPIC, "e", {}) is not None  # stored, not delivered
        assert await b.sync() == []
        await a.send(
            {
                "topic": WIRE,
                "event": "broadcast",
                "ref": "2",
                "join_ref": "1",
                "payload": {"type": "broadcast", "event": "e", "payload": {"v": 1}},
            }
        )
        await a.sync()
        frames = await b.sync()
        assert [f["event"] for f in frames] == ["broadcast", "system", "phx_close"]
        assert frames[1]["payload"]["message"] == "Too many messages per second"
        rt.rate_limit(False)


async def test_events_per_second_limit() -> None:
    """max_events_per_second: a 60 s average, counted per delivered copy."""
    async with (
        RealtimeServer(knobs=fast_knobs(max_events_per_second=2 / 60)) as rt,
        raw(rt) as c,
    ):
        await c.join(token=rt.make_token(), ref="1")
        for n in range(4):
            rt.send_db(TOPIC, "e", {"n": n})
        # The third copy pushes the 60 s average over 2/60: delivered, then the shutdown;
        # the fourth send is dropped while triggered.
        events = [f["event"] for f in await c.sync()]
        assert events == ["broadcast", "broadcast", "broadcast", "system", "phx_close"]
        assert len(rt.messages) == 4


async def test_joins_per_second_limit(http: aiohttp.ClientSession) -> None:
    """max_joins_per_second: handshakes get 429, joins ClientJoinRateLimitReached + 1001."""
    async with RealtimeServer(knobs=fast_knobs(max_joins_per_second=1)) as rt, raw(rt) as c:
        assert (await c.join("realtime:j1", token=rt.make_token()))["payload"]["status"] == "ok"
        assert (await c.join("realtime:j2", token=rt.make_token()))["payload"]["status"] == "ok"
        async with http.get(f"{rt.ws_url}?apikey={rt.anon_key}&vsn=1.0.0") as resp:
            assert (resp.status, await resp.json()) == (429, {"error": "Too many joins per second"})
        reply = await c.join("realtime:j3", token=rt.make_token())
        assert reply["payload"]["response"]["reason"] == (
            "ClientJoinRateLimitReached: Too many joins per second"
        )
        assert await c.expect_close() == 1001


async def test_py_drops_broadcast_without_ref(rt: RealtimeServer) -> None:
    """Realtime-py drops a broadcast frame without a `ref` key; ours always carry one."""
    async with py_client(rt) as client:
        _, _, got = await py_subscribe(client, rt.make_token())
        rt.send_raw(
            {
                "topic": WIRE,
                "event": "broadcast",
                "payload": {"type": "broadcast", "event": "no-ref", "payload": {"a": 1}},
            },
            topic=TOPIC,
        )
        rt.send_db(TOPIC, "with-ref", {"b": 2})
        await rt.wait_until(lambda: len(got) == 1)
        await rt.wait_until(lambda: rt.counters.frames_out >= 3)
        assert [m["event"] for m in got] == ["with-ref"]


async def test_py_policy_denied_real_backoff_then_set_auth() -> None:
    """With the real 5 s backoff: CHANNEL_ERROR after ~5 s; set_auth → SUBSCRIBED."""
    async with RealtimeServer(knobs=Knobs(connect_error_backoff=0.0)) as rt:
        assert rt.knobs.channel_error_backoff == 5.0
        rt.policy = _deny_unless_ok
        async with py_client(rt) as client:
            started = time.monotonic()
            _, states, _ = await py_subscribe(client, rt.make_token())
            assert states.states == [CHANNEL_ERROR]
            assert 4.9 <= time.monotonic() - started < 6.5
            assert (
                f"Unauthorized: You do not have permissions to read from this Channel "
                f"topic: {TOPIC}"
            ) in str(states.items[0][1])
            await client.set_auth(rt.make_token(ok=True))
            await rt.wait_until(lambda: SUBSCRIBED in states.states, timeout=4)
            assert 0.8 < states.times[1] - states.times[0] < 2.5  # the +1 s rejoin


# ---- standalone server and realtime-js -----------------------------------------------------------


async def test_standalone_admin_api(http: aiohttp.ClientSession) -> None:
    """`python -m sidecar.testing.realtime.server` serves /_admin/token, send, fault and state."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.testing.realtime.server",
        "--port",
        "0",
        "--jwt-secret",
        "s" * 40,
        "--anon-key",
        "sb_publishable_demo",
        "--channel-error-backoff",
        "0",
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(15):
            while True:
                line = json.loads(await proc.stderr.readline())
                if line["event"] == "realtime_server.listening":
                    break
        base = line["url"].removesuffix("/realtime/v1")
        async with http.post(
            f"{base}/_admin/token", json={"role": "authenticated", "exp_in": 60}
        ) as resp:
            token = (await resp.json())["token"]
        client = AsyncRealtimeClient(line["url"], token="sb_publishable_demo")
        try:
            await client.set_auth(token)
            got: list[Any] = []
            params: Any = {"config": {"private": True}}
            ch = client.channel(TOPIC, params)
            ch.on_broadcast("*", got.append)
            states = States()
            await ch.subscribe(states)
            assert states.states == [SUBSCRIBED]
            async with http.post(
                f"{base}/_admin/send", json={"topic": TOPIC, "event": "e", "payload": {"k": 1}}
            ) as resp:
                row_id = (await resp.json())["id"]
            async with asyncio.timeout(5):
                while not got:
                    await asyncio.sleep(0.02)
            assert got[0]["meta"]["id"] == row_id
            async with http.post(
                f"{base}/_admin/fault", json={"kind": "crash", "topic": TOPIC}
            ) as resp:
                assert (await resp.json())["result"] == 1
            async with http.post(f"{base}/_admin/fault", json={"kind": "nope"}) as resp:
                assert resp.status == 400
            async with http.get(f"{base}/_admin/state") as resp:
                state = await resp.json()
            assert state["counters"]["accepted"] == 1
            assert state["knobs"]["channel_error_backoff"] == 0.0
            assert state["counters"]["joins_ok"] == 1
            async with http.post(f"{base}/_admin/knobs", json={"private_only": True}) as resp:
                assert (await resp.json())["private_only"] is True
            async with http.post(f"{base}/_admin/knobs", json={"nope": 1}) as resp:
                assert resp.status == 400
            async with http.post(f"{base}/_admin/policy", json={"read": False}) as resp:
                assert resp.status == 200
            denied = States()
            await client.channel("project:denied", params).subscribe(denied)
            assert denied.states == [CHANNEL_ERROR]
            assert "Unauthorized" in str(denied.items[0][1])
        finally:
            await client.close()
    finally:
        proc.terminate()
        await proc.wait()


def _node_has_websocket(node: str) -> list[str] | None:
    for flags in ([], ["--experimental-websocket"]):
        ok = subprocess.run(
            [node, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if ok.returncode == 0:
            return flags
    return None


async def test_realtime_js_conformance(rt: RealtimeServer) -> None:
    """@supabase/realtime-js (vsn 2.0.0 and 1.0.0) joins, gets a replay, realtime.send and REST."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed: realtime-js conformance not checked")
    if not (JS_DIR / "node_modules" / "@supabase" / "realtime-js").is_dir():
        done = await asyncio.to_thread(
            subprocess.run,
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    flags = await asyncio.to_thread(_node_has_websocket, node)
    assert flags is not None, "this node has no WebSocket, even with --experimental-websocket"
    replay_id = rt.send_db("project:js", "file:update", {"path": "old.txt"})
    assert replay_id is not None
    env = {
        **os.environ,
        "RT_URL": rt.url,
        "RT_ADMIN": rt.base_url,
        "RT_APIKEY": rt.anon_key,
        "RT_TOKEN": rt.make_token(),
        "RT_TOPIC": "project:js",
        "RT_REPLAY_ID": replay_id,
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        *flags,
        "conformance.mjs",
        cwd=JS_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, (out.decode(), err.decode())
    assert b"ok vsn 2.0.0" in out
    assert b"ok vsn 1.0.0" in out
