"""A small Supabase Storage client: upload an object (standard upload) and sign a URL.

Storage answers most errors with HTTP 400 and puts the real status in the body
(`{"statusCode": "404", "error": "not_found", "message": ...}`, supabase/storage
`src/http/error-handler.ts`), so errors are classified from the body's `statusCode` and
`error`, never from the HTTP status alone. Tokens, keys and signed URLs never reach a log line.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import aiohttp

from sidecar.errors import ExitCode, SidecarError
from sidecar.redact import register_secret

__all__ = ["StorageClient", "StorageError"]

_CHUNK = 1 << 20


class StorageError(SidecarError):
    """A Storage request failed: `status` is the body's statusCode (else the HTTP status)."""

    exit_code = ExitCode.SNAPSHOT_UNAVAILABLE

    def __init__(self, action: str, key: str, status: str, error: str, message: str) -> None:
        self.status = status
        self.error = error
        if status in {"401", "403"} or error in {"InvalidJWT", "InvalidSignature", "Unauthorized"}:
            self.exit_code = ExitCode.CONFIG  # the key is wrong or lacks the right: not transient
        super().__init__(f"storage {action} of {key} failed: {status} {error}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == "404"

    @property
    def duplicate(self) -> bool:
        return self.status == "409" or self.error == "Duplicate"

    @property
    def retryable(self) -> bool:
        return self.status.startswith("5") or self.status in {"429", "408"}


@dataclass
class StorageClient:
    """Storage at `url` (the project URL; the API lives under /storage/v1) with a service key."""

    url: str
    key: str  # the service-role key (JWT) or an sb_secret_ key
    session: aiohttp.ClientSession

    def __post_init__(self) -> None:
        register_secret(self.key)
        self.url = self.url.rstrip("/")

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "apikey": self.key}

    def _object_url(self, prefix: str, bucket: str, path: str) -> str:
        return f"{self.url}/storage/v1/object/{prefix}{quote(bucket)}/{quote(path)}"

    async def upload(
        self,
        bucket: str,
        path: str,
        file: Path,
        *,
        content_type: str = "application/zstd",
        upsert: bool = False,
    ) -> None:
        """Upload file's bytes to bucket/path, streamed with a Content-Length (memory bounded).

        Raises StorageError (`duplicate` when the object exists and upsert is off).
        """
        f = await asyncio.to_thread(open, file, "rb")
        size = os.fstat(f.fileno()).st_size
        headers = {
            **self._headers,
            "Content-Type": content_type,
            "Content-Length": str(size),
            "x-upsert": "true" if upsert else "false",
            "cache-control": "max-age=31536000",  # content-addressed: never changes
        }
        with f:
            async with self.session.post(
                self._object_url("", bucket, path), data=_chunks(f), headers=headers
            ) as resp:
                await _check(resp, "upload", f"{bucket}/{path}")

    async def sign(self, bucket: str, path: str, expires_in: int) -> str:
        """An absolute signed download URL valid for expires_in seconds.

        Raises StorageError (`not_found` when there is no such object).
        """
        async with self.session.post(
            self._object_url("sign/", bucket, path),
            json={"expiresIn": int(expires_in)},
            headers=self._headers,
        ) as resp:
            body = await _check(resp, "sign", f"{bucket}/{path}")
        signed = body.get("signedURL") or body.get("signedUrl") if isinstance(body, dict) else None
        if not isinstance(signed, str) or not signed:
            raise StorageError("sign", f"{bucket}/{path}", "502", "BadAnswer", "no signedURL")
        # Not registered as a secret (a worker signs thousands): redact() already strips every
        # URL's query string, which is where the signature is.
        if signed.startswith(("http://", "https://")):
            return signed
        # Storage answers a URL relative to /storage/v1, as supabase-js completes it.
        return f"{self.url}/storage/v1{signed if signed.startswith('/') else '/' + signed}"


async def _chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(f.read, _CHUNK):
        yield chunk


async def _check(resp: aiohttp.ClientResponse, action: str, key: str) -> Any:
    text = await resp.text()
    try:
        body: Any = json.loads(text) if text else {}
    except ValueError:
        body = {}
    status = str(body.get("statusCode", "")) if isinstance(body, dict) else ""
    if resp.status < 300 and (not status or status.startswith("2")):
        return body
    if not status:
        status = str(resp.status)
    error = str(body.get("error") or body.get("code") or resp.reason or "") if body else ""
    message = str(body.get("message", ""))[:300] if isinstance(body, dict) else text[:300]
    raise StorageError(action, key, status, error or "Error", message)
