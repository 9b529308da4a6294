"""End to end on a real PostgreSQL, SIGKILL at any moment: during hydration over an older tree
(some kills while it publishes; the snapshots made by the real publish path), during a
content_url download and during the fetch of a body too large for its event (get_project_file
through the gateway). PROJECT_DIR is watched the whole time: it never shows a partial file or a
temp file; after a plain restart it equals the new snapshot (or the database) exactly, with no
temp file and no empty directory of the old tree left."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
from pathlib import Path
from typing import Self

import pytest

from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import Stack, base_env, read_tree, run_sidecar, running_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.slow]

TMP_MARKER = ".sidecar-tmp-"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Watch:
    """Polls PROJECT_DIR (state dir excluded) and records every file that is not a complete
    version the database ever had, and every temp file."""

    def __init__(self, project: Path, allowed: dict[str, set[str]]) -> None:
        self.project = project
        self.allowed = allowed
        self.violations: list[str] = []
        self.polls = 0

    def check(self) -> None:
        self.polls += 1
        for dirpath, dirnames, filenames in os.walk(self.project):
            if Path(dirpath) == self.project:
                dirnames[:] = [d for d in dirnames if d != ".sidecar"]
            for name in filenames:
                path = Path(dirpath, name)
                rel = path.relative_to(self.project).as_posix()
                if TMP_MARKER in name:
                    self.violations.append(f"temp file visible: {rel}")
                    continue
                try:
                    data = path.read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    continue
                if _sha(data) not in self.allowed.get(rel, set()):
                    self.violations.append(f"partial or unknown content: {rel} ({len(data)} B)")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.check)
            await asyncio.sleep(0.002)

    async def __aenter__(self) -> Self:
        """Poll from now until the block ends (its last poll done)."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await self._task


def _dirs(files: dict[str, bytes]) -> set[str]:
    out: set[str] = set()
    for rel in files:
        parent = rel.rpartition("/")[0]
        while parent:
            out.add(parent)
            parent = parent.rpartition("/")[0]
    return out


def _count_new(project: Path, want: dict[str, bytes]) -> int:
    """How many files of `want` are in place with their new bytes (a publish in progress)."""
    n = 0
    for rel in sorted(want)[::5]:  # a sample: cheap enough to poll every millisecond
        data = want[rel]
        try:
            if (project / rel).read_bytes() == data:
                n += 1
        except OSError:
            continue
    return n


def _tree_dirs(project: Path) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, _ in os.walk(project):
        if Path(dirpath) == project:
            dirnames[:] = [d for d in dirnames if d != ".sidecar"]
        for d in dirnames:
            out.add(Path(dirpath, d).relative_to(project).as_posix())
    return out


async def test_sigkill_during_hydration_over_an_older_tree(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    rng = random.Random(1234)
    old = {f"old/d{i % 7}/f{i:03d}.bin": rng.randbytes(rng.randint(1, 6000)) for i in range(150)}
    old.update({f"keep/k{i:02d}.txt": f"keep {i}\n".encode() for i in range(20)})
    async with Stack(pg_cluster, old) as stack:
        project = tmp_path / "project"
        code, out, err = await run_sidecar(["hydrate"], base_env(stack, project), tmp_path)
        assert code == 0, out + err
        assert read_tree(project) == old
        allowed: dict[str, set[str]] = {p: {_sha(d)} for p, d in old.items()}
        # The new snapshot: the old/ tree is gone (its directories too), keep/ half changed,
        # 600 new files in new directories.
        new_files = {
            f"new/n{i % 13}/g{i:03d}.bin": rng.randbytes(rng.randint(500, 8000)) for i in range(600)
        }
        new_files.update({f"keep/k{i:02d}.txt": f"changed {i}\n".encode() for i in range(10)})
        await stack.editor_bulk(dict.fromkeys(p for p in old if p.startswith("old/")))
        await stack.editor_bulk(new_files)
        want = await stack.files()
        for p, d in want.items():
            allowed.setdefault(p, set()).add(_sha(d))
        url, sha = await stack.publish()
        env = base_env(stack, project, snapshot=(url, sha))
        argv = [sys.executable, "-m", "sidecar", "hydrate"]

        kills = during_publish = completed = 0
        async with Watch(project, allowed) as watch:
            stack.snaps.faults.trickle = 2_000_000
            for i in range(40):
                if kills >= 16:
                    break
                before = _count_new(project, want)
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=tmp_path,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                if i % 2:
                    # Kill the moment this run's publish moves a file of the new tree.
                    async with asyncio.timeout(30):
                        while proc.returncode is None and _count_new(project, want) <= before:
                            await asyncio.sleep(0.001)
                    during_publish += proc.returncode is None
                else:
                    await asyncio.sleep(rng.uniform(0.05, 1.2))  # before publish, mostly
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                if await proc.wait() == 0:
                    # It finished (a kill came too late): move the database on, so that the
                    # next runs hydrate over an older tree again.
                    completed += 1
                    rev = {p: rng.randbytes(300) for p in rng.sample(sorted(want), 50)}
                    gone = [p for p in want if p.startswith(f"new/n{completed % 13}/")]
                    await stack.editor_bulk({**rev, **dict.fromkeys(gone)})
                    want = await stack.files()
                    for p, d in want.items():
                        allowed.setdefault(p, set()).add(_sha(d))
                    env = base_env(stack, project, snapshot=await stack.publish())
                watch.check()
        stack.snaps.faults.trickle = None
        assert kills >= 15, (kills, completed)
        assert during_publish >= 3, (during_publish, completed)
        assert watch.violations == [], watch.violations[:10]

        code, out, err = await run_sidecar(["hydrate"], env, tmp_path)
        assert code == 0, out + err
        assert read_tree(project) == want
        assert _tree_dirs(project) == _dirs(want)
        leftovers = [
            str(p)
            for p in project.rglob("*")
            if TMP_MARKER in p.name or p.name.startswith("staging-")
        ]
        assert leftovers == []


async def test_sigkill_during_a_content_url_download(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """The partial download lives in the state directory, never in PROJECT_DIR; a restart
    sweeps it and converges. The event is the contract's `content_url` form (a producer that
    keeps large bodies in Storage), written by the database with realtime.send; the migration
    itself sends body-less events instead (the next test). project_files does not have the
    file, so the tree converges on the database's files plus that event's."""
    async with Stack(pg_cluster) as stack:
        big = os.urandom(3 * 1024 * 1024)
        stack.snaps.add("blobs/big.bin", big)
        event = {
            "file_path": "assets/big.bin",
            "content_url": stack.snaps.url_for("blobs/big.bin"),
            "content_hash": _sha(big),
            "size": len(big),
            "version": 1,
        }
        allowed = {p: {_sha(d)} for p, d in (await stack.files()).items()}
        allowed["assets/big.bin"] = {_sha(big)}
        stage = tmp_path / "sidecar-project" / ".sidecar" / "tmp"
        async with running_sidecar(stack, tmp_path) as sc:
            async with Watch(sc.project_dir, allowed) as watch:
                stack.snaps.faults.trickle = 1024 * 1024
                await stack.send_db("file:update", event)

                def partial() -> bool:
                    return any(p.stat().st_size > 1024 * 1024 for p in stage.glob("*"))

                await sc.wait(partial, "download half way, in the state directory", 20)
                sc.send_signal(signal.SIGKILL)
                await sc.wait_exit()
            assert watch.violations == [], watch.violations[:10]
            assert not (sc.project_dir / "assets" / "big.bin").exists()
            assert list(stage.glob("*")), "the partial download was in the state directory"
        stack.snaps.faults.trickle = None
        async with running_sidecar(stack, tmp_path) as sc2:

            async def want() -> dict[str, bytes]:
                return {**await stack.files(), "assets/big.bin": big}

            await sc2.wait_tree(want, timeout=30)
            assert list(stage.glob("*")) == []
            assert [p for p in sc2.project_dir.rglob("*") if TMP_MARKER in p.name] == []


async def test_sigkill_during_a_large_body_fetch(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A body too large for its event (the migration sends size, no content) is fetched with
    get_project_file through the gateway, slowly: SIGKILL half way leaves nothing of it on disk,
    neither in PROJECT_DIR nor in the state directory (the bytes are checked in memory before
    they are staged), and a restart fetches it again and converges on the database."""
    async with Stack(pg_cluster) as stack:
        big = os.urandom(3 * 1024 * 1024)
        allowed = {p: {_sha(d)} for p, d in (await stack.files()).items()}
        allowed["assets/big.bin"] = {_sha(big)}
        stage = tmp_path / "sidecar-project" / ".sidecar" / "tmp"
        env = {"SUPABASE_URL": stack.rpc.url}
        async with running_sidecar(stack, tmp_path, env_overrides=env) as sc:
            async with Watch(sc.project_dir, allowed) as watch:
                stack.rpc.faults.content_trickle = 1024 * 1024
                await stack.editor_upsert("assets/big.bin", big)
                await sc.wait(
                    lambda: stack.rpc.trickled > 1024 * 1024, "the body fetch half way", 20
                )
                sc.send_signal(signal.SIGKILL)
                await sc.wait_exit()
            assert watch.violations == [], watch.violations[:10]
            assert not (sc.project_dir / "assets" / "big.bin").exists()
            assert list(stage.glob("*")) == []
        stack.rpc.faults.content_trickle = None
        async with running_sidecar(stack, tmp_path, env_overrides=env) as sc2:
            await sc2.wait_tree(stack.files, timeout=30)
            assert [p for p in sc2.project_dir.rglob("*") if TMP_MARKER in p.name] == []
            assert await sc2.metric("sidecar_resyncs_total") == 0  # fetched, not re-snapshotted
