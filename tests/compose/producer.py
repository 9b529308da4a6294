"""The compose test's producer: the orchestrator's part, run once before the sidecar starts.

1. registers the project and writes a sample (text, binary over the inline limit, nested,
   unicode name, empty file) through the gateway's RPCs with the service key, as the editor's
   backend would;
2. runs `sidecar snapshot publish --project ID --json` (reads PostgreSQL, uploads to the Storage
   stand-in, signs a URL) and `sidecar token mint --out` for the two containers' token files
   (0600, owned by the sidecar's uid: REALTIME_TOKEN_FILE) and for the runner's editor token;
3. signs an already expired URL of the same object for the second container (the Storage
   stand-in's admin API), which must ask the database for a snapshot instead;
4. writes SHARED/expected.json (the project, the snapshot's object, the secrets that must never
   show up in logs or /status);
5. prints `SNAPSHOT_URL=…`, `SNAPSHOT_SHA256=…` and `EXPIRED_SNAPSHOT_URL=…` on stdout (the only
   stdout lines): scripts/compose-test hands them to the containers' environment.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SIDECAR_UID = 0  # the sidecar runs as root; its child (app, 10001) must not read the token
GATEWAY = os.environ.get("SUPABASE_URL", "http://gateway:3000")
STORAGE = os.environ.get("SIDECAR_STORAGE_URL", "http://snapshots:8080")
SHARED = Path("/shared")
SIGN_PREFIX = "/storage/v1/object/sign/"


def log(msg: str) -> None:
    """Progress to stderr (stdout carries only the result)."""
    print(f"producer: {msg}", file=sys.stderr, flush=True)


def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """POST a JSON body, return the JSON answer (an HTTP error names the body)."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"producer: POST {url} -> {exc.code}: {exc.read()[:500]!r}") from None
    return json.loads(data) if data else None


def sample() -> dict[str, bytes]:
    """A small project with the shapes that matter."""
    return {
        "README.md": b"# compose demo\n\nServed by the dev server, kept in sync by the sidecar.\n",
        "index.html": b"<!doctype html><title>demo</title><h1>v1</h1>\n",
        "src/app.py": b"print('hello from v1')\n",
        "src/nested/deep/data.json": json.dumps({"n": list(range(50))}).encode(),
        # Over the migration's inline limit (192 KiB): its events carry no body.
        "assets/logo.bin": bytes(range(256)) * 1024 + os.urandom(4096),
        "docs/na\u00efve r\u00e9sum\u00e9.txt": "unicode name \u2713\n".encode(),
        "bin/run.sh": b"#!/bin/sh\necho run\n",
        "empty.txt": b"",
    }


def entry(path: str, data: bytes) -> dict[str, Any]:
    """A bulk entry: text as content, other bytes as content_b64."""
    try:
        return {"file_path": path, "content": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"file_path": path, "content_b64": base64.b64encode(data).decode()}


def sidecar(*args: str) -> str:
    """Run an orchestrator command of the image; its stdout."""
    proc = subprocess.run(
        ["sidecar", *args], capture_output=True, text=True, timeout=120, check=False
    )
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"producer: sidecar {args[0]} {args[1]} exited {proc.returncode}")
    return proc.stdout


def mint(project: str, session: str, out: Path | None = None) -> str:
    """`sidecar token mint`; with out, written there for REALTIME_TOKEN_FILE."""
    args = ["token", "mint", "--project", project, "--session", session, "--ttl", "30m"]
    if out is None:
        return sidecar(*args).strip()
    sidecar(*args, "--out", str(out))
    os.chown(out, SIDECAR_UID, SIDECAR_UID)
    return out.read_text().strip()


def main() -> int:
    """Seed, publish, mint."""
    t0 = time.monotonic()
    project = os.environ["PROJECT_ID"]
    service = {
        "apikey": os.environ["SUPABASE_SERVICE_ROLE_KEY"],
        "Authorization": f"Bearer {os.environ['SUPABASE_SERVICE_ROLE_KEY']}",
    }
    post_json(f"{GATEWAY}/rest/v1/rpc/register_project", {"project_uuid": project}, service)
    files = sample()
    post_json(
        f"{GATEWAY}/rest/v1/rpc/bulk_upsert_project_files",
        {"project_uuid": project, "files": [entry(p, d) for p, d in files.items()]},
        service,
    )
    log(f"project {project} seeded with {len(files)} files ({time.monotonic() - t0:.1f}s)")

    published = json.loads(sidecar("snapshot", "publish", "--project", project, "--json"))
    url = str(published["snapshot_url"])
    log(f"published snapshot {published['snapshot_id']} at seq {published['seq']}")

    SHARED.mkdir(parents=True, exist_ok=True)
    tokens = [
        mint(project, "compose-1", SHARED / "token"),
        mint(project, "compose-2", SHARED / "token-b"),
    ]
    editor = mint(project, "editor")
    (SHARED / "editor_token").write_text(editor)

    bucket, _, key = unquote(urlsplit(url).path.removeprefix(SIGN_PREFIX)).partition("/")
    expired = str(
        post_json(f"{STORAGE}/_admin/sign", {"path": key, "bucket": bucket, "expires_in": -60})[
            "url"
        ]
    )

    expected = {
        "project_id": project,
        "snapshot_id": published["snapshot_id"],
        "snapshot_key": f"{bucket}/{key}",
        "seq": published["seq"],
        "secrets": [
            *tokens,
            editor,
            urlsplit(url).query,
            urlsplit(expired).query,
            os.environ["SUPABASE_SERVICE_ROLE_KEY"],
            os.environ["SUPABASE_JWT_SECRET"],
        ],
    }
    (SHARED / "expected.json").write_text(json.dumps(expected, indent=1))
    log(f"signed URL and tokens ready ({time.monotonic() - t0:.1f}s)")
    print(f"SNAPSHOT_URL={url}", flush=True)
    print(f"SNAPSHOT_SHA256={published['sha256']}", flush=True)
    print(f"EXPIRED_SNAPSHOT_URL={expired}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
