"""The database side of the loop, for tests, compose and the demo: builds snapshots of the RPC
server's table, publishes them on the snapshot server, and answers `snapshot:request` on the
project channel with `snapshot:ready`, listening through a real realtime-py client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from realtime import AsyncRealtimeClient
from realtime.types import RealtimeChannelOptions

from sidecar.snapshot.build import build_snapshot
from sidecar.testing.realtime.server import RealtimeServer
from sidecar.testing.rpc_server import RpcServer
from sidecar.testing.snapshot_server import SnapshotServer

__all__ = ["Producer"]

log = structlog.get_logger(component="producer")


class Producer:
    """Snapshots and answers to snapshot:request for one project; an async context manager."""

    def __init__(
        self,
        project_id: str,
        *,
        rpc: RpcServer,
        snapshots: SnapshotServer,
        realtime: RealtimeServer,
        url_ttl: float = 3600,
    ) -> None:
        self.project_id = project_id
        self.rpc = rpc
        self.snapshots = snapshots
        self.realtime = realtime
        self.url_ttl = url_ttl
        self.requests: list[dict[str, Any]] = []
        self.snapshots_built = 0
        self._client: AsyncRealtimeClient | None = None
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def topic(self) -> str:
        return f"project:{self.project_id}"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Join the project channel as the producer and start answering requests."""
        client = AsyncRealtimeClient(self.realtime.url, token=self.realtime.anon_key)
        await client.set_auth(self.realtime.make_token(role="service_role", exp_in=86400))
        options: RealtimeChannelOptions = {
            "config": {
                "private": True,
                "presence": None,
                "broadcast": {"self": False, "ack": False},
            }
        }
        channel = client.channel(self.topic, options)

        def on_request(msg: Mapping[str, Any]) -> None:
            try:
                self._queue.put_nowait(dict(msg.get("payload") or {}))
            except Exception:  # a raising callback kills realtime-py's listener
                log.exception("producer.callback_failed")

        channel.on_broadcast("snapshot:request", on_request)
        joined = asyncio.Event()
        await channel.subscribe(
            lambda state, _err: joined.set() if str(state).endswith("SUBSCRIBED") else None
        )
        async with asyncio.timeout(10):
            await joined.wait()
        self._client = client
        self._task = asyncio.create_task(self._answer(), name="producer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    def snapshot(self, *, expires_in: float | None = None) -> tuple[str, str]:
        """Build a snapshot of the table as it is now; returns (signed URL, sha256)."""
        files = self.rpc.files(self.project_id)
        versions = self.rpc.versions(self.project_id)
        seq = self.rpc.seq(self.project_id)
        self.snapshots_built += 1
        snap_id = f"snap-{self.snapshots_built}-{seq}"
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "tree"
            for rel, data in files.items():
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            root.mkdir(exist_ok=True)
            out = Path(tmp) / "snap.tar.zst"
            build_snapshot(
                root,
                out,
                project_id=self.project_id,
                snapshot_id=snap_id,
                seq=seq,
                created_at=int(time.time() * 1000),
                versions={p: versions[p] for p in files},
            )
            data = out.read_bytes()
        name = f"{self.project_id}/{snap_id}.tar.zst"
        self.snapshots.add(name, data)
        url = self.snapshots.url_for(name, expires_in=expires_in or self.url_ttl)
        return url, hashlib.sha256(data).hexdigest()

    async def _answer(self) -> None:
        while True:
            request = await self._queue.get()
            self.requests.append(request)
            url, sha = self.snapshot()
            seq = self.rpc.seq(self.project_id)
            self.realtime.send_db(
                self.topic,
                "snapshot:ready",
                {
                    "snapshot_url": url,
                    "snapshot_id": f"snap-{self.snapshots_built}-{seq}",
                    "sha256": sha,
                    "seq": seq,
                    "timestamp": int(time.time() * 1000),
                },
            )
            log.info("producer.snapshot_ready", reason=request.get("reason"), seq=seq)
