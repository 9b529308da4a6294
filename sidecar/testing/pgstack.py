"""The local stack on a real PostgreSQL, for the end-to-end tests and the demo.

The Realtime test server in PostgreSQL mode (realtime/database.py), the PostgREST-compatible
gateway (gateway.py) and the snapshot server, over a cluster from postgres.py with one
registered project. Snapshots are built from `project_snapshot(with_content)`. The end-to-end
tests' Stack (tests/e2e/e2e_stack.py) extends it with the real publish path, the snapshot worker
and superuser helpers; the attribute names (`rt`, `rpc`, `project`, `token()`, `snapshot()`)
are also those of the in-memory stack there, so the same sidecar runners work with all of them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sidecar.snapshot.build import build_snapshot
from sidecar.testing.gateway import Gateway
from sidecar.testing.postgres import SUPERUSER, PostgresCluster
from sidecar.testing.realtime.database import PostgresMode
from sidecar.testing.realtime.server import Knobs, RealtimeServer
from sidecar.testing.snapshot_server import SnapshotServer

__all__ = ["PgStack"]

SERVICE = {"role": "service_role"}


class PgStack:
    """One registered project on the cluster, seeded with `files`; an async context manager."""

    def __init__(
        self, cluster: PostgresCluster, files: Mapping[str, bytes], *, project: str | None = None
    ) -> None:
        self.cluster = cluster
        self.project = project or str(uuid.uuid4())
        self.seed_files = dict(files)
        self._stack = contextlib.AsyncExitStack()
        self._snapshots: dict[int, tuple[str, str]] = {}
        self.rt: RealtimeServer
        self.pg: PostgresMode
        self.rpc: Gateway
        self.snaps: SnapshotServer

    @property
    def topic(self) -> str:
        return f"project:{self.project}"

    async def __aenter__(self) -> Self:
        s = self._stack
        knobs = Knobs(channel_error_backoff=0.05, connect_error_backoff=0.05)
        self.rt = await s.enter_async_context(RealtimeServer(knobs=knobs))
        self.pg = await s.enter_async_context(PostgresMode(self.rt, self.cluster.dsn(SUPERUSER)))
        self.rpc = await s.enter_async_context(
            Gateway(
                self.cluster.dsn("authenticator"),
                jwt_secret=self.rt.jwt_secret,
                anon_key=self.rt.anon_key,
            )
        )
        self.snaps = await s.enter_async_context(SnapshotServer())
        await self.rpc.register_project(self.project)
        if self.seed_files:
            await self.service("bulk_upsert_project_files", files=_entries(self.seed_files))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    # -- database --

    async def service(self, fn: str, **args: Any) -> Any:
        """Call an RPC as the service role (the editor's backend); the answer."""
        status, body = await self.rpc.call(fn, {"project_uuid": self.project, **args}, SERVICE)
        if status not in (200, 204):
            raise RuntimeError(f"{fn} answered {status}: {body}")
        return body

    async def files(self) -> dict[str, bytes]:
        """The database's live files: what every converged tree must equal."""
        rows = await self.service("list_current_files")
        return {r["file_path"]: _bytes(r) for r in rows}

    async def events(self) -> list[dict[str, Any]]:
        """The event log (project_events_since, paged): rows {seq, event, payload, created_at}."""
        out: list[dict[str, Any]] = []
        while True:
            page = await self.service(
                "project_events_since", after_seq=out[-1]["seq"] if out else 0, max_rows=1000
            )
            if not page:
                return out
            out += page

    async def seq(self) -> int:
        snap = await self.service("project_snapshot")
        return int(snap["seq"])

    async def editor_upsert(self, path: str, data: bytes, *, session_id: str = "editor") -> int:
        """Write a file as the editor would (its own token, last write wins); the version."""
        [entry] = _entries({path: data})
        args = {"p_file_path": path}
        if "content_b64" in entry:
            args.update(p_content=entry["content_b64"], p_file_type="binary")
        else:
            args.update(p_content=entry["content"])
        return int((await self.editor("upsert_project_file", session_id, **args))["version"])

    async def editor_delete(self, path: str, *, session_id: str = "editor") -> int:
        """Delete a file as the editor would; the tombstone's version."""
        return int(
            (await self.editor("delete_project_file", session_id, p_file_path=path))["version"]
        )

    async def editor_bulk(
        self, changes: Mapping[str, bytes | None], *, session_id: str = "editor"
    ) -> int | None:
        """Several writes (None deletes) as one bulk:apply; its seq."""
        files = [
            {"file_path": p, "action": "delete"} if d is None else _entries({p: d})[0]
            for p, d in changes.items()
        ]
        seq = (await self.editor("bulk_upsert_project_files", session_id, files=files))["seq"]
        return None if seq is None else int(seq)

    async def editor(self, fn: str, session_id: str, **args: Any) -> Any:
        """Call an RPC with an editor token of this project (as if over HTTP)."""
        claims = {"role": "authenticated", "project_id": self.project, "session_id": session_id}
        status, body = await self.rpc.call(fn, {"project_uuid": self.project, **args}, claims)
        if status != 200:
            raise RuntimeError(f"{fn} answered {status}: {body}")
        return body

    # -- tokens, snapshots --

    def token(self, *, exp_in: float = 3600, session_id: str = "e2e", **claims: Any) -> str:
        """A container token: role authenticated, this project, a session id."""
        return self.rt.make_token(
            project_id=self.project, session_id=session_id, exp_in=exp_in, **claims
        )

    async def publish_snapshot(self) -> tuple[str, str]:
        """Build a snapshot from project_snapshot(with_content) and serve it: (URL, sha256)."""
        snap = await self.service("project_snapshot", with_content=True)
        data = await asyncio.to_thread(_build, self.project, snap)
        name = f"{self.project}/snap-{snap['seq']}.tar.zst"
        self.snaps.add(name, data)
        self._snapshots[int(snap["seq"])] = (
            self.snaps.url_for(name),
            hashlib.sha256(data).hexdigest(),
        )
        return self._snapshots[int(snap["seq"])]

    def snapshot(self) -> tuple[str, str]:
        """The newest published snapshot (base_env's default)."""
        assert self._snapshots, "publish_snapshot() first"
        return self._snapshots[max(self._snapshots)]


def _entries(files: Mapping[str, bytes]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path, data in files.items():
        try:
            out.append({"file_path": path, "content": data.decode()})
        except UnicodeDecodeError:
            out.append({"file_path": path, "content_b64": base64.b64encode(data).decode()})
    return out


def _bytes(row: Mapping[str, Any]) -> bytes:
    if "content_b64" in row:
        return base64.b64decode(row["content_b64"])
    return str(row["content"]).encode()


def _build(project: str, snap: Mapping[str, Any]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        root.mkdir()
        for f in snap["files"]:
            target = root / f["file_path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_bytes(f))
        out = Path(tmp) / "snap.tar.zst"
        build_snapshot(
            root,
            out,
            project_id=project,
            snapshot_id=f"snap-{snap['seq']}",
            seq=int(snap["seq"]),
            created_at=int(snap["created_at"]),
            versions={f["file_path"]: int(f["version"]) for f in snap["files"]},
        )
        return out.read_bytes()
