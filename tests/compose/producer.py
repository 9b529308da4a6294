"""The compose test's producer: the orchestrator's part, run once before the sidecar starts.

1. writes a sample project (text, binary, nested, unicode name, executable, empty file);
2. builds its snapshot with the real `sidecar snapshot build` into the snapshot server's volume;
3. asks the snapshot server for a signed URL (POST /_admin/sign) and the Realtime server for a
   scoped user JWT (POST /_admin/token);
4. writes the token to SHARED/token (0600, owned by the sidecar's uid: REALTIME_TOKEN_FILE),
   and SHARED/expected.json (the manifest the runner checks against, plus the secrets that must
   never show up in logs or /status);
5. prints `SNAPSHOT_URL=<url>` on stdout (the only stdout line): scripts/compose-test hands it to
   the sidecar's environment, as an orchestrator would.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zstandard

SIDECAR_UID = 0  # the sidecar runs as root; its child (app, 10001) must not read the token


def log(msg: str) -> None:
    """Progress to stderr (stdout carries only the result)."""
    print(f"producer: {msg}", file=sys.stderr, flush=True)


def post_json(url: str, body: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """POST a JSON object, return the JSON answer."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def wait_http(url: str, deadline_s: float) -> None:
    """Wait until url answers anything over HTTP (even an error status)."""
    deadline = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.3)
    raise SystemExit(f"producer: {url} did not answer within {deadline_s:.0f}s ({last})")


def write_sample(root: Path) -> None:
    """A small project with the shapes that matter."""
    files: dict[str, bytes] = {
        "README.md": b"# compose demo\n\nServed by the dev server, kept in sync by the sidecar.\n",
        "index.html": b"<!doctype html><title>demo</title><h1>v1</h1>\n",
        "src/app.py": b"print('hello from v1')\n",
        "src/nested/deep/data.json": json.dumps({"n": list(range(50))}).encode(),
        "assets/logo.bin": bytes(range(256)) * 1024 + os.urandom(4096),
        "docs/na\u00efve r\u00e9sum\u00e9.txt": "unicode name \u2713\n".encode(),
        "bin/run.sh": b"#!/bin/sh\necho run\n",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "bin/run.sh").chmod(0o755)


def read_manifest(snapshot: Path) -> dict[str, Any]:
    """The first member (.snapshot.json) of a .tar.zst snapshot."""
    with (
        snapshot.open("rb") as fh,
        zstandard.ZstdDecompressor().stream_reader(fh) as zr,
        tarfile.open(fileobj=io.BufferedReader(zr), mode="r|") as tar,
    ):
        member = tar.next()
        if member is None or member.name.removeprefix("./") != ".snapshot.json":
            raise SystemExit(f"producer: first member is {member and member.name!r}")
        fobj = tar.extractfile(member)
        assert fobj is not None
        manifest: dict[str, Any] = json.loads(fobj.read())
        return manifest


def main() -> int:
    """Produce the snapshot, the signed URL and the token."""
    p = argparse.ArgumentParser()
    p.add_argument(
        "--snapshots-url", default=os.environ.get("SNAPSHOTS_ADMIN", "http://snapshots:8080")
    )
    p.add_argument(
        "--realtime-url", default=os.environ.get("REALTIME_ADMIN", "http://realtime:4000")
    )
    p.add_argument("--out", type=Path, default=Path("/srv/snapshots"))
    p.add_argument("--shared", type=Path, default=Path("/shared"))
    p.add_argument("--project-id", default=os.environ.get("PROJECT_ID", "compose-demo"))
    p.add_argument("--snapshot-id", default="snap-1")
    args = p.parse_args()

    t0 = time.monotonic()
    wait_http(args.snapshots_url + "/healthz", 120)
    wait_http(args.realtime_url + "/_admin/state", 120)
    log(f"servers up after {time.monotonic() - t0:.1f}s")

    src = Path("/tmp/sample")
    write_sample(src)
    name = f"{args.snapshot_id}.tar.zst"
    tmp_out = args.out / f".{name}.tmp"
    subprocess.run(
        [
            "sidecar",
            "snapshot",
            "build",
            str(src),
            "-o",
            str(tmp_out),
            "--project-id",
            args.project_id,
            "--snapshot-id",
            args.snapshot_id,
            "--seq",
            "0",
        ],
        check=True,
        stdout=sys.stderr,
    )
    tmp_out.chmod(0o644)
    tmp_out.rename(args.out / name)  # the server never sees a half-written snapshot
    manifest = read_manifest(args.out / name)
    log(f"built {name}: {len(manifest['files'])} files, {(args.out / name).stat().st_size} bytes")

    url = str(
        post_json(args.snapshots_url + "/_admin/sign", {"path": name, "expires_in": 3600})["url"]
    )
    token = str(
        post_json(
            args.realtime_url + "/_admin/token",
            {"role": "authenticated", "exp_in": 3600, "claims": {"project_id": args.project_id}},
        )["token"]
    )

    args.shared.mkdir(parents=True, exist_ok=True)
    token_path = args.shared / "token"
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)
    os.chown(token_path, SIDECAR_UID, SIDECAR_UID)

    expected = {
        "project_id": args.project_id,
        "snapshot_id": manifest.get("snapshot_id"),
        "snapshot_name": name,
        "seq": manifest.get("seq"),
        "files": {
            f["path"]: f["sha256"] for f in manifest["files"] if f.get("type", "file") == "file"
        },
        "versions": {f["path"]: int(f.get("version") or 0) for f in manifest["files"]},
        "secrets": [token, urlsplit(url).query],
    }
    (args.shared / "expected.json").write_text(json.dumps(expected, indent=1))
    log(f"signed URL and token ready ({time.monotonic() - t0:.1f}s)")
    print(f"SNAPSHOT_URL={url}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
