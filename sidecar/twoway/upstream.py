"""PostgREST RPC client for two-way sync: push local changes with optimistic concurrency.

`Upstream.upsert`/`delete` call `upsert_project_file`/`delete_project_file` with
`expected_version` and return the new head version. Transient failures (connection errors,
timeouts, 5xx other than a version conflict, 429) are retried with capped exponential backoff and
jitter; a stale `expected_version` raises `ConflictError` at once; anything else (401/403/400...)
raises `UpstreamError`. A write whose answer was lost and whose retry then conflicts is recognised
by reading the head back: if it holds our bytes, the write succeeded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp
import structlog

from sidecar.config import Settings
from sidecar.errors import ConfigError, ConflictError, UpstreamError
from sidecar.retry import backoff_delay
from sidecar.twoway.merge import is_text

__all__ = ["ConflictError", "EventRow", "RemoteFile", "Upstream", "UpstreamError"]

log = structlog.get_logger(component="upstream")

_CONFLICT_CODES = frozenset({"PT409"})


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """The database's head for one path; `content is None` marks a tombstone."""

    path: str
    version: int
    content: bytes | None = field(repr=False)
    content_hash: str | None = None

    @property
    def deleted(self) -> bool:
        return self.content is None


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of the database's event log (project_events_since)."""

    seq: int
    event: str
    payload: dict[str, Any] = field(repr=False)


TokenProvider = str | Callable[[], str]


class Upstream:
    """Calls the project's RPCs with the scoped token; an async context manager.

    Args:
        base_url: the Supabase project URL (RPCs live under /rest/v1/rpc/).
        project_id: sent as `project_uuid`.
        apikey: the anon/publishable key the gateway needs.
        token: the scoped JWT, or a callable returning the current one (rotation).
        retries: attempts after the first on transient errors.
    """

    def __init__(
        self,
        base_url: str,
        project_id: str,
        *,
        apikey: str,
        token: TokenProvider,
        session: aiohttp.ClientSession | None = None,
        retries: int = 5,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        timeout: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.project_id = project_id
        self.apikey = apikey
        self._token = token
        self._session = session
        self._own_session = session is None
        self.retries = retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    @classmethod
    def from_settings(cls, settings: Settings, token: TokenProvider, **kwargs: Any) -> Upstream:
        """SUPABASE_URL, PROJECT_ID and REALTIME_APIKEY (the anon key) from Settings.

        Raises:
            ConfigError: SUPABASE_URL is not set.
        """
        if not settings.twoway.supabase_url:
            raise ConfigError("SIDECAR_UPSTREAM=rpc needs SUPABASE_URL")
        apikey = str(settings.realtime.apikey) if settings.realtime.apikey else ""
        return cls(
            settings.twoway.supabase_url, settings.project_id, apikey=apikey, token=token, **kwargs
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    # -- calls --

    async def upsert(
        self, path: str, content: bytes, expected_version: int | None, *, retries: int | None = None
    ) -> int:
        """Write path's bytes over `expected_version` (None: unconditionally); the new version.

        `retries` overrides the client's retry count for this call (0: a single attempt).

        Raises:
            ConflictError: the head is not `expected_version`.
            UpstreamError: refused for good, or still failing after the retries.
        """
        binary = not is_text(content)
        args = {
            "project_uuid": self.project_id,
            "p_file_path": path,
            "p_content": base64.b64encode(content).decode() if binary else content.decode(),
            "p_file_type": "binary" if binary else "text",
            "expected_version": expected_version,
        }
        digest = hashlib.sha256(content).hexdigest()
        result = await self._write(
            "upsert_project_file",
            path,
            args,
            expected_version,
            lambda head: head.content_hash == digest,
            retries,
        )
        return _version(result)

    async def delete(
        self, path: str, expected_version: int | None, *, retries: int | None = None
    ) -> int:
        """Delete path over `expected_version`; the tombstone's version (same errors as upsert)."""
        args = {
            "project_uuid": self.project_id,
            "p_file_path": path,
            "expected_version": expected_version,
        }
        result = await self._write(
            "delete_project_file", path, args, expected_version, lambda head: head.deleted, retries
        )
        return _version(result)

    async def get(
        self, path: str, *, version: int | None = None, retries: int | None = None
    ) -> RemoteFile | None:
        """The head of path, or that `version` of it (a tombstone has content None); None if
        it (or that version) never existed."""
        args: dict[str, Any] = {"project_uuid": self.project_id, "p_file_path": path}
        if version is not None:
            args["p_version"] = version
        result = await self._call("get_project_file", args, retries=retries)
        return None if result is None else _remote(result)

    async def body(self, path: str, version: int) -> bytes:
        """The bytes of `version` of path (a large body an event did not carry).

        Raises:
            UpstreamError: that version does not exist, is a tombstone, or the call failed.
        """
        remote = await self.get(path, version=version)
        if remote is None or remote.content is None:
            raise UpstreamError(f"get_project_file has no body for {path!r} v{version}")
        return remote.content

    async def events_since(self, after_seq: int, *, max_rows: int = 1000) -> list[EventRow]:
        """One page of the database's event log: the events after `after_seq`, in seq order
        (at most max_rows; fewer, or none, at the end of the log)."""
        result = await self._call(
            "project_events_since",
            {"project_uuid": self.project_id, "after_seq": after_seq, "max_rows": max_rows},
        )
        if not isinstance(result, list):
            raise UpstreamError("project_events_since did not return a list")
        rows: list[EventRow] = []
        for item in result:
            seq = _opt_int(item.get("seq")) if isinstance(item, dict) else None
            if (
                seq is None
                or not isinstance(item.get("event"), str)
                or not isinstance(item.get("payload"), dict)
            ):
                raise UpstreamError(f"project_events_since row is malformed: {str(item)[:200]}")
            rows.append(EventRow(seq, item["event"], item["payload"]))
        return rows

    async def list_files(self) -> dict[str, RemoteFile]:
        """Every live file of the project."""
        result = await self._call("list_current_files", {"project_uuid": self.project_id})
        if not isinstance(result, list):
            raise UpstreamError("list_current_files did not return a list")
        files = [_remote(item) for item in result]
        return {f.path: f for f in files}

    async def report_local_change(self, payload: Mapping[str, Any]) -> None:
        """`file:local-change` through the database (rpc/report_local_change), which
        re-broadcasts it with the token's sender: the container never writes on the channel."""
        await self._call(
            "report_local_change", {"project_uuid": self.project_id, "payload": dict(payload)}
        )

    async def request_snapshot(self, reason: str | None, last_seq: int | None) -> Any:
        """`snapshot:request` through the database (rpc/request_snapshot); the snapshot worker
        answers with `snapshot:ready` on the channel. Returns `{request_id}`."""
        return await self._call(
            "request_snapshot",
            {"project_uuid": self.project_id, "p_reason": reason, "p_last_seq": last_seq},
        )

    async def catch_up(
        self, after_seq: int, until_seq: int, *, page_rows: int = 1000
    ) -> list[tuple[str, dict[str, Any]]]:
        """The logged events after `after_seq`, paged, up to at least `until_seq` when the log
        has them (the engine's CatchUpFn): (event, payload) pairs in seq order."""
        out: list[tuple[str, dict[str, Any]]] = []
        while after_seq < until_seq:
            page = await self.events_since(after_seq, max_rows=page_rows)
            if not page:
                break
            out += [(row.event, row.payload) for row in page]
            after_seq = page[-1].seq
        return out

    async def send(self, event: str, payload: dict[str, Any]) -> None:
        """What the sidecar used to broadcast on the channel, as RPCs (same signature as
        Subscription.send). `file:conflict` goes as a local-change report marked `conflict`."""
        if event == "snapshot:request":
            seq = payload.get("last_seq")
            await self.request_snapshot(
                payload.get("reason"), seq if isinstance(seq, int) else None
            )
        elif event == "file:conflict":
            await self.report_local_change({**payload, "conflict": True})
        else:
            await self.report_local_change(payload)

    # -- plumbing --

    async def _write(
        self,
        name: str,
        path: str,
        args: Mapping[str, Any],
        expected: int | None,
        is_ours: Callable[[RemoteFile], bool],
        retries: int | None,
    ) -> Any:
        attempts: list[int] = []
        try:
            return await self._call(name, args, attempts=attempts, retries=retries)
        except ConflictError as exc:
            if len(attempts) <= 1:
                raise
            # An earlier attempt may have been applied with its answer lost: then the head is
            # ours, one version above what we expected.
            head = await self.get(path, retries=retries)
            if (
                head is not None
                and expected is not None
                and head.version == expected + 1
                and is_ours(head)
            ):
                log.info("upstream.lost_answer_recovered", path=path, version=head.version)
                return {"version": head.version}
            raise exc from None

    async def _call(
        self,
        name: str,
        args: Mapping[str, Any],
        *,
        attempts: list[int] | None = None,
        retries: int | None = None,
    ) -> Any:
        url = f"{self.base_url}/rest/v1/rpc/{name}"
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            attempt += 1
            if attempts is not None:
                attempts.append(attempt)
            try:
                return await self._post(url, name, args)
            except UpstreamError as exc:
                if not exc.transient or attempt > retries:
                    if exc.transient:
                        raise UpstreamError(
                            f"{name} failed after {attempt} attempts: {exc}",
                            status=exc.status,
                            code=exc.code,
                            transient=True,
                        ) from exc
                    raise
                # Equal jitter: between half and all of the step.
                wait = backoff_delay(attempt, self.backoff_initial, self.backoff_max, floor=0.5)
                log.warning(
                    "upstream.retry_scheduled",
                    rpc=name,
                    attempt=attempt,
                    wait_for=round(wait, 3),
                    error=str(exc),
                    status=exc.status,
                )
                await asyncio.sleep(wait)

    async def _post(self, url: str, name: str, args: Mapping[str, Any]) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        token = self._token() if callable(self._token) else self._token
        headers = {
            "apikey": self.apikey,
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        try:
            async with self._session.post(
                url, json=dict(args), headers=headers, timeout=self.timeout
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"{name}: {type(exc).__name__}: {exc}", transient=True) from exc
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        if 200 <= status < 300:
            return body
        err = body if isinstance(body, dict) else {}
        code = err.get("code") if isinstance(err.get("code"), str) else None
        message = str(err.get("message") or f"HTTP {status}")
        # PT409 is the documented answer; a function written with a plain RAISE ('P0001', 400)
        # or a serialization failure ('40001', 500) still says "version conflict".
        if code in _CONFLICT_CODES or "version conflict" in message.lower():
            details = _details(err.get("details"))
            raise ConflictError(
                str(args.get("p_file_path")),
                args.get("expected_version"),
                _opt_int(details.get("current_version")),
            )
        transient = status >= 500 or status in {408, 429}
        raise UpstreamError(
            f"{name}: HTTP {status} {code or ''} {message}".replace("  ", " "),
            status=status,
            code=code,
            transient=transient,
        )


def _details(raw: object) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _opt_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _version(result: Any) -> int:
    if isinstance(result, dict):
        v = _opt_int(result.get("version"))
        if v is not None:
            return v
    v = _opt_int(result)
    if v is None:
        raise UpstreamError(f"unexpected RPC answer: {str(result)[:200]}")
    return v


def _remote(item: object) -> RemoteFile:
    if not isinstance(item, dict):
        raise UpstreamError("file row is not an object")
    path = item.get("file_path")
    version = _opt_int(item.get("version"))
    if not isinstance(path, str) or version is None:
        raise UpstreamError("file row lacks file_path or version")
    content: bytes | None = None
    if not item.get("deleted"):
        if isinstance(item.get("content_b64"), str):
            content = base64.b64decode(item["content_b64"])
        elif isinstance(item.get("content"), str):
            content = item["content"].encode()
    digest = hashlib.sha256(content).hexdigest() if content is not None else None
    return RemoteFile(path=path, version=version, content=content, content_hash=digest)
