"""`sidecar snapshot publish` against a real PostgreSQL (the migration) and the Storage test
server: the real command as a subprocess, its output hydrated by the real `sidecar hydrate`."""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from sidecar.snapshot.build import build_snapshot
from sidecar.testing.commands import sidecar_command
from sidecar.testing.postgres import PostgresCluster
from sidecar.testing.snapshot_server import SnapshotServer

from ..pgfixtures import Db

pytestmark = pytest.mark.pg

BUCKET = "project-snapshots"
SERVICE = {"role": "service_role"}

# Names whose snapshot order differs from a plain string sort ("a/z" before "a.txt").
FILES: dict[str, bytes] = {
    "a.txt": b"top level\n",
    "a/z.txt": b"nested\n",
    "a/b/deep.json": b'{"k": 1}\n',
    "b-c/x": "unicode \u00e9\u4e2d\n".encode(),
    "img.bin": bytes(range(256)) * 40,
    "empty.txt": b"",
}


@pytest.fixture
async def storage() -> AsyncIterator[SnapshotServer]:
    async with SnapshotServer(buckets=[BUCKET]) as server:
        yield server


def orch_env(cluster: PostgresCluster, storage: SnapshotServer, **extra: str) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SUPABASE_", "SIDECAR_", "SNAPSHOT_", "REALTIME_", "DATABASE_"))
    }
    return {
        **base,
        "DATABASE_URL": cluster.url("postgres"),
        "SUPABASE_URL": storage.base_url,
        "SUPABASE_SERVICE_ROLE_KEY": storage.service_role_key,
        "LOG_FORMAT": "json",
        **extra,
    }


async def write_files(db: Db, project: str, files: Mapping[str, bytes | None]) -> None:
    entries: list[dict[str, Any]] = []
    for path, data in files.items():
        if data is None:
            entries.append({"file_path": path, "action": "delete"})
        elif path.endswith(".bin"):
            entries.append({"file_path": path, "content_b64": base64.b64encode(data).decode()})
        else:
            entries.append({"file_path": path, "content": data.decode()})
    status, body = await db.call(
        "bulk_upsert_project_files", SERVICE, project_uuid=project, files=entries
    )
    assert status == 200, body


async def publish(env: Mapping[str, str], project: str) -> dict[str, Any]:
    code, out, err = await sidecar_command(
        env, "snapshot", "publish", "--project", project, "--json"
    )
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    assert "token=" not in err  # the signed URL's query never reaches the logs
    return result


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sidecar" not in p.relative_to(root).parts
    }


async def test_publish_then_hydrate_bit_for_bit(
    db: Db, project: str, pg_cluster: PostgresCluster, storage: SnapshotServer, tmp_path: Path
) -> None:
    """The published object hydrates (real `sidecar hydrate`, sha256 pinned) into exactly the
    database's files; its bytes equal `build_snapshot` of the same files on disk with the same
    created_at, seq and versions; created_at is event seq's time, not the publish's clock."""
    await write_files(db, project, FILES)
    await write_files(db, project, {"a.txt": b"changed\n", "gone.txt": b"x"})
    await write_files(db, project, {"gone.txt": None})
    env = orch_env(pg_cluster, storage)
    code, out, err = await sidecar_command(env, "snapshot", "publish", "--project", project)
    assert code == 0, err
    lines = dict(line.split("=", 1) for line in out.strip().splitlines())
    assert set(lines) == {"SNAPSHOT_URL", "SNAPSHOT_SHA256"}

    project_dir = tmp_path / "project"
    hydrate_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "SIDECAR_"))
    } | {
        "SNAPSHOT_URL": lines["SNAPSHOT_URL"],
        "SNAPSHOT_SHA256": lines["SNAPSHOT_SHA256"],
        "PROJECT_DIR": str(project_dir),
        "PROJECT_ID": project,
    }
    code, _, err = await sidecar_command(hydrate_env, "hydrate")
    assert code == 0, err
    expected = dict(FILES) | {"a.txt": b"changed\n"}
    assert tree(project_dir) == expected

    ((seq, created_ms),) = await db.sql(
        "select p.seq, (extract(epoch from e.created_at) * 1000)::bigint from sidecar.projects p"
        " join sidecar.events e on e.project_id = p.project_id and e.seq = p.seq"
        " where p.project_id = %s",
        project,
    )
    assert seq == 3
    versions = dict.fromkeys(expected, 1) | {"a.txt": 2}
    reference = io.BytesIO()
    manifest = build_snapshot(
        project_dir,
        reference,
        project_id=project,
        created_at=created_ms,
        seq=seq,
        versions=versions,
    )
    (obj,) = [k for k in storage.object_keys() if k.startswith(f"{BUCKET}/{project}/")]
    assert obj == f"{BUCKET}/{project}/{manifest.snapshot_id}.tar.zst"
    assert storage.stored(obj) == reference.getvalue()


async def test_unchanged_project_is_uploaded_once_and_a_change_makes_a_new_object(
    db: Db, project: str, pg_cluster: PostgresCluster, storage: SnapshotServer
) -> None:
    await write_files(db, project, FILES)
    env = orch_env(pg_cluster, storage)
    first = await publish(env, project)
    second = await publish(env, project)
    assert {k: first[k] for k in ("sha256", "snapshot_id", "seq")} == {
        k: second[k] for k in ("sha256", "snapshot_id", "seq")
    }
    assert [u.status for u in storage.uploads] == ["200"]  # the second publish only signed
    assert len(storage.signs) == 2

    await write_files(db, project, {"new.txt": b"new\n"})
    third = await publish(env, project)
    assert third["seq"] == first["seq"] + 1
    assert third["snapshot_id"] != first["snapshot_id"]
    assert third["sha256"] != first["sha256"]
    assert [u.status for u in storage.uploads] == ["200", "200"]
    keys = sorted(k for k in storage.object_keys() if k.startswith(f"{BUCKET}/{project}/"))
    assert keys == sorted(f"{BUCKET}/{project}/{r['snapshot_id']}.tar.zst" for r in (first, third))


async def test_empty_project_publishes(
    project: str, pg_cluster: PostgresCluster, storage: SnapshotServer
) -> None:
    result = await publish(orch_env(pg_cluster, storage), project)
    assert result["seq"] == 0


async def test_credentials_are_checked_both_ways(
    project: str, pg_cluster: PostgresCluster, storage: SnapshotServer, tmp_path: Path
) -> None:
    """publish and worker refuse a scoped token or a publishable key (exit 78, one line); publish
    refuses an unknown
    project; the container's `sidecar run` still refuses the service-role key."""
    import jwt

    scoped = jwt.encode(
        {"role": "authenticated", "project_id": project, "exp": 2**31 - 1}, storage.jwt_secret
    )
    for key in (scoped, "sb_publishable_abc123"):
        env = orch_env(pg_cluster, storage, SUPABASE_SERVICE_ROLE_KEY=key)
        code, out, err = await sidecar_command(env, "snapshot", "publish", "--project", project)
        assert (code, out) == (78, "")
        assert "SUPABASE_SERVICE_ROLE_KEY" in err.strip().splitlines()[-1]
        assert key not in err
        code, out, err = await sidecar_command(env, "snapshot", "worker")
        assert (code, out) == (78, "")
        assert "SUPABASE_SERVICE_ROLE_KEY" in err.strip().splitlines()[-1]
    env = orch_env(pg_cluster, storage)
    code, _, err = await sidecar_command(env, "snapshot", "publish", "--project", str(uuid.uuid4()))
    assert code == 78
    assert "not registered" in err.strip().splitlines()[-1]
    # An API role's connection, or no database at all: named, one line, no traceback.
    api_role = orch_env(pg_cluster, storage, DATABASE_URL=pg_cluster.url("authenticator"))
    code, _, err = await sidecar_command(api_role, "snapshot", "publish", "--project", project)
    assert code == 78
    assert "DATABASE_URL's role may not read" in err.strip().splitlines()[-1]
    down = orch_env(pg_cluster, storage, DATABASE_URL="postgresql://postgres@127.0.0.1:1/x")
    code, _, err = await sidecar_command(down, "snapshot", "publish", "--project", project)
    assert code == 69
    assert "the database is unreachable" in err.strip().splitlines()[-1]

    run_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "SIDECAR_"))
    } | {
        "SUPABASE_SERVICE_ROLE_KEY": storage.service_role_key,
        "PROJECT_DIR": str(tmp_path / "p"),
        "SNAPSHOT_URL": "http://127.0.0.1:9/x",
    }
    code, _, err = await sidecar_command(run_env, "run", "--", "true")
    assert code == 78
    assert "service-role" in err


async def test_rest_path_gives_the_same_snapshot_as_the_database_path(
    db: Db, project: str, pg_cluster: PostgresCluster
) -> None:
    """Without DATABASE_URL, publish reads through PostgREST (the gateway) with the service
    key; the snapshot is byte for byte the database path's (same snapshot_id and sha256, one
    upload between the two)."""
    from sidecar.testing.gateway import Gateway

    await write_files(db, project, FILES)
    await write_files(db, project, {"a.txt": b"second version\n"})
    async with Gateway(pg_cluster.dsn("authenticator")) as gateway:
        service = gateway.make_token(None, role="service_role")
        async with SnapshotServer(buckets=[BUCKET], jwt_secret=gateway.jwt_secret) as storage:
            rest_env = orch_env(
                pg_cluster,
                storage,
                SUPABASE_URL=gateway.url,
                SIDECAR_STORAGE_URL=storage.base_url,
                SUPABASE_SERVICE_ROLE_KEY=service,
            )
            rest_env.pop("DATABASE_URL")
            via_rest = await publish(rest_env, project)
            via_db = await publish(orch_env(pg_cluster, storage), project)
            assert via_rest["snapshot_id"] == via_db["snapshot_id"]
            assert via_rest["sha256"] == via_db["sha256"]
            assert via_rest["seq"] == 2
            assert [u.status for u in storage.uploads] == ["200"]
            assert {c[0] for c in gateway.calls} >= {"project_snapshot", "get_project_file"}


async def test_known_snapshots_are_signed_without_a_rebuild(
    db: Db, project: str, pg_cluster: PostgresCluster, storage: SnapshotServer
) -> None:
    """The worker's cache: an unchanged project is only signed; if its object was deleted
    meanwhile, it is built and uploaded again; a change builds a new one."""
    import aiohttp

    from sidecar.orch.publish import database_reader
    from sidecar.orch.publish import publish as publish_project
    from sidecar.orch.storage import StorageClient

    await write_files(db, project, FILES)
    known: dict[str, tuple[str, int]] = {}
    async with aiohttp.ClientSession() as http:
        client = StorageClient(storage.base_url, storage.service_role_key, http)

        async def once() -> Any:
            return await publish_project(
                project,
                read=database_reader(pg_cluster.url("postgres")),
                storage=client,
                bucket=BUCKET,
                expires_in=60,
                known=known,
            )

        first = await once()
        assert (first.built, first.uploaded) == (True, True)
        second = await once()
        assert (second.built, second.uploaded) == (False, False)
        assert (second.sha256, second.snapshot_id) == (first.sha256, first.snapshot_id)
        storage.delete(f"{BUCKET}/{project}/{first.snapshot_id}.tar.zst")
        third = await once()
        assert (third.built, third.uploaded, third.sha256) == (True, True, first.sha256)
        await write_files(db, project, {"more.txt": b"more\n"})
        fourth = await once()
        assert (fourth.built, fourth.uploaded) == (True, True)
        assert fourth.snapshot_id != first.snapshot_id
