"""Hydration end to end: real snapshot server on 127.0.0.1, real snapshots, real files, faults."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.config import Limits, Settings, SnapshotSettings
from sidecar.errors import (
    ConfigError,
    QuotaExceededError,
    SnapshotExpiredError,
    SnapshotInvalidError,
)
from sidecar.metrics import Metrics
from sidecar.snapshot.build import build_snapshot
from sidecar.snapshot.hydrate import hydrate
from sidecar.snapshot.manifest import Manifest
from sidecar.snapshot.progress import Progress
from sidecar.snapshot.publish import verify_tree
from sidecar.testing.snapshot_server import SnapshotServer
from sidecar.tree.project import ProjectTree
from sidecar.tree.state import StateStore

IDS = {"project_id": "local", "session_id": "local"}


def make_tree(root: Path, *, seed: int = 1, files: int = 40, binary_kib: int = 48) -> Path:
    """A small project: nested text files, incompressible blobs, an executable and a symlink."""
    rng = random.Random(seed)
    (root / "src" / "lib").mkdir(parents=True, exist_ok=True)
    (root / "assets").mkdir(exist_ok=True)
    (root / "package.json").write_text(json.dumps({"name": "demo", "version": f"1.0.{seed}"}))
    for i in range(files):
        body = "".join(f"export const v{i}_{j} = {rng.randint(0, 10**6)};\n" for j in range(50))
        (root / "src" / "lib" / f"m{i}.js").write_text(body)
    for i in range(files):
        (root / "assets" / f"blob{i}.bin").write_bytes(rng.randbytes(binary_kib * 1024))
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (root / "src" / "index.js").symlink_to("lib/m0.js")
    return root


def tree_of(root: Path) -> dict[str, object]:
    """Every file and symlink under root (outside .sidecar) with its content or target."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".sidecar" or rel_dir.startswith(".sidecar/"):
            continue
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            else:
                out[rel] = (Path(full).read_bytes(), os.stat(full).st_mode & 0o777)
    return out


def snapshot_bytes(src: Path, **kw: Any) -> bytes:
    """The snapshot of src, built in memory with a fixed created_at."""
    buf = io.BytesIO()
    build_snapshot(src, buf, project_id="local", created_at=1_700_000_000_000, **kw)
    return buf.getvalue()


@dataclasses.dataclass
class Env:
    settings: Settings
    state: StateStore
    metrics: Metrics
    server: SnapshotServer
    _tree: ProjectTree | None = None

    @property
    def project(self) -> Path:
        return self.settings.project_dir

    def reopen(self) -> None:
        """Simulate a process restart: a fresh StateStore and Metrics on the same dirs."""
        self.state.close()
        self.state = StateStore(self.settings.state_dir)
        self.metrics = Metrics()

    @property
    def tree(self) -> ProjectTree:
        """The ProjectTree over the current state (one per StateStore, so that concurrent
        hydrations of one Env share its locks)."""
        if self._tree is None or self._tree.state is not self.state:
            self._tree = ProjectTree(self.project, self.state, self.settings.limits)
        return self._tree

    async def hydrate(self, url: str, **kw: Any) -> Manifest:
        return await hydrate(
            self.settings, self.tree, self.metrics, url=url, progress=Progress(enabled=False), **kw
        )

    def count(self, outcome: str) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "sidecar_hydrations_total", {**IDS, "outcome": outcome}
            )
            or 0.0
        )

    def staging_left(self) -> list[str]:
        return [p.name for p in self.settings.state_dir.glob("staging-*")]


@pytest.fixture
async def env(
    tmp_path: Path, snapshot_server: SnapshotServer, fast_snapshot_settings: SnapshotSettings
) -> AsyncIterator[Env]:
    """Settings, state and metrics for a project dir under tmp_path, plus the server."""
    project = tmp_path / "project"
    settings = Settings(
        project_dir=project, state_dir=project / ".sidecar", snapshot=fast_snapshot_settings
    )
    e = Env(settings, StateStore(settings.state_dir), Metrics(), snapshot_server)
    yield e
    e.state.close()


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """The first version of the sample project."""
    return make_tree(tmp_path / "v1", seed=1)


async def test_hydrates_a_fresh_project(env: Env, v1: Path) -> None:
    """A fresh project dir becomes exactly the snapshot's tree, recorded in state and metrics."""
    data = snapshot_bytes(v1)
    env.server.add("p/v1.tar.zst", data)
    with capture_logs() as logs:
        manifest = await env.hydrate(env.server.url_for("p/v1.tar.zst"))
    assert tree_of(env.project) == tree_of(v1)
    assert verify_tree(env.project, env.state) == []
    assert len(manifest.files) == len(tree_of(v1))
    assert env.count("ok") == 1
    assert env.metrics.registry.get_sample_value("sidecar_hydration_bytes_total", IDS) == len(data)
    assert env.staging_left() == []
    events = {e["event"]: e for e in logs}
    assert events["snapshot.hydrate_started"]["url"].endswith("/p/v1.tar.zst?<redacted>")
    done = events["snapshot.hydrated"]
    assert done["snapshot_id"] == manifest.snapshot_id
    assert (done["files"], done["downloaded"], done["outcome"]) == (
        len(manifest.files),
        len(data),
        "ok",
    )
    assert {"bytes", "seconds"} <= done.keys()


async def test_twenty_drops_in_one_hydration(env: Env, v1: Path) -> None:
    """One hydration survives 20 connections dropped at random offsets and verifies."""
    data = snapshot_bytes(v1)
    env.server.add("v1.tar.zst", data)
    env.server.faults.drop_at(random.Random(5).sample(range(1, len(data)), 20))
    await env.hydrate(env.server.url_for("v1.tar.zst"))
    assert tree_of(env.project) == tree_of(v1)
    assert verify_tree(env.project, env.state) == []
    gets = env.server.gets("v1.tar.zst")
    assert len(gets) == 21
    assert sum(g.dropped for g in gets) == 20
    assert all(g.status == 206 for g in gets[1:])
    assert env.metrics.registry.get_sample_value("sidecar_snapshot_retries_total", IDS) == 20


async def test_server_ignoring_range_restarts_and_is_correct(env: Env, v1: Path) -> None:
    """When the server answers 200 to Range, the writer starts over and the result is right."""
    data = snapshot_bytes(v1)
    env.server.add("v1.tar.zst", data)
    env.server.faults.ignore_range = True
    env.server.faults.drop_after = [len(data) // 3, len(data) // 2]
    with capture_logs() as logs:
        await env.hydrate(env.server.url_for("v1.tar.zst"))
    assert tree_of(env.project) == tree_of(v1)
    assert [e["event"] for e in logs].count("snapshot.download_restarted") == 2
    assert env.staging_left() == []
    assert next(e for e in logs if e["event"] == "snapshot.hydrated")["restarts"] == 2


async def test_expired_url_fails_within_a_second(env: Env, v1: Path) -> None:
    """An expired signed URL raises SnapshotExpiredError in under a second; nothing written."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    env.settings = dataclasses.replace(
        env.settings, snapshot=SnapshotSettings(retries=8, backoff_initial=5.0, backoff_max=10.0)
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(SnapshotExpiredError, match="jwt expired"):
        await env.hydrate(env.server.url_for("v1.tar.zst", expires_in=-60))
    assert loop.time() - t0 < 1.0
    assert tree_of(env.project) == {}
    assert env.count("expired") == 1


async def test_5xx_then_success(env: Env, v1: Path) -> None:
    """A few 503s are retried and the hydration then succeeds."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    env.server.faults.fail_first = 3
    await env.hydrate(env.server.url_for("v1.tar.zst"))
    assert tree_of(env.project) == tree_of(v1)
    assert len(env.server.gets("v1.tar.zst")) == 4


async def test_corrupt_byte_is_rejected_and_project_unchanged(
    env: Env, v1: Path, tmp_path: Path
) -> None:
    """A flipped byte in the stream is SnapshotInvalidError; the previous tree stays as it was."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    await env.hydrate(env.server.url_for("v1.tar.zst"))
    before = tree_of(env.project)
    data2 = snapshot_bytes(make_tree(tmp_path / "v2", seed=2))
    env.server.add("v2.tar.zst", data2)
    env.server.faults.corrupt_at = len(data2) // 2
    with pytest.raises(SnapshotInvalidError):
        await env.hydrate(env.server.url_for("v2.tar.zst"))
    assert tree_of(env.project) == before
    assert verify_tree(env.project, env.state) == []
    assert env.staging_left() == []
    assert env.count("invalid") == 1


async def test_sha256_mismatch_is_rejected(env: Env, v1: Path) -> None:
    """SNAPSHOT_SHA256 that does not match the bytes: SnapshotInvalidError, nothing published."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    with pytest.raises(SnapshotInvalidError, match="sha256"):
        await env.hydrate(env.server.url_for("v1.tar.zst"), sha256="ab" * 32)
    assert tree_of(env.project) == {}
    assert env.staging_left() == []


async def test_sha256_match_is_accepted(env: Env, v1: Path) -> None:
    """The right SNAPSHOT_SHA256 (from settings) is accepted."""
    data = snapshot_bytes(v1)
    env.server.add("v1.tar.zst", data)
    env.settings = dataclasses.replace(
        env.settings,
        snapshot=dataclasses.replace(
            env.settings.snapshot, sha256=hashlib.sha256(data).hexdigest()
        ),
    )
    await env.hydrate(env.server.url_for("v1.tar.zst"))
    assert tree_of(env.project) == tree_of(v1)


async def test_restart_with_snapshot_in_place_downloads_nothing(env: Env, v1: Path) -> None:
    """After a restart with the same snapshot (fresh token), the tree is verified, not fetched:
    the conditional request (the ETag recorded at publish) is answered 304, no body."""
    blob = snapshot_bytes(v1)
    env.server.add("v1.tar.zst", blob)
    first = await env.hydrate(env.server.url_for("v1.tar.zst"))
    env.reopen()
    with capture_logs() as logs:
        again = await env.hydrate(env.server.url_for("v1.tar.zst", expires_in=600))
    gets = env.server.gets("v1.tar.zst")
    assert [r.status for r in gets] == [200, 304]
    assert gets[1].if_none_match is not None
    assert env.server.bytes_sent("v1.tar.zst") == len(blob)
    assert again.snapshot_id == first.snapshot_id
    assert again.files == first.files
    assert again.created_at == first.created_at
    assert env.count("in_place") == 1
    assert [e["outcome"] for e in logs if e["event"] == "snapshot.hydrated"] == ["in_place"]


async def test_damaged_files_are_repaired(env: Env, v1: Path) -> None:
    """A changed (same size) and a deleted file are found by verification and rewritten."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    await env.hydrate(env.server.url_for("v1.tar.zst"))
    blob = env.project / "assets" / "blob3.bin"
    blob.write_bytes(bytes(len(blob.read_bytes())))  # same size, other bytes
    (env.project / "src" / "lib" / "m7.js").unlink()
    env.reopen()
    with capture_logs() as logs:
        await env.hydrate(env.server.url_for("v1.tar.zst"))
    assert tree_of(env.project) == tree_of(v1)
    assert verify_tree(env.project, env.state) == []
    assert [r.status for r in env.server.gets("v1.tar.zst")] == [200, 304, 200]
    done = next(e for e in logs if e["event"] == "snapshot.hydrated")
    assert done["written"] == 3  # the two damaged files, and the symlink (always re-created)
    assert any(e["event"] == "snapshot.tree_damaged" and e["files"] == 2 for e in logs)


async def test_new_snapshot_converges_and_rewrites_only_changes(
    env: Env, v1: Path, tmp_path: Path
) -> None:
    """A second snapshot adds, changes and removes files; unchanged ones are not rewritten."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    await env.hydrate(env.server.url_for("v1.tar.zst"))
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2, symlinks=True)
    (v2 / "package.json").write_text('{"name": "demo", "version": "2.0.0"}\n')
    (v2 / "src" / "lib" / "m1.js").unlink()
    (v2 / "NEW.md").write_text("# new\n")
    env.server.add("v2.tar.zst", snapshot_bytes(v2))
    with capture_logs() as logs:
        await env.hydrate(env.server.url_for("v2.tar.zst"))
    assert tree_of(env.project) == tree_of(v2)
    done = next(e for e in logs if e["event"] == "snapshot.hydrated")
    assert (done["removed"], done["written"]) == (1, 3)  # package.json, NEW.md, the symlink


async def test_quota_exceeded_publishes_nothing(env: Env, v1: Path) -> None:
    """A snapshot over SIDECAR_MAX_FILES raises QuotaExceededError; nothing is written."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    env.settings = dataclasses.replace(env.settings, limits=Limits(max_files=5))
    with pytest.raises(QuotaExceededError):
        await env.hydrate(env.server.url_for("v1.tar.zst"))
    assert tree_of(env.project) == {}
    assert env.count("quota") == 1


async def test_cancellation_leaves_project_unchanged(env: Env, v1: Path, tmp_path: Path) -> None:
    """Cancelling mid-download stops the worker, removes staging, keeps the old tree."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    await env.hydrate(env.server.url_for("v1.tar.zst"))
    before = tree_of(env.project)
    data2 = snapshot_bytes(make_tree(tmp_path / "v2", seed=2))
    env.server.add("v2.tar.zst", data2)
    env.server.faults.trickle = 400_000
    task = asyncio.create_task(env.hydrate(env.server.url_for("v2.tar.zst")))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (
        env.server.gets("v2.tar.zst")
        and env.server.gets("v2.tar.zst")[0].sent > 300_000
        and env.staging_left()
    ):
        assert loop.time() < deadline, "download did not start"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tree_of(env.project) == before
    assert env.staging_left() == []
    assert not [t for t in threading.enumerate() if t.name == "sidecar-hydrate"]
    assert env.count("cancelled") == 1


async def test_logs_never_contain_the_token(env: Env, v1: Path) -> None:
    """Across retries, drops and an expiry, no log event carries the signed URL's token."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    env.server.faults.fail_first = 2
    env.server.faults.drop_after = [None, None, 5000]
    url = env.server.url_for("v1.tar.zst")
    expired = env.server.url_for("v1.tar.zst", expires_in=-5)
    with capture_logs() as logs:
        await env.hydrate(url)
        with pytest.raises(SnapshotExpiredError) as info:
            await env.hydrate(expired, sha256="cd" * 32)
    text = repr(logs) + str(info.value)
    assert "token=" not in text
    assert url.split("token=")[1] not in text
    assert expired.split("token=")[1] not in text
    assert any(e["event"] == "snapshot.retry_scheduled" for e in logs)


async def test_missing_url_is_a_config_error(env: Env) -> None:
    """No SNAPSHOT_URL and no url argument: ConfigError naming SNAPSHOT_URL."""
    with pytest.raises(ConfigError, match="SNAPSHOT_URL"):
        await hydrate(env.settings, env.tree, env.metrics)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_in_place_on_a_tty_only() -> None:
    """On a TTY the line is rewritten with \\r and throttled; elsewhere nothing is written."""
    now = [0.0]
    tty = _Tty()
    p = Progress(tty, clock=lambda: now[0])
    for i in range(50):
        now[0] = i * 0.01
        p.update(downloaded=i * 1024 * 1024, total=100 * 1024 * 1024, files=i, files_total=99)
    p.finish("done")
    out = tty.getvalue()
    assert 4 <= out.count("\r") <= 7  # 0.5 s at most 10 redraws/s, plus the final message
    assert "hydrating" in out
    assert "/99 files" in out
    assert "ETA" in out
    assert out.endswith("done\x1b[K\n")
    plain = io.StringIO()
    q = Progress(plain)
    q.update(downloaded=1, force=True)
    q.finish("done")
    assert plain.getvalue() == ""


async def test_same_url_new_snapshot_id_downloads(env: Env, v1: Path, tmp_path: Path) -> None:
    """An object overwritten at the same path is fetched when the caller names the new id."""
    env.server.add("latest.tar.zst", snapshot_bytes(v1))
    first = await env.hydrate(env.server.url_for("latest.tar.zst"))
    v2 = make_tree(tmp_path / "v2", seed=2)
    env.server.add("latest.tar.zst", snapshot_bytes(v2, snapshot_id="snap-2"))
    same = await env.hydrate(env.server.url_for("latest.tar.zst"), snapshot_id=first.snapshot_id)
    assert same.snapshot_id == first.snapshot_id
    assert len(env.server.gets("latest.tar.zst")) == 1
    new = await env.hydrate(env.server.url_for("latest.tar.zst"), snapshot_id="snap-2")
    assert new.snapshot_id == "snap-2"
    assert tree_of(env.project) == tree_of(v2)


async def test_concurrent_hydrations_are_serialised(env: Env, v1: Path) -> None:
    """Two hydrations of one project dir at once: one downloads, the other finds it in place."""
    env.server.add("v1.tar.zst", snapshot_bytes(v1))
    url = env.server.url_for("v1.tar.zst")
    a, b = await asyncio.gather(env.hydrate(url), env.hydrate(url))
    assert a.snapshot_id == b.snapshot_id
    assert [r.status for r in env.server.gets("v1.tar.zst")] == [200, 304]
    assert (env.count("ok"), env.count("in_place")) == (1, 1)
    assert tree_of(env.project) == tree_of(v1)


def _inodes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.lstat().st_ino
        for p in root.rglob("*")
        if ".sidecar" not in p.parts and not p.is_dir()
    }


@pytest.mark.parametrize("conditional", [True, False], ids=["etag", "no-conditional-support"])
async def test_same_url_path_new_bytes_is_hydrated(
    env: Env, v1: Path, tmp_path: Path, conditional: bool
) -> None:
    """A producer upserts new bytes at the same object path and hands out a fresh signed URL:
    without SNAPSHOT_SHA256 or a snapshot id, the server's answer decides, and the new tree is
    published (also when the server ignores conditional requests)."""
    env.server.faults.ignore_conditional = not conditional
    env.server.add("latest.tar.zst", snapshot_bytes(v1))
    await env.hydrate(env.server.url_for("latest.tar.zst"))
    v2 = make_tree(tmp_path / "v2", seed=2)
    (v2 / "only-in-v2.txt").write_text("new\n")
    env.server.add("latest.tar.zst", snapshot_bytes(v2))
    env.reopen()
    with capture_logs() as logs:
        await env.hydrate(env.server.url_for("latest.tar.zst", expires_in=600))
    assert tree_of(env.project) == tree_of(v2)
    assert [e["outcome"] for e in logs if e["event"] == "snapshot.hydrated"] == ["ok"]
    assert [r.status for r in env.server.gets("latest.tar.zst")] == [200, 200]
    assert verify_tree(env.project, env.state) == []


async def test_same_bytes_without_conditional_support_stop_after_the_manifest(
    env: Env, tmp_path: Path
) -> None:
    """A server that answers 200 to every request: the manifest at the start of the body is the
    one in place, so the download stops there (well under the snapshot's size), the tree is
    verified and left untouched; the same holds for the same bytes at another object path."""
    big = make_tree(tmp_path / "big", files=100, binary_kib=96)  # about 10 MB compressed
    blob = snapshot_bytes(big)
    env.server.faults.ignore_conditional = True
    env.server.add("latest.tar.zst", blob)
    env.server.add("copy.tar.zst", blob)
    await env.hydrate(env.server.url_for("latest.tar.zst"))
    before = _inodes(env.project)
    for path in ("latest.tar.zst", "copy.tar.zst"):
        env.reopen()
        with capture_logs() as logs:
            await env.hydrate(env.server.url_for(path))
        done = [e for e in logs if e["event"] == "snapshot.hydrated"]
        assert [(e["outcome"], e["unchanged_by"]) for e in done] == [("in_place", "same_manifest")]
        assert done[0]["downloaded"] < len(blob) // 4, (done[0]["downloaded"], len(blob))
        assert _inodes(env.project) == before
    assert tree_of(env.project) == tree_of(big)
    # The copy's validators were recorded: with conditional requests back, a restart asks 304.
    env.server.faults.ignore_conditional = False
    env.reopen()
    await env.hydrate(env.server.url_for("copy.tar.zst"))
    assert env.server.gets("copy.tar.zst")[-1].status == 304
