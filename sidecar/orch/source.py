"""Reads a project's current files and `seq` from PostgreSQL, consistently and memory bounded.

One `REPEATABLE READ READ ONLY` transaction: every statement sees the same MVCC snapshot,
which holds a prefix of the commit order and so exactly the files after event `seq` (writers
lock the project's counter row to commit; see the header of sidecar/sql/001_sidecar.sql). The
metadata (path, version, sha256, size) comes first, for the manifest; the bodies then stream
through a server-side cursor in the snapshot's member order, a batch of at most
`_BATCH_BYTES` (or one row) at a time, so memory stays bounded whatever the project's size.

`created_at` is the time event `seq` was logged (sidecar.events), not the clock of this read,
so the same files and seq always give the same snapshot bytes and snapshot_id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, BinaryIO

import psycopg

from sidecar.errors import ConfigError, SnapshotInvalidError, SnapshotUnavailableError
from sidecar.snapshot.build import tree_order
from sidecar.snapshot.manifest import FileEntry

__all__ = [
    "ProjectChangedError",
    "ProjectState",
    "Reader",
    "RestReader",
    "database_errors",
    "read_project",
]

_BATCH_BYTES = 8 << 20
_BATCH_ROWS = 256

# Member order = sidecar/snapshot/build.py tree_order: path components compared as bytes.
_ORDER = """string_to_array(f.file_path, '/') collate "C" """

_HEAD = """
select p.seq,
       (extract(epoch from coalesce(
          (select e.created_at from sidecar.events e
            where e.project_id = p.project_id and e.seq = p.seq),
          (select max(f.updated_at) from public.project_files f
            where f.project_id = p.project_id),
          p.created_at)) * 1000)::bigint
  from sidecar.projects p where p.project_id = %s
"""

_META = f"""
select f.file_path, f.version, f.content_hash, f.size
  from public.project_files f
 where f.project_id = %s and f.is_current_version and not f.deleted
 order by {_ORDER}
"""

# The bytes themselves (base64 decoded by the server), fetched in binary format: one copy in
# libpq's result and one in Python, instead of text + str + encoded bytes.
_BODIES = f"""
select f.file_path,
       case when f.file_type = 'binary' then decode(f.content, 'base64')
            else convert_to(f.content, 'UTF8') end
  from public.project_files f
 where f.project_id = %s and f.is_current_version and not f.deleted
 order by {_ORDER}
"""


@dataclass(frozen=True, slots=True)
class ProjectState:
    """What one consistent read saw (bodies are streamed separately)."""

    project_id: str
    seq: int
    created_at: int  # ms
    files: dict[str, FileEntry]


# A consistent read of one project: project_id -> context manager of (state, open_file).
Reader = Callable[[str], AbstractContextManager[tuple["ProjectState", Callable[[FileEntry], Any]]]]


@contextmanager
def read_project(
    dsn: str, project_id: str
) -> Iterator[tuple[ProjectState, Callable[[FileEntry], Any]]]:
    """Open the consistent read: (state, open_file) where open_file(entry) is a context
    manager giving that file's bytes; call it in `tree_order`, once per file.

    Raises ConfigError for an unknown project or a role that may not read the tables,
    SnapshotUnavailableError when the database cannot be reached, SnapshotInvalidError for a
    row whose body does not match its recorded hash or order.
    """
    with (
        database_errors(),
        psycopg.connect(dsn, autocommit=True, application_name="sidecar-publish") as conn,
        conn.transaction(),
    ):
        conn.execute("set transaction isolation level repeatable read, read only")
        row = conn.execute(_HEAD, (project_id,)).fetchone()
        if row is None:
            raise ConfigError(f"project {project_id} is not registered in the database")
        seq, created_at = int(row[0]), int(row[1])
        files: dict[str, FileEntry] = {}
        order: list[str] = []
        for path, version, digest, size in conn.execute(_META, (project_id,)):
            files[path] = FileEntry(path, int(size), str(digest), 0o644, int(version))
            order.append(path)
        if order != sorted(order, key=tree_order):
            # The database's collation disagrees with the member order: a bug, not data.
            raise AssertionError("the database ordered paths unlike tree_order")
        state = ProjectState(project_id, seq, created_at, files)
        with conn.cursor(name="sidecar_publish_bodies", binary=True) as cur:
            cur.execute(_BODIES, (project_id,))
            yield state, _Bodies(cur, order, files).open


@contextmanager
def database_errors() -> Iterator[None]:
    """psycopg's connection and privilege errors as named, one-line SidecarErrors."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"DATABASE_URL's role may not read the sidecar tables ({str(exc).splitlines()[0]}); "
            "connect as postgres (the migration's owner), never with an API role"
        ) from None
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapshotUnavailableError(f"the database is unreachable: {first}") from None


class _Bodies:
    """Hands out the cursor's rows one file at a time, fetching in size-bounded batches."""

    def __init__(
        self, cur: psycopg.Cursor[Any], order: list[str], files: dict[str, FileEntry]
    ) -> None:
        self._cur = cur
        self._order = order
        self._files = files
        self._next = 0  # index in order of the next row the cursor will return
        self._batch: list[tuple[str, bytes]] = []

    def _fill(self) -> None:
        budget, count = 0, 0
        for path in self._order[self._next :]:
            budget += self._files[path].size
            count += 1
            if budget >= _BATCH_BYTES or count >= _BATCH_ROWS:
                break
        try:
            rows = self._cur.fetchmany(max(1, count))
        except psycopg.DataError as exc:  # a corrupt stored base64 body
            raise SnapshotInvalidError(f"a stored file body cannot be decoded: {exc}") from None
        self._next += len(rows)
        self._batch = list(reversed(rows))

    @contextmanager
    def open(self, entry: FileEntry) -> Iterator[BinaryIO]:
        if not self._batch:
            self._fill()
        if not self._batch:
            raise SnapshotInvalidError(f"{entry.path!r}: the database returned fewer files")
        path, content = self._batch.pop()
        if path != entry.path:
            raise SnapshotInvalidError(f"{entry.path!r}: the database returned {path!r} instead")
        yield io.BytesIO(content)


def _bytes(path: str, file_type: str, content: str) -> bytes:
    if file_type == "binary":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise SnapshotInvalidError(f"{path!r}: stored base64 is corrupt") from None
    return content.encode("utf-8")


class ProjectChangedError(Exception):
    """The project changed during a REST read (a file's head moved past the listed version)."""


@dataclass
class RestReader:
    """The same read through PostgREST with the service-role key, for an orchestrator without
    a database URL. `project_snapshot` lists the files and `seq` in one statement; each body
    then comes from `get_project_file`, and a head whose version is not the listed one means
    the project moved on: ProjectChangedError, and the caller reads again. Versions of a path
    are immutable, so when every version matches the bytes are exactly the state at `seq`.
    Called from the build's thread; the HTTP calls run on `loop`.
    """

    url: str  # the project URL; RPCs under /rest/v1/rpc/
    key: str
    session: Any  # aiohttp.ClientSession
    loop: asyncio.AbstractEventLoop

    def _rpc(self, fn: str, args: dict[str, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(self._call(fn, args), self.loop).result()

    async def _call(self, fn: str, args: dict[str, Any]) -> Any:
        headers = {"apikey": self.key, "Authorization": f"Bearer {self.key}"}
        async with self.session.post(
            f"{self.url}/rest/v1/rpc/{fn}", json=args, headers=headers
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 300:
                detail = body.get("message") if isinstance(body, dict) else body
                if resp.status == 401 or resp.status == 403:
                    raise ConfigError(f"rpc/{fn} refused the service key: {resp.status} {detail}")
                raise SnapshotUnavailableError(f"rpc/{fn} answered {resp.status}: {detail}")
            return body

    @contextmanager
    def read(self, project_id: str) -> Iterator[tuple[ProjectState, Callable[[FileEntry], Any]]]:
        snap = self._rpc("project_snapshot", {"project_uuid": project_id, "with_content": False})
        if not snap:
            raise ConfigError(f"project {project_id} is not registered in the database")
        seq = int(snap["seq"])
        created_at = int(snap["created_at"])
        if seq > 0:
            rows = self._rpc(
                "project_events_since",
                {"project_uuid": project_id, "after_seq": seq - 1, "max_rows": 1},
            )
            if rows and int(rows[0]["seq"]) == seq:
                created_at = _iso_ms(str(rows[0]["created_at"]))
        files: dict[str, FileEntry] = {}
        for f in snap["files"]:
            path = str(f["file_path"])
            files[path] = FileEntry(
                path, int(f["size"]), str(f["content_hash"]), 0o644, int(f["version"])
            )

        @contextmanager
        def open_file(entry: FileEntry) -> Iterator[BinaryIO]:
            row = self._rpc(
                "get_project_file", {"project_uuid": project_id, "p_file_path": entry.path}
            )
            if not row or row.get("deleted") or int(row["version"]) != entry.version:
                raise ProjectChangedError(entry.path)
            if "content_b64" in row:
                yield io.BytesIO(_bytes(entry.path, "binary", str(row["content_b64"])))
            else:
                yield io.BytesIO(_bytes(entry.path, "text", str(row.get("content") or "")))

        yield ProjectState(project_id, seq, created_at, files), open_file


def _iso_ms(text: str) -> int:
    """A timestamptz as PostgREST renders it, in ms rounded like `(extract(epoch from t) *
    1000)::bigint` in the database path (half away from zero), so both paths agree."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    micros = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return int((Decimal(micros) / 1000).quantize(Decimal(1), rounding=ROUND_HALF_UP))
