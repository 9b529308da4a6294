"""A local stand-in for the Supabase REST (PostgREST) RPCs over a versioned `project_files` table.

Functions, all `POST /rest/v1/rpc/<name>` with a JSON object of named arguments (PostgREST style):

- `upsert_project_file(project_uuid, p_file_path, p_content, p_file_type, expected_version)`:
  optimistic concurrency. When `expected_version` is not null and differs from the row's current
  version (0 for a path that never existed; a tombstone keeps its version) the answer is
  `409 {"code": "PT409", "message": "version conflict", "details": "<json>", "hint": ...}`: what
  PostgREST returns for `RAISE SQLSTATE 'PT409' USING MESSAGE = 'version conflict', DETAIL = ...`
  (a `PTxyz` SQLSTATE sets the HTTP status). `details` is a JSON string
  `{"file_path", "expected_version", "current_version"}`. Otherwise the version goes up by one and
  the answer is `{"file_path", "version", "content_hash"}`. `p_file_type = "binary"` means
  `p_content` is base64; any other type is UTF-8 text.
- `delete_project_file(project_uuid, p_file_path, expected_version)`: a tombstone (version + 1),
  same conflict rule. Deleting what is already gone is an idempotent no-op.
- `list_current_files(project_uuid)`: the live rows, with their content.
- `get_project_file(project_uuid, p_file_path)`: one row (tombstones too), or null.
- `report_local_change(project_uuid, payload)`: a container's local-change report, re-broadcast
  as `file:local-change` with the token's `sender` (no seq); a read-only token may call it.
- `request_snapshot(project_uuid, p_reason, p_last_seq)`: recorded in `snapshot_requests` and
  re-broadcast as `snapshot:request` (the real database notifies its snapshot worker instead),
  so the test Producer answers it with `snapshot:ready`; returns `{request_id}`.

Auth is Supabase's: an `apikey` header (the anon key, or any JWT signed with the server's secret)
and `Authorization: Bearer <JWT>` verified with HS256. A token may only touch the project named by
its `project_id` claim (403, code 42501, otherwise), unless its role is `service_role`; a token
with `read_only: true` may list and get but not write. Errors use PostgREST's JSON shape and codes
(PGRST301 bad JWT, PGRST303 expired, PGRST202 unknown function or arguments).

Every change is broadcast the way the database's `realtime.send` would be, through an injected
broadcaster (`RealtimeServer.send_db`): `file:update {file_path, content | content_b64 |
content_url, content_hash, version, seq, timestamp, sender}` or `file:delete {file_path, version,
seq, timestamp, sender}`, with a gap-free `seq` per project, on topic `project:<id>`. Content
larger than `inline_limit` travels by `content_url`, served by this server. The sender is the
token's `session_id` claim (else `sub`). In-process listeners and a Python API (`editor_upsert`,
`editor_delete`, `head`, `files`, `history`) serve tests and the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import inspect
import json
import secrets
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import jwt
import structlog
from aiohttp import web

from sidecar.snapshot.build import build_snapshot
from sidecar.snapshot.manifest import Manifest
from sidecar.testing._server import LoopbackServer, until_terminated
from sidecar.testing.postgrest_auth import RpcError, TokenIssuer, decode_token

__all__ = [
    "Broadcaster",
    "HttpBroadcaster",
    "Revision",
    "Row",
    "RpcFaults",
    "RpcServer",
    "main",
]

log = structlog.get_logger(component="rpc_server")

RPC_PREFIX = "/rest/v1/rpc/"
CONTENT_PREFIX = "/rpc-content/"
DEFAULT_INLINE_LIMIT = 200_000  # below the 256 KB free-plan broadcast limit, with room for JSON

_SIGNATURES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # function -> (required, optional) argument names
    "upsert_project_file": (
        frozenset({"project_uuid", "p_file_path", "p_content"}),
        frozenset({"p_file_type", "expected_version"}),
    ),
    "delete_project_file": (
        frozenset({"project_uuid", "p_file_path"}),
        frozenset({"expected_version"}),
    ),
    "list_current_files": (frozenset({"project_uuid"}), frozenset()),
    "get_project_file": (frozenset({"project_uuid", "p_file_path"}), frozenset()),
    "report_local_change": (frozenset({"project_uuid", "payload"}), frozenset()),
    "request_snapshot": (frozenset({"project_uuid"}), frozenset({"p_reason", "p_last_seq"})),
}
_WRITES = frozenset({"upsert_project_file", "delete_project_file"})


class Broadcaster(Protocol):
    """What the server needs from Realtime: `realtime.send(payload, event, topic, private)`."""

    def send_db(
        self, topic: str, event: str, payload: dict[str, Any], private: bool = True
    ) -> object: ...


class HttpBroadcaster:
    """Broadcasts through a standalone RealtimeServer's admin API (`POST /_admin/send`)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def send_db(
        self, topic: str, event: str, payload: dict[str, Any], private: bool = True
    ) -> None:
        """Post one broadcast to the admin API."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = {"topic": topic, "event": event, "payload": payload, "private": private}
        async with self._session.post(f"{self.admin_url}/_admin/send", json=body) as resp:
            resp.raise_for_status()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(slots=True)
class Row:
    """The head of one path: `content is None` marks a tombstone."""

    version: int
    content: bytes | None
    file_type: str = "text"
    updated_at: float = 0.0
    sender: str | None = None

    @property
    def deleted(self) -> bool:
        return self.content is None

    @property
    def sha256(self) -> str | None:
        return None if self.content is None else hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True, slots=True)
class Revision:
    """One accepted change, kept forever for test assertions (`content is None`: a delete)."""

    project_id: str
    path: str
    version: int
    content: bytes | None = field(repr=False)
    sender: str | None
    seq: int
    timestamp: float


@dataclass(slots=True)
class RpcFaults:
    """Fault knobs read on every RPC; tests may change them at any time.

    fail_first: answer `fail_status` (PostgREST's 503 shape) to the next N RPCs.
    drop_first: close the connection without an answer for the next N RPCs (nothing applied).
    lose_response_first: apply the next N writes, then close the connection before answering.
    delay: seconds to wait before handling each RPC.
    gate: when set to an Event, every RPC waits for it (holds a push in flight until the test
        releases it); `gated` counts the RPCs that reached it.
    content_trickle: serve content_url bodies at most this many bytes per second (the gateway,
        sidecar/testing/gateway.py: get_project_file answers, where large bodies come from).
    """

    fail_first: int = 0
    fail_status: int = 503
    drop_first: int = 0
    lose_response_first: int = 0
    delay: float = 0.0
    gate: asyncio.Event | None = None
    gated: int = 0
    content_trickle: float | None = None  # bytes per second for content_url bodies

    def raise_injected(self) -> None:
        """Raise the injected failure if `fail_first` still counts (each call uses one)."""
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RpcError(
                self.fail_status,
                "PGRST000",
                "Could not connect with the database due to an injected fault",
            )

    def reset(self) -> None:
        """Clear every fault."""
        for f in fields(self):
            setattr(self, f.name, f.default)


Listener = Callable[[str, str, dict[str, Any]], None]


class RpcServer(TokenIssuer, LoopbackServer):
    """PostgREST-style RPC server over an in-memory `project_files` table; async ctx manager.

    Large (about 500 lines) because it is a second implementation of the migration's RPCs
    (sidecar/sql/001_sidecar.sql) for fast unit tests, with fault knobs; the gateway over
    PostgreSQL (`gateway.py`) is the reference.

    Args:
        realtime: where changes are broadcast (a RealtimeServer, or anything with `send_db`).
        jwt_secret: HS256 secret for tokens (default: the realtime server's, else random).
        jwks: public keys ({"keys": [...]}) that verify ES256/RS256 tokens by `kid`, like
            PostgREST's `jwt-secret` set to a JWKS (default: the realtime server's, if any).
        anon_key: the accepted `apikey` (default: the realtime server's `anon_key`, if any).
        inline_limit: content above this many bytes is broadcast by `content_url`.
    """

    def __init__(
        self,
        *,
        realtime: Broadcaster | None = None,
        jwt_secret: str | None = None,
        anon_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        private: bool = True,
        jwks: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(host, port)
        self.realtime = realtime
        self.jwt_secret = (
            jwt_secret or getattr(realtime, "jwt_secret", None) or secrets.token_urlsafe(32)
        )
        self.jwt_jwks: Mapping[str, Any] | None = jwks or getattr(realtime, "jwt_jwks", None)
        self.anon_key: str = (
            anon_key
            or getattr(realtime, "anon_key", None)
            or self.make_token(None, role="anon", exp_in=10 * 365 * 86400)
        )
        self.inline_limit = inline_limit
        self.private = private
        self.faults = RpcFaults()
        self.calls: list[tuple[str, int]] = []  # (function, status) for assertions
        self.history: list[Revision] = []
        self.snapshot_requests: list[dict[str, Any]] = []  # rpc/request_snapshot calls
        self._request_id = 0
        self._rows: dict[str, dict[str, Row]] = {}
        self._seq: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._blobs: dict[str, bytes] = {}
        self._listeners: list[Listener] = []

    # -- lifecycle --

    def routes(self, app: web.Application) -> None:
        """The RPCs, large-content URLs and the admin endpoints."""
        app.router.add_post(RPC_PREFIX + "{name}", self._handle_rpc)
        app.router.add_get(CONTENT_PREFIX + "{key}", self._handle_content)
        app.router.add_post("/_admin/fault", self._handle_fault)
        app.router.add_post("/_admin/token", self._handle_token)
        app.router.add_post("/_admin/upsert", self._handle_admin_upsert)
        app.router.add_get("/healthz", self._handle_health)

    @property
    def url(self) -> str:
        """The SUPABASE_URL-like root, e.g. http://127.0.0.1:PORT (RPCs under /rest/v1/rpc/)."""
        return self.base_url

    # -- Python API (editor side, tests) --

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call listener(topic, event, payload) for every broadcast; returns a remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def editor_upsert(
        self,
        project_id: str,
        path: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        sender: str = "editor",
        file_type: str | None = None,
    ) -> int:
        """Write a file as the editor does (no expected_version by default); the new version."""
        ftype = file_type or ("text" if _is_utf8(data) else "binary")
        return (await self._upsert(project_id, path, data, ftype, expected_version, sender))[0]

    async def editor_delete(
        self,
        project_id: str,
        path: str,
        *,
        expected_version: int | None = None,
        sender: str = "editor",
    ) -> int:
        """Delete a file as the editor does; the tombstone's version."""
        return await self._delete(project_id, path, expected_version, sender)

    async def editor_bulk(
        self, project_id: str, changes: Mapping[str, bytes | None], *, sender: str = "editor"
    ) -> int:
        """Apply several writes (None deletes) as one transaction and broadcast a single
        `bulk:apply` with one seq, as a multi-file save would; returns that seq."""
        async with self._lock(project_id):
            rows = self._rows.setdefault(project_id, {})
            now = time.time()
            seq = self._seq.get(project_id, 0) + 1
            files: list[dict[str, Any]] = []
            for path, data in changes.items():
                row = rows.get(path)
                version = (0 if row is None else row.version) + 1
                if data is None:
                    if row is None or row.deleted:
                        continue
                    rows[path] = Row(version, None, row.file_type, now, sender)
                    files.append({"action": "delete", "file_path": path, "version": version})
                else:
                    ftype = "text" if _is_utf8(data) else "binary"
                    rows[path] = Row(version, data, ftype, now, sender)
                    files.append(
                        {
                            "action": "update",
                            "file_path": path,
                            "version": version,
                            "content_b64": base64.b64encode(data).decode(),
                            "content_hash": hashlib.sha256(data).hexdigest(),
                        }
                    )
                self.history.append(Revision(project_id, path, version, data, sender, seq, now))
            if not files:
                return self._seq.get(project_id, 0)
            self._seq[project_id] = seq
            payload: dict[str, Any] = {
                "files": files,
                "seq": seq,
                "timestamp": int(now * 1000),
                "sender": sender,
            }
            topic = f"project:{project_id}"
            for listener in list(self._listeners):
                listener(topic, "bulk:apply", dict(payload))
            if self.realtime is not None:
                result = self.realtime.send_db(topic, "bulk:apply", payload, private=self.private)
                if inspect.isawaitable(result):
                    await result
            return seq

    def head(self, project_id: str, path: str) -> Row | None:
        """The current row for path (a tombstone has content None), or None."""
        return self._rows.get(project_id, {}).get(path)

    def files(self, project_id: str) -> dict[str, bytes]:
        """The live files of a project: path -> bytes."""
        return {
            p: r.content for p, r in self._rows.get(project_id, {}).items() if r.content is not None
        }

    def versions(self, project_id: str) -> dict[str, int]:
        """Every path's current version (tombstones included)."""
        return {p: r.version for p, r in self._rows.get(project_id, {}).items()}

    def seq(self, project_id: str) -> int:
        """The last broadcast seq of a project (0 before any)."""
        return self._seq.get(project_id, 0)

    def seed(self, project_id: str, files: Mapping[str, bytes], *, version: int = 1) -> None:
        """Load rows without broadcasting (the state a snapshot was built from)."""
        rows = self._rows.setdefault(project_id, {})
        for path, data in files.items():
            rows[path] = Row(version, data, "text" if _is_utf8(data) else "binary", time.time())

    async def snapshot(
        self, project_id: str, out: Path, *, snapshot_id: str | None = None
    ) -> Manifest:
        """Build a format-1 snapshot (.tar.zst at out) of the live files, with versions and seq.

        What a snapshot producer answering `snapshot:request` would publish; `seq` is the last
        broadcast seq, so events up to it are already inside.
        """
        async with self._lock(project_id):
            files = self.files(project_id)
            versions = {p: r.version for p, r in self._rows.get(project_id, {}).items()}
            seq = self.seq(project_id)

        def build() -> Manifest:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                for path, data in files.items():
                    target = root / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                return build_snapshot(
                    root,
                    out,
                    project_id=project_id,
                    snapshot_id=snapshot_id,
                    seq=seq,
                    versions=versions,
                )

        return await asyncio.to_thread(build)

    # -- the table --

    def _lock(self, project_id: str) -> asyncio.Lock:
        return self._locks.setdefault(project_id, asyncio.Lock())

    async def _upsert(
        self,
        project_id: str,
        path: str,
        data: bytes,
        file_type: str,
        expected: int | None,
        sender: str | None,
    ) -> tuple[int, str]:
        async with self._lock(project_id):
            rows = self._rows.setdefault(project_id, {})
            row = rows.get(path)
            current = 0 if row is None else row.version
            _check_expected(path, expected, current)
            now = time.time()
            new = Row(current + 1, data, file_type, now, sender)
            rows[path] = new
            digest = hashlib.sha256(data).hexdigest()
            payload: dict[str, Any] = {
                "file_path": path,
                "content_hash": digest,
                "version": new.version,
            }
            if len(data) > self.inline_limit:
                key = secrets.token_urlsafe(24)
                self._blobs[key] = data
                payload["content_url"] = f"{self.url}{CONTENT_PREFIX}{key}"
            elif file_type != "binary" and _is_utf8(data):
                payload["content"] = data.decode()
            else:
                payload["content_b64"] = base64.b64encode(data).decode()
            await self._broadcast(
                project_id, "file:update", payload, path, new.version, data, sender, now
            )
            return new.version, digest

    async def _delete(
        self, project_id: str, path: str, expected: int | None, sender: str | None
    ) -> int:
        async with self._lock(project_id):
            rows = self._rows.setdefault(project_id, {})
            row = rows.get(path)
            current = 0 if row is None else row.version
            _check_expected(path, expected, current)
            if row is None or row.deleted:
                return current  # already gone: idempotent, nothing to broadcast
            now = time.time()
            rows[path] = Row(current + 1, None, row.file_type, now, sender)
            await self._broadcast(
                project_id,
                "file:delete",
                {"file_path": path, "version": current + 1},
                path,
                current + 1,
                None,
                sender,
                now,
            )
            return current + 1

    async def _broadcast(
        self,
        project_id: str,
        event: str,
        payload: dict[str, Any],
        path: str,
        version: int,
        data: bytes | None,
        sender: str | None,
        now: float,
    ) -> None:
        seq = self._seq.get(project_id, 0) + 1
        self._seq[project_id] = seq
        payload.update(seq=seq, timestamp=int(now * 1000), sender=sender)
        self.history.append(Revision(project_id, path, version, data, sender, seq, now))
        topic = f"project:{project_id}"
        for listener in list(self._listeners):
            listener(topic, event, dict(payload))
        if self.realtime is not None:
            result = self.realtime.send_db(topic, event, payload, private=self.private)
            if inspect.isawaitable(result):
                await result
        log.debug(
            "rpc_server.broadcast",
            topic=topic,
            event_name=event,
            path=path,
            version=version,
            seq=seq,
        )

    async def _send_db(self, project_id: str, event: str, payload: dict[str, Any]) -> None:
        topic = f"project:{project_id}"
        for listener in list(self._listeners):
            listener(topic, event, dict(payload))
        if self.realtime is not None:
            result = self.realtime.send_db(topic, event, payload, private=self.private)
            if inspect.isawaitable(result):
                await result

    # -- HTTP --

    async def _handle_rpc(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        status = 200
        try:
            if self.faults.delay:
                await asyncio.sleep(self.faults.delay)
            if self.faults.gate is not None:
                self.faults.gated += 1
                await self.faults.gate.wait()
            if self.faults.drop_first > 0:
                self.faults.drop_first -= 1
                status = 0
                return _drop(request)
            self.faults.raise_injected()
            claims = self._authenticate(request)
            args = await self._arguments(request, name)
            project = _str_arg(args, "project_uuid")
            self._authorize(claims, project, name)
            sender = claims.get("session_id") or claims.get("sub")
            result = await self._call(
                name, project, args, sender if isinstance(sender, str) else None
            )
            if name in _WRITES and self.faults.lose_response_first > 0:
                self.faults.lose_response_first -= 1
                status = 0
                return _drop(request)
            return web.json_response(result)
        except RpcError as exc:
            status = exc.status
            return web.json_response(exc.body, status=exc.status)
        finally:
            self.calls.append((name, status))

    async def _call(
        self, name: str, project: str, args: Mapping[str, Any], sender: str | None
    ) -> Any:
        if name == "upsert_project_file":
            path = _path_arg(args)
            ftype = args.get("p_file_type") or "text"
            if not isinstance(ftype, str):
                raise RpcError(400, "22P02", "invalid input syntax for p_file_type")
            data = _content_arg(args.get("p_content"), ftype)
            expected = _version_arg(args.get("expected_version"))
            version, digest = await self._upsert(project, path, data, ftype, expected, sender)
            return {"file_path": path, "version": version, "content_hash": digest}
        if name == "delete_project_file":
            path = _path_arg(args)
            expected = _version_arg(args.get("expected_version"))
            version = await self._delete(project, path, expected, sender)
            return {"file_path": path, "version": version, "deleted": True}
        if name == "report_local_change":
            report = args.get("payload")
            if not isinstance(report, dict):
                raise RpcError(400, "22023", "payload must be a JSON object")
            # No seq: it changes no file; re-broadcast with the token's sender, as the migration's
            # report_local_change does (sidecar/sql/001_sidecar.sql).
            await self._send_db(project, "file:local-change", {**report, "sender": sender})
            return None
        if name == "request_snapshot":
            self._request_id += 1
            request = {
                "request_id": self._request_id,
                "session_id": sender,
                "reason": args.get("p_reason"),
                "last_seq": args.get("p_last_seq"),
            }
            self.snapshot_requests.append(request)
            # The worker hears of it as a pg_notify; here, as the event it used to get.
            await self._send_db(project, "snapshot:request", dict(request))
            return {"request_id": self._request_id}
        if name == "list_current_files":
            return [
                _row_json(p, r)
                for p, r in sorted(self._rows.get(project, {}).items())
                if not r.deleted
            ]
        path = _path_arg(args)
        row = self._rows.get(project, {}).get(path)
        return None if row is None else _row_json(path, row)

    def _authenticate(self, request: web.Request) -> dict[str, Any]:
        apikey = request.headers.get("apikey")
        if not apikey:
            raise RpcError(
                401,
                None,
                "No API key found in request",
                hint="No `apikey` request header or url param was found.",
            )
        if apikey != self.anon_key and not self._valid_jwt(apikey):
            raise RpcError(
                401,
                None,
                "Invalid API key",
                hint="Double check your Supabase `anon` or `service_role` API key.",
            )
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            token = apikey  # Supabase falls back to the apikey's role (anon)
        try:
            claims = self._decode_jwt(token, require=["exp"])
        except jwt.ExpiredSignatureError:
            raise RpcError(401, "PGRST303", "JWT expired") from None
        except jwt.InvalidTokenError as exc:
            raise RpcError(401, "PGRST301", f"JWT invalid: {type(exc).__name__}") from None
        return claims

    def _decode_jwt(self, token: str, require: list[str] | None = None) -> dict[str, Any]:
        """Verified claims (see `postgrest_auth.decode_token`)."""
        return decode_token(token, self.jwt_secret, self.jwt_jwks, require=require or ())

    def _valid_jwt(self, token: str) -> bool:
        try:
            self._decode_jwt(token)
        except jwt.InvalidTokenError:
            return False
        return True

    def _authorize(self, claims: Mapping[str, Any], project: str, name: str) -> None:
        role = claims.get("role")
        if role == "service_role":
            return
        if role != "authenticated" or claims.get("project_id") != project:
            raise RpcError(
                403,
                "42501",
                f"permission denied for project {project}",
                hint="the token's project_id claim must name this project",
            )
        if name in _WRITES and claims.get("read_only") is True:
            raise RpcError(403, "42501", f"permission denied: read-only token for {project}")

    async def _arguments(self, request: web.Request, name: str) -> dict[str, Any]:
        if name not in _SIGNATURES:
            raise RpcError(
                404, "PGRST202", f"Could not find the function public.{name} in the schema cache"
            )
        try:
            args = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise RpcError(400, "PGRST102", "Empty or invalid json") from None
        if not isinstance(args, dict):
            raise RpcError(400, "PGRST102", "Empty or invalid json")
        required, optional = _SIGNATURES[name]
        keys = set(args)
        if not required <= keys or not keys <= required | optional:
            listed = ", ".join(sorted(keys))
            raise RpcError(
                404,
                "PGRST202",
                f"Could not find the function public.{name}({listed}) in the schema cache",
                hint="No function matches the given name and argument names.",
            )
        return args

    async def _handle_content(self, request: web.Request) -> web.StreamResponse:
        data = self._blobs.get(request.match_info["key"])
        if data is None:
            return web.json_response(
                {"statusCode": "404", "error": "not_found", "message": "Object not found"},
                status=404,
            )
        trickle = self.faults.content_trickle
        if not trickle:
            return web.Response(body=data, content_type="application/octet-stream")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(data)
        await resp.prepare(request)
        step = 16 * 1024
        for at in range(0, len(data), step):
            await resp.write(data[at : at + step])
            await asyncio.sleep(step / trickle)
        await resp.write_eof()
        return resp

    async def _handle_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.pop("reset", False):
            self.faults.reset()
        names = {f.name for f in fields(RpcFaults)}
        for key, value in body.items():
            if key not in names:
                return web.json_response({"message": f"unknown fault {key!r}"}, status=400)
            setattr(self.faults, key, value)
        return web.json_response({f.name: getattr(self.faults, f.name) for f in fields(RpcFaults)})

    async def _handle_admin_upsert(self, request: web.Request) -> web.Response:
        body = await request.json()
        project, path = str(body["project_id"]), str(body["file_path"])
        if body.get("delete"):
            return web.json_response({"version": await self.editor_delete(project, path)})
        data = (
            base64.b64decode(body["content_b64"])
            if "content_b64" in body
            else str(body.get("content", "")).encode()
        )
        return web.json_response({"version": await self.editor_upsert(project, path, data)})

    async def _handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


def _check_expected(path: str, expected: int | None, current: int) -> None:
    if expected is not None and expected != current:
        details = json.dumps(
            {"file_path": path, "expected_version": expected, "current_version": current}
        )
        raise RpcError(
            409,
            "PT409",
            "version conflict",
            details=details,
            hint="fetch the current version and retry with it",
        )


def _drop(request: web.Request) -> web.Response:
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)  # never reaches the client


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return b"\x00" not in data


def _str_arg(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise RpcError(400, "22P02", f"invalid input syntax for {key}")
    return value


def _path_arg(args: Mapping[str, Any]) -> str:
    path = _str_arg(args, "p_file_path")
    if path.startswith("/") or "\x00" in path or ".." in path.split("/"):
        raise RpcError(400, "22023", f"invalid file path {path[:200]!r}")
    return path


def _version_arg(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RpcError(400, "22P02", "invalid input syntax for type integer (expected_version)")
    return value


def _content_arg(value: object, file_type: str) -> bytes:
    if not isinstance(value, str):
        raise RpcError(400, "22P02", "p_content must be a string")
    if file_type == "binary":
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RpcError(400, "22P02", "p_content is not valid base64") from None
    return value.encode()


def _row_json(path: str, row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "file_path": path,
        "version": row.version,
        "deleted": row.deleted,
        "file_type": row.file_type,
        "updated_at": int(row.updated_at * 1000),
    }
    if row.content is not None:
        out["content_hash"] = row.sha256
        out["size"] = len(row.content)
        if row.file_type != "binary" and _is_utf8(row.content):
            out["content"] = row.content.decode()
        else:
            out["content_b64"] = base64.b64encode(row.content).decode()
    return out


async def _serve(args: argparse.Namespace) -> None:
    broadcaster = HttpBroadcaster(args.realtime_admin_url) if args.realtime_admin_url else None
    server = RpcServer(
        realtime=broadcaster,
        jwt_secret=args.jwt_secret,
        jwks=json.loads(args.jwks) if args.jwks else None,
        anon_key=args.anon_key,
        host=args.host,
        port=args.port,
    )
    async with server:
        log.info("rpc_server.listening", url=server.url)
        await until_terminated()
    if broadcaster is not None:
        await broadcaster.close()


def main(argv: list[str] | None = None) -> None:
    """Run standalone (compose, demo): `python -m sidecar.testing.rpc_server --port P`."""
    p = argparse.ArgumentParser(prog="rpc_server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--jwt-secret", default=None)
    p.add_argument("--anon-key", default=None)
    p.add_argument("--jwks", default=None, help='public keys for ES256 tokens: {"keys": [...]}')
    p.add_argument(
        "--realtime-admin-url",
        default=None,
        help="broadcast through a standalone realtime_server's /_admin/send",
    )
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
