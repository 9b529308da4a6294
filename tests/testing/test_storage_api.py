"""The Storage test server's API (upload, sign, Storage's HTTP-400 error bodies), driven by the
orchestrator's Storage client (sidecar/orch/storage.py) and raw HTTP."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from sidecar.orch.storage import StorageClient, StorageError
from sidecar.testing.snapshot_server import SnapshotServer

BUCKET = "project-snapshots"


@pytest.fixture
async def storage() -> AsyncIterator[SnapshotServer]:
    async with SnapshotServer(buckets=[BUCKET], file_size_limit=4 << 20) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def blob(tmp_path: Path, size: int, name: str = "obj.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


async def test_upload_sign_download(
    storage: SnapshotServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An upload (streamed, 3 MiB) is stored byte for byte; its signed URL downloads it."""
    src = blob(tmp_path, 3 << 20)
    client = StorageClient(storage.base_url, storage.service_role_key, http)
    await client.upload(BUCKET, "p1/s1.tar.zst", src)
    assert storage.stored(f"{BUCKET}/p1/s1.tar.zst") == src.read_bytes()
    url = await client.sign(BUCKET, "p1/s1.tar.zst", 60)
    assert url.startswith(
        f"{storage.base_url}/storage/v1/object/sign/{BUCKET}/p1/s1.tar.zst?token="
    )
    claims = jwt.decode(url.partition("token=")[2], storage.secret, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 60
    async with http.get(url) as resp:
        assert resp.status == 200
        assert (
            hashlib.sha256(await resp.read()).digest() == hashlib.sha256(src.read_bytes()).digest()
        )
    # The opaque secret key works as well.
    other = StorageClient(storage.base_url, storage.secret_key, http)
    assert (await other.sign(BUCKET, "p1/s1.tar.zst", 5)).startswith(storage.base_url)


async def test_duplicate_and_upsert(
    storage: SnapshotServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An existing path without x-upsert: HTTP 400, body statusCode 409 Duplicate; with it,
    the object is replaced."""
    client = StorageClient(storage.base_url, storage.service_role_key, http)
    first, second = blob(tmp_path, 10, "a"), blob(tmp_path, 20, "b")
    await client.upload(BUCKET, "k", first)
    async with http.post(
        f"{storage.base_url}/storage/v1/object/{BUCKET}/k",
        data=b"x",
        headers={"Authorization": f"Bearer {storage.service_role_key}"},
    ) as resp:
        assert resp.status == 400
        assert await resp.json() == {
            "statusCode": "409",
            "error": "Duplicate",
            "message": "The resource already exists",
        }
    with pytest.raises(StorageError) as err:
        await client.upload(BUCKET, "k", second)
    assert err.value.duplicate
    assert storage.stored(f"{BUCKET}/k") == first.read_bytes()
    await client.upload(BUCKET, "k", second, upsert=True)
    assert storage.stored(f"{BUCKET}/k") == second.read_bytes()
    assert [(u.key, u.upsert, u.status) for u in storage.uploads] == [
        (f"{BUCKET}/k", False, "200"),
        (f"{BUCKET}/k", False, "409"),
        (f"{BUCKET}/k", False, "409"),
        (f"{BUCKET}/k", True, "200"),
    ]


async def test_errors_come_as_http_400_with_the_status_in_the_body(
    storage: SnapshotServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Missing object, unknown bucket, a non-service token, a bad or expired JWT, a too large
    object, a bad expiresIn: each an HTTP 400 the client reads from statusCode/error."""
    src = blob(tmp_path, 10)
    service = StorageClient(storage.base_url, storage.service_role_key, http)
    now = int(time.time())
    user = jwt.encode({"role": "authenticated", "exp": now + 60}, storage.jwt_secret)
    expired = jwt.encode({"role": "service_role", "exp": now - 60}, storage.jwt_secret)
    forged = jwt.encode({"role": "service_role", "exp": now + 60}, "x" * 40)
    big = blob(tmp_path, (4 << 20) + 1, "big")

    cases = [
        (service.sign(BUCKET, "missing", 60), "404", "not_found"),
        (service.upload("nope", "k", src), "404", "Bucket not found"),
        (
            StorageClient(storage.base_url, user, http).upload(BUCKET, "k", src),
            "403",
            "Unauthorized",
        ),
        (
            StorageClient(storage.base_url, expired, http).upload(BUCKET, "k", src),
            "400",
            "InvalidJWT",
        ),
        (StorageClient(storage.base_url, forged, http).sign(BUCKET, "k", 5), "400", "InvalidJWT"),
        (service.upload(BUCKET, "big", big), "413", "Payload too large"),
    ]
    for call, status, error in cases:
        with pytest.raises(StorageError) as err:
            await call
        assert (err.value.status, err.value.error) == (status, error), str(err.value)
    assert storage.stored(f"{BUCKET}/big") is None
    await service.upload(BUCKET, "k", src)
    # A user token cannot see the object without a storage.objects policy: not found.
    with pytest.raises(StorageError) as err:
        await StorageClient(storage.base_url, user, http).sign(BUCKET, "k", 5)
    assert err.value.not_found
    async with http.post(
        f"{storage.base_url}/storage/v1/object/sign/{BUCKET}/k",
        json={"expiresIn": 0},
        headers={"Authorization": f"Bearer {storage.service_role_key}"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["statusCode"] == "400"
    # Tokens and keys never appear in the error text.
    with pytest.raises(StorageError) as err:
        await StorageClient(storage.base_url, expired, http).upload(BUCKET, "k", src)
    assert expired not in str(err.value)
