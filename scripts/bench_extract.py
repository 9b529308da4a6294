"""Compare SnapshotWriter with `zstd -d -c | tar -x` on a large synthetic tree (tmpfs).

Usage: .venv/bin/python scripts/bench_extract.py [--files 25000] [--mb 400] [--runs 3]
Builds the tree and snapshot once under /dev/shm/sidecar-bench, then times each extractor on a
fresh destination, best of N runs, with the peak RSS of the process that ran it.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/dev/shm/sidecar-bench")


def make_tree(src: Path, files: int, total_mb: int) -> None:
    """~60% of the bytes in compressible text files, the rest in incompressible binaries."""
    rng = random.Random(42)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
        for _ in range(5000)
    ]
    corpus = b" ".join(
        rng.choice(words) + (b"\n" if rng.random() < 0.1 else b"") for _ in range(600_000)
    )
    n_bin = max(1, files // 25)
    n_text = files - n_bin
    text_bytes = total_mb * 1024 * 1024 * 6 // 10
    bin_bytes = total_mb * 1024 * 1024 - text_bytes
    avg_text = text_bytes // n_text
    for i in range(n_text):
        d = src / f"pkg{i % 300:03d}" / f"mod{i % 7}" / ("lib" if i % 3 else "src")
        d.mkdir(parents=True, exist_ok=True)
        size = min(len(corpus) - 1, int(rng.expovariate(1 / avg_text)))
        start = rng.randrange(0, len(corpus) - size)
        (d / f"file{i}.js").write_bytes(corpus[start : start + size])
    avg_bin = bin_bytes // n_bin
    for i in range(n_bin):
        d = src / "assets" / f"group{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"blob{i}.bin"
        p.write_bytes(rng.randbytes(int(rng.uniform(0.2, 1.8) * avg_bin)))
        if i % 5 == 0:
            p.chmod(0o755)
    (src / "empty-dir").mkdir(exist_ok=True)


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_tar(archive: Path, dest: Path) -> tuple[float, float]:
    """Return (seconds, CPU seconds of zstd + tar)."""
    dest.mkdir(parents=True)
    c0 = _child_cpu()
    t0 = time.perf_counter()
    subprocess.run(f"zstd -q -d -c {archive} | tar -x -C {dest}", shell=True, check=True)
    return time.perf_counter() - t0, _child_cpu() - c0


def run_writer(archive: Path, dest: Path, thread: bool) -> tuple[float, float, float]:
    """Run the writer in a child process; return (seconds, CPU seconds, peak RSS in MiB).

    Seconds are measured inside the child from before the StateStore is opened to after
    publish, so interpreter start-up is excluded; CPU includes it.
    """
    dest.mkdir(parents=True)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from sidecar.config import Limits\n"
        "from sidecar.snapshot.writer import SnapshotWriter, new_staging_dir\n"
        "from sidecar.tree.project import ProjectTree\n"
        "from sidecar.tree.state import StateStore\n"
        "archive, dest = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "t0 = time.perf_counter()\n"
        "state = StateStore(dest / '.sidecar')\n"
        "w = SnapshotWriter(dest, new_staging_dir(dest / '.sidecar'), Limits(), state=state,\n"
        "                   write_thread=sys.argv[3] == '1')\n"
        "with open(archive, 'rb', buffering=0) as f:\n"
        "    while chunk := f.read(256 * 1024):\n"
        "        w.feed(chunk)\n"
        "w.publish(ProjectTree(dest, state))\n"
        "print(time.perf_counter() - t0)\n"
        # VmHWM, not ru_maxrss: the latter also counts this parent's RSS at exec time.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status')\n"
        "           if l.startswith('VmHWM:')) / 1024)\n"
    )
    c0 = _child_cpu()
    args = [sys.executable, "-c", code, str(archive), str(dest), "1" if thread else "0"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), _child_cpu() - c0, float(out[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=25000)
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--level", type=int, default=3)
    args = ap.parse_args()
    from sidecar.snapshot.build import build_snapshot

    src = ROOT / f"src-{args.files}-{args.mb}"
    archive = ROOT / f"snap-{args.files}-{args.mb}-{args.level}.tar.zst"
    if not src.exists():
        print(f"making tree {src} ...")
        make_tree(src, args.files, args.mb)
    if not archive.exists():
        t0 = time.perf_counter()
        build_snapshot(src, archive, project_id="bench", created_at=0, level=args.level)
        print(
            f"built {archive.name}: {archive.stat().st_size / 2**20:.1f} MiB "
            f"in {time.perf_counter() - t0:.1f}s"
        )
    results: dict[str, list[tuple[float, float]]] = {"tar": [], "writer": [], "inline": []}
    rss = []
    for i in range(args.runs):
        d = ROOT / f"dest-{i}"
        shutil.rmtree(d, ignore_errors=True)
        results["tar"].append(run_tar(archive, d))
        shutil.rmtree(d)
        for name, thread in (("writer", True), ("inline", False)):
            secs, cpu, mib = run_writer(archive, d, thread)
            results[name].append((secs, cpu))
            rss.append(mib)
            shutil.rmtree(d)
    best = {k: min(v) for k, v in results.items()}
    labels = {
        "tar": "zstd -d | tar -x",
        "writer": "SnapshotWriter",
        "inline": "  (no write thread)",
    }
    for k, (secs, cpu) in best.items():
        runs = [round(t, 3) for t, _ in results[k]]
        print(f"{labels[k]:<20}: best {secs:.3f}s (cpu {cpu:.3f}s)  runs {runs}")
    print(
        f"ratio writer/tar    : {best['writer'][0] / best['tar'][0]:.2f}   "
        f"writer peak RSS {max(rss):.1f} MiB"
    )


if __name__ == "__main__":
    main()
