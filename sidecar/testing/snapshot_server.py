"""A local stand-in for Supabase Storage signed URLs, with fault injection for tests and the demo.

Objects (files under a directory, or registered bytes) are served at
`/storage/v1/object/sign/<bucket>/<path>?token=<JWT>`, where the JWT is HS256 over
`{"url": "<bucket>/<path>", "iat", "exp"}` with the server's secret. Invalid or expired tokens get
Supabase's answer (400 with a JSON body), unknown objects 404, single byte ranges 206/416, and
conditional requests (`If-None-Match` on the ETag, else `If-Modified-Since`) 304, as Supabase
Storage does. Every object request is recorded with the body bytes sent (`requests`, `sent`).
Faults (dropped connections, 5xx, trickle, a corrupt byte, Range ignored, expired tokens) are knobs
on `server.faults`, changeable at any time, or through `POST /_admin/fault` when run standalone.

The Storage API part a publisher uses (supabase/storage `src/http/routes/object/createObject.ts`,
`getSignedURL.ts`): upload with `POST|PUT /storage/v1/object/<bucket>/<path>` (raw body,
`x-upsert: true` to overwrite, answer `{"Key", "Id"}`), and sign with
`POST /storage/v1/object/sign/<bucket>/<path>` `{"expiresIn": s}` (answer `{"signedURL":
"/object/sign/<bucket>/<path>?token=…"}`, relative to `<url>/storage/v1`). Both need
`Authorization: Bearer <JWT>` verified with `jwt_secret` whose role is service_role (or the
opaque `secret_key`); without storage.objects policies any other role is refused as RLS would.
Their errors are Storage's: HTTP 400 with the real status as a string in the body
(`{"statusCode": "409", "error": "Duplicate", "message": …}`, error-handler.ts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jwt
import structlog
from aiohttp import web

from sidecar.testing._server import LoopbackServer, json_body, run_standalone, until_terminated

__all__ = ["Faults", "ServedRequest", "SnapshotServer", "Upload", "main"]

log = structlog.get_logger(component="snapshot_server")

SIGN_PREFIX = "/storage/v1/object/sign/"
OBJECT_PREFIX = "/storage/v1/object/"
_CHUNK = 256 * 1024


@dataclass(slots=True)
class ServedRequest:
    """One request for an object, as the server saw and answered it (for test assertions)."""

    method: str
    key: str  # "<bucket>/<path>"
    range: str | None
    if_range: str | None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    status: int = 0
    start: int = 0  # first byte offset served
    end: int = 0  # one past the last byte offset the response promised
    sent: int = 0  # body bytes actually written
    dropped: bool = False


DropRule = Callable[[ServedRequest], "int | None"]


@dataclass(slots=True)
class Upload:
    """One upload request through the Storage API (for test assertions)."""

    key: str  # "<bucket>/<path>"
    upsert: bool
    status: str = ""  # the body's statusCode ("200" when stored); "" while in flight
    size: int = 0


@dataclass(slots=True)
class Faults:
    """Fault injection knobs, read on every object request; tests may change them at any time.

    drop_after: per object GET, how many body bytes to send before closing the connection. A list
        is consumed one entry per request (None in it means "no drop"); a callable gets the
        request and returns the count or None. `drop_at(offsets)` builds one from absolute offsets.
    fail_first: answer `fail_status` to the next N object requests (counts down).
    trickle: send at most this many bytes per second.
    corrupt_at: absolute object offset whose byte is flipped on the way out.
    ignore_range: answer 200 with the whole object even when a Range was asked for.
    ignore_conditional: answer 200 even when If-None-Match / If-Modified-Since match (a server
        or CDN without conditional requests).
    expire_tokens: treat every token as expired (Supabase's "jwt expired").
    """

    drop_after: list[int | None] | DropRule | None = None
    fail_first: int = 0
    fail_status: int = 503
    trickle: float | None = None
    corrupt_at: int | None = None
    ignore_range: bool = False
    ignore_conditional: bool = False
    expire_tokens: bool = False

    def drop_at(self, offsets: Iterable[int]) -> None:
        """Drop the connection once at each absolute object offset (the client must resume)."""
        pending = sorted(set(offsets))

        def rule(req: ServedRequest) -> int | None:
            for i, off in enumerate(pending):
                if req.start < off < req.end:
                    del pending[i]
                    return off - req.start
            return None

        self.drop_after = rule

    def reset(self) -> None:
        """Clear every fault."""
        for f in fields(self):
            setattr(self, f.name, f.default)

    def _next_drop(self, req: ServedRequest) -> int | None:
        rule = self.drop_after
        if rule is None:
            return None
        if callable(rule):
            return rule(req)
        return rule.pop(0) if rule else None


class SnapshotServer(LoopbackServer):
    """Serves snapshots at Supabase-Storage-style signed URLs; an async context manager.

    Args:
        root: directory whose files are served as objects of `bucket` (optional).
        secret: HS256 signing secret (random by default).
        host, port: where to listen; port 0 picks a free port (read it back from `.port`).
        bucket: the bucket name used for files under root and by `url_for` by default.
        buckets: further buckets the Storage API accepts uploads into.
        jwt_secret: the project's JWT secret that API callers' tokens are verified with.
        file_size_limit: the largest object an upload may create (Storage's global limit).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        secret: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        bucket: str = "snapshots",
        public_url: str | None = None,
        buckets: Iterable[str] = (),
        jwt_secret: str | None = None,
        file_size_limit: int = 5 * 1024**3,
    ) -> None:
        super().__init__(host, port)
        self.root = root.resolve() if root is not None else None
        self.secret = secret or secrets.token_urlsafe(32)
        self.bucket = bucket
        self.faults = Faults()
        self.requests: list[ServedRequest] = []
        self._public_url = public_url
        self._objects: dict[str, tuple[bytes, str, float]] = {}  # key -> (data, etag, mtime)
        self._init_storage_api(buckets, jwt_secret, file_size_limit)

    # -- lifecycle --

    client_max_size = 1024**2

    def routes(self, app: web.Application) -> None:
        """Signed object URLs plus the admin endpoints."""
        app.router.add_get(SIGN_PREFIX + "{key:.+}", self._handle_object)
        self._storage_api_routes(app)
        app.router.add_post("/_admin/sign", self._handle_sign)
        app.router.add_post("/_admin/fault", self._handle_fault)
        app.router.add_get("/_admin/requests", self._handle_requests)
        app.router.add_get("/healthz", self._handle_health)

    # -- objects and URLs --

    @property
    def base_url(self) -> str:
        """The server's root URL, e.g. http://127.0.0.1:PORT."""
        if self._public_url:
            return self._public_url.rstrip("/")
        return super().base_url

    def add(self, path: str, data: bytes, *, bucket: str | None = None) -> str:
        """Register bytes as an object; returns its key ("<bucket>/<path>")."""
        key = f"{bucket or self.bucket}/{path.lstrip('/')}"
        self._objects[key] = (data, f'"{hashlib.sha256(data).hexdigest()[:32]}"', time.time())
        return key

    def sign(self, path: str, *, expires_in: float = 3600, bucket: str | None = None) -> str:
        """A token for the object at path, valid for expires_in seconds (negative: expired)."""
        now = int(time.time())
        claims = {
            "url": f"{bucket or self.bucket}/{path.lstrip('/')}",
            "iat": now,
            "exp": now + int(expires_in),
        }
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def url_for(self, path: str, *, expires_in: float = 3600, bucket: str | None = None) -> str:
        """The signed URL of the object at path (the way createSignedUrl returns it)."""
        b = bucket or self.bucket
        token = self.sign(path, expires_in=expires_in, bucket=b)
        return f"{self.base_url}{SIGN_PREFIX}{quote(b)}/{quote(path.lstrip('/'))}?token={token}"

    def gets(self, path: str | None = None, *, bucket: str | None = None) -> list[ServedRequest]:
        """The GET requests seen (for one object path, or all)."""
        key = None if path is None else f"{bucket or self.bucket}/{path.lstrip('/')}"
        return [r for r in self.requests if r.method == "GET" and (key is None or r.key == key)]

    def bytes_sent(self, path: str | None = None, *, bucket: str | None = None) -> int:
        """Body bytes sent for GETs (of one object path, or all)."""
        return sum(r.sent for r in self.gets(path, bucket=bucket))

    def _lookup(self, key: str) -> tuple[Path | bytes, int, str, float] | None:
        obj = self._objects.get(key)
        if obj is not None:
            data, etag, mtime = obj
            return data, len(data), etag, mtime
        bucket, _, rel = key.partition("/")
        if self.root is None or bucket != self.bucket or not rel:
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        st = path.stat()
        return path, st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"', st.st_mtime

    # -- handlers --

    async def _handle_object(self, request: web.Request) -> web.StreamResponse:
        key = unquote(request.match_info["key"])
        h = request.headers
        rec = ServedRequest(
            request.method,
            key,
            h.get("Range"),
            h.get("If-Range"),
            h.get("If-None-Match"),
            h.get("If-Modified-Since"),
        )
        self.requests.append(rec)
        resp = await self._serve(request, rec)
        if rec.status == 0:
            rec.status = resp.status
        return resp

    async def _serve(self, request: web.Request, rec: ServedRequest) -> web.StreamResponse:
        denied = self._check_token(request.query.get("token"), rec.key)
        if denied is not None:
            return denied
        if self.faults.fail_first > 0:
            self.faults.fail_first -= 1
            status = self.faults.fail_status
            return _error(
                status,
                "InternalError" if status == 500 else "ServiceUnavailable",
                "injected failure",
            )
        found = self._lookup(rec.key)
        if found is None:
            return _error(404, "not_found", "Object not found")
        source, size, etag, mtime = found
        headers = {
            "ETag": etag,
            "Last-Modified": formatdate(mtime, usegmt=True),
            "Accept-Ranges": "bytes",
            "Content-Type": "application/zstd",
            "Cache-Control": "no-cache",
        }
        if not self.faults.ignore_conditional and _not_modified(rec, etag, mtime):
            del headers["Content-Type"]
            return web.Response(status=304, headers=headers)
        start, end, status = 0, size, 200
        if rec.range and not self.faults.ignore_range and _if_range_ok(rec.if_range, etag, mtime):
            try:
                wanted = _resolve_range(rec.range, size)
            except _UnsatisfiableError:
                return _error(
                    416,
                    "InvalidRange",
                    "The requested range is not satisfiable",
                    {"Content-Range": f"bytes */{size}"},
                )
            if wanted is not None:
                start, end, status = wanted[0], wanted[1] + 1, 206
                headers["Content-Range"] = f"bytes {start}-{wanted[1]}/{size}"
        rec.start, rec.end = start, end
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        drop = self.faults._next_drop(rec) if status in {200, 206} else None
        stop = end if drop is None else min(end, start + max(0, drop))
        rec.status = status
        async for chunk in self._chunks(source, start, stop):
            await resp.write(chunk)
            rec.sent += len(chunk)
        if stop < end:
            rec.dropped = True
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def _chunks(self, source: Path | bytes, start: int, end: int) -> AsyncIterator[bytes]:
        pos = start
        fh = await asyncio.to_thread(open, source, "rb") if isinstance(source, Path) else None
        try:
            while pos < end:
                trickle = self.faults.trickle
                n = min(_CHUNK, end - pos)
                if trickle:
                    n = min(n, max(1, int(trickle / 20)))
                if fh is not None:
                    data = await asyncio.to_thread(_read_at, fh, pos, n)
                    if not data:
                        return
                else:
                    assert isinstance(source, bytes)
                    data = source[pos : pos + n]
                bad = self.faults.corrupt_at
                if bad is not None and pos <= bad < pos + len(data):
                    buf = bytearray(data)
                    buf[bad - pos] ^= 0xFF
                    data = bytes(buf)
                yield data
                pos += len(data)
                if trickle:
                    await asyncio.sleep(len(data) / trickle)
        finally:
            if fh is not None:
                fh.close()

    def _check_token(self, token: str | None, key: str) -> web.Response | None:
        if not token:
            return _error(
                400, "InvalidSignature", "querystring must have required property 'token'"
            )
        try:
            claims = jwt.decode(
                token, self.secret, algorithms=["HS256"], options={"require": ["exp"]}
            )
        except jwt.ExpiredSignatureError:
            return _error(400, "InvalidJWT", "jwt expired")
        except jwt.InvalidTokenError as exc:
            msg = (
                "invalid signature"
                if isinstance(exc, jwt.InvalidSignatureError)
                else ("jwt malformed")
            )
            return _error(400, "InvalidJWT", msg)
        if self.faults.expire_tokens:
            return _error(400, "InvalidJWT", "jwt expired")
        if claims.get("url") != key:
            return _error(400, "InvalidSignature", "The url do not match the signature")
        return None

    async def _handle_sign(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        path = body.get("path")
        if not isinstance(path, str) or not path:
            return _error(400, "InvalidRequest", "path is required")
        expires_in = float(body.get("expires_in", 3600))
        bucket = body.get("bucket") if isinstance(body.get("bucket"), str) else None
        return web.json_response({"url": self.url_for(path, expires_in=expires_in, bucket=bucket)})

    async def _handle_fault(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if body.pop("reset", False):
            self.faults.reset()
        names = {f.name for f in fields(Faults)}
        for name, value in body.items():
            if name == "drop_at":
                self.faults.drop_at(int(v) for v in value)
            elif name in names:
                setattr(self.faults, name, value)
            else:
                return _error(400, "InvalidRequest", f"unknown fault {name!r}")
        state = {f.name: getattr(self.faults, f.name) for f in fields(Faults)}
        state["drop_after"] = (
            None
            if state["drop_after"] is None
            else "rule"
            if callable(state["drop_after"])
            else state["drop_after"]
        )
        return web.json_response(state)

    async def _handle_requests(self, _request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "method": r.method,
                    "key": r.key,
                    "range": r.range,
                    "if_none_match": r.if_none_match,
                    "status": r.status,
                    "start": r.start,
                    "end": r.end,
                    "sent": r.sent,
                    "dropped": r.dropped,
                }
                for r in self.requests
            ]
        )

    async def _handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    # -- the Storage API: upload and sign (what `sidecar snapshot publish` calls) --

    def _init_storage_api(self, buckets: Iterable[str], jwt_secret: str | None, limit: int) -> None:
        self.buckets = {self.bucket, *buckets}
        self.jwt_secret = jwt_secret or secrets.token_urlsafe(32)
        self.file_size_limit = limit
        now = int(time.time())
        self.service_role_key = jwt.encode(
            {"role": "service_role", "iss": "supabase", "iat": now, "exp": now + 10 * 365 * 86400},
            self.jwt_secret,
            algorithm="HS256",
        )
        self.secret_key = "sb_secret_" + secrets.token_urlsafe(16)
        self.uploads: list[Upload] = []  # every upload request, answered or not
        self.signs: list[str] = []  # keys signed through the API
        self.upload_gate: asyncio.Event | None = None  # set: uploads wait for it (tests)
        self.upload_started = asyncio.Event()

    def _storage_api_routes(self, app: web.Application) -> None:
        # Before the upload route: `sign/...` would otherwise be a bucket called "sign".
        app.router.add_post(SIGN_PREFIX + "{key:.+}", self._handle_api_sign)
        app.router.add_post(OBJECT_PREFIX + "{key:.+}", self._handle_upload)
        app.router.add_put(OBJECT_PREFIX + "{key:.+}", self._handle_upload)

    def object_keys(self) -> list[str]:
        """The keys ("<bucket>/<path>") of the objects uploaded or added, sorted."""
        return sorted(self._objects)

    def delete(self, key: str) -> None:
        """Remove an object ("<bucket>/<path>"), as a lifecycle rule or an operator would."""
        self._objects.pop(key, None)

    def stored(self, key: str) -> bytes | None:
        """The bytes of an object ("<bucket>/<path>") uploaded or added, None if absent."""
        obj = self._objects.get(key)
        return None if obj is None else obj[0]

    def _api_role(self, request: web.Request) -> str | web.Response:
        """The caller's role from `Authorization: Bearer`, or Storage's error answer."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _storage_error("400", "InvalidJWT", "Authorization header is missing")
        if token == self.secret_key:
            return "service_role"
        try:
            claims = jwt.decode(
                token, self.jwt_secret, algorithms=["HS256"], options={"verify_aud": False}
            )
        except jwt.ExpiredSignatureError:
            return _storage_error("400", "InvalidJWT", '"exp" claim timestamp check failed')
        except jwt.InvalidTokenError:
            return _storage_error("400", "InvalidJWT", "signature verification failed")
        return str(claims.get("role") or "anon")

    def _api_key(self, request: web.Request) -> tuple[str, str, str] | web.Response:
        key = unquote(request.match_info["key"])
        bucket, _, path = key.partition("/")
        if bucket not in self.buckets:
            return _storage_error("404", "Bucket not found", "Bucket not found")
        if not path or path.endswith("/") or "//" in path or ".." in path.split("/"):
            return _storage_error("400", "InvalidKey", f"Invalid key: {path}")
        return key, bucket, path

    async def _handle_upload(self, request: web.Request) -> web.Response:
        found = self._api_key(request)
        if isinstance(found, web.Response):
            return found
        key, _, _ = found
        upsert = request.headers.get("x-upsert", "").lower() == "true"
        rec = Upload(key, upsert)
        self.uploads.append(rec)
        self.upload_started.set()
        if self.upload_gate is not None:
            await self.upload_gate.wait()
        role = self._api_role(request)
        if isinstance(role, web.Response):
            rec.status = "400"
            return role
        if role != "service_role":
            rec.status = "403"
            return _storage_error(
                "403", "Unauthorized", "new row violates row-level security policy"
            )
        if key in self._objects and not upsert:
            rec.status = "409"
            return _storage_error("409", "Duplicate", "The resource already exists")
        sha = hashlib.sha256()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > self.file_size_limit:
                rec.status = "413"
                return _storage_error(
                    "413", "Payload too large", "The object exceeded the maximum allowed size"
                )
            sha.update(chunk)
            chunks.append(chunk)
        data = b"".join(chunks)
        if key in self._objects and not upsert:  # another upload won the race meanwhile
            rec.status = "409"
            return _storage_error("409", "Duplicate", "The resource already exists")
        self._objects[key] = (data, f'"{sha.hexdigest()[:32]}"', time.time())
        rec.status, rec.size = "200", size
        return web.json_response({"Key": key, "Id": str(uuid.uuid4())})

    async def _handle_api_sign(self, request: web.Request) -> web.Response:
        found = self._api_key(request)
        if isinstance(found, web.Response):
            return found
        key, bucket, path = found
        role = self._api_role(request)
        if isinstance(role, web.Response):
            return role
        try:
            body = await request.json()
        except ValueError:
            return _storage_error("400", "InvalidRequest", "body must be JSON")
        expires = body.get("expiresIn") if isinstance(body, dict) else None
        if not isinstance(expires, int) or isinstance(expires, bool) or expires < 1:
            return _storage_error(
                "400", "InvalidRequest", "body/expiresIn must be >= 1", code="InvalidRequest"
            )
        # Signing looks the object up under the caller's RLS: no policy, nothing visible.
        if role != "service_role" or self._lookup(key) is None:
            return _storage_error("404", "not_found", "Object not found", code="NoSuchKey")
        self.signs.append(key)
        token = self.sign(path, expires_in=expires, bucket=bucket)
        return web.json_response(
            {"signedURL": f"/object/sign/{quote(bucket)}/{quote(path)}?token={token}"}
        )


def _read_at(fh: Any, pos: int, n: int) -> bytes:
    fh.seek(pos)
    data: bytes = fh.read(n)
    return data


def _error(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"statusCode": str(status), "error": error, "message": message},
        status=status,
        headers=headers,
    )


def _storage_error(
    status_code: str, error: str, message: str, *, code: str | None = None
) -> web.Response:
    """Storage's answer to a renderable error: HTTP 400 whatever the real status, which is
    the body's statusCode string (StorageBackendError.userStatusCode, error-handler.ts)."""
    body = {"statusCode": status_code, "error": error, "message": message}
    if code is not None:
        body["code"] = code
    return web.json_response(body, status=400)


class _UnsatisfiableError(Exception):
    """Raised for a byte range that lies outside the object."""


def _resolve_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for one `bytes=` range, or None to ignore the header."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # multiple ranges are legal to ignore (RFC 9110 14.2)
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash or not (first_s or last_s):
        return None
    try:
        first = int(first_s) if first_s else None
        last = int(last_s) if last_s else None
    except ValueError:
        return None
    if first is None:  # suffix range: the last `last` bytes
        assert last is not None
        if last <= 0 or size == 0:
            raise _UnsatisfiableError
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None  # invalid: ignore
    if first >= size:
        raise _UnsatisfiableError
    return first, size - 1 if last is None else min(last, size - 1)


def _if_range_ok(if_range: str | None, etag: str, mtime: float) -> bool:
    if not if_range:
        return True
    if if_range.startswith(('"', "W/")):
        return if_range == etag  # strong comparison
    try:
        return int(parsedate_to_datetime(if_range).timestamp()) >= int(mtime)
    except (TypeError, ValueError):
        return False


def _not_modified(rec: ServedRequest, etag: str, mtime: float) -> bool:
    """RFC 9110 13.2.2: If-None-Match (weak comparison) decides; If-Modified-Since only without it."""
    if rec.if_none_match is not None:
        tags = [t.strip().removeprefix("W/") for t in rec.if_none_match.split(",")]
        return "*" in tags or etag.removeprefix("W/") in tags
    if rec.if_modified_since:
        try:
            return int(mtime) <= int(parsedate_to_datetime(rec.if_modified_since).timestamp())
        except (TypeError, ValueError):
            return False
    return False


async def _serve_forever(args: argparse.Namespace) -> None:
    server = SnapshotServer(
        args.dir,
        secret=args.secret,
        host=args.host,
        port=args.port,
        bucket=args.bucket,
        public_url=args.public_url,
        buckets=args.create_bucket,
        jwt_secret=args.jwt_secret,
    )
    async with server:
        log.info(
            "snapshot_server.listening",
            url=server.base_url,
            bucket=server.bucket,
            root=str(server.root) if server.root else None,
        )
        for path in args.sign:
            # Signed URLs go to stdout (not the log) so that scripts can capture them.
            print(server.url_for(path, expires_in=args.expires_in), flush=True)  # noqa: T201
        await until_terminated()
    log.info("snapshot_server.stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the snapshot server standalone until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(
        prog="python -m sidecar.testing.snapshot_server",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--dir", type=Path, default=None, help="directory whose files are served")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret", default=None, help="HS256 secret for the signed-URL tokens")
    p.add_argument("--bucket", default="snapshots")
    p.add_argument(
        "--public-url",
        default=None,
        help="base URL to put in signed URLs (default http://HOST:PORT)",
    )
    p.add_argument(
        "--sign",
        action="append",
        default=[],
        metavar="PATH",
        help="print a signed URL for PATH on startup (repeatable)",
    )
    p.add_argument("--expires-in", type=float, default=3600)
    p.add_argument("--jwt-secret", default=None, help="the project JWT secret API tokens use")
    p.add_argument(
        "--create-bucket", action="append", default=[], metavar="NAME", help="(repeatable)"
    )
    args = p.parse_args(argv)
    if args.dir is not None and not args.dir.is_dir():
        p.error(f"--dir {args.dir} is not a directory")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    run_standalone(main)
