"""The compose test's runner: checks, over HTTP only, that the chain serves the database's files.

The database is the truth: every check compares what a container's dev server serves with
`list_current_files` read through the gateway (as the service role). Edits go through the
gateway's RPCs with an editor's token minted by `sidecar token mint`, as an editor's backend
sends them. Run in phases by scripts/compose-test (state between phases in SHARED/model.json):

  initial    the sidecar hydrated from `snapshot publish`'s URL: /readyz, every served file
             matches the database, /status names the published snapshot; then edits (update,
             a binary file over the inline limit, delete, bulk) each seen served, and a path
             leaving the project refused by the database with nothing written.
  offline    the sidecar container is stopped: edits it must catch up on.
  restarted  the container was started again: ready again, the tree converges to the database
             (the event log's replay), the snapshot was not downloaded a second time, and a live
             edit still arrives.
  requested  the second container (its signed URL expired) asked the database for a snapshot:
             the worker answered (its metrics), the container serves the database's files and
             follows a live edit.
  logs       reads both sidecar containers' logs on stdin: JSON lines carrying project_id and
             session_id, no secret (tokens, keys, signed-URL queries), SIGTERM forwarded.
  worker-logs  the worker's logs on stdin: JSON, an answered request, no secret.

Every wait has a deadline; a failure prints what was expected and what was seen, and exits 1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

SIDECAR = os.environ.get("SIDECAR_BASE", "http://sidecar:8787")
DEV = os.environ.get("DEV_BASE", "http://sidecar:3000")
SIDECAR_B = os.environ.get("SIDECAR_B_BASE", "http://sidecar-b:8787")
DEV_B = os.environ.get("DEV_B_BASE", "http://sidecar-b:3000")
GATEWAY = os.environ.get("GATEWAY", "http://gateway:3000")
WORKER = os.environ.get("WORKER", "http://worker:8788")
SNAPSHOTS = os.environ.get("SNAPSHOTS_ADMIN", "http://snapshots:8080")
SHARED = Path(os.environ.get("SHARED_DIR", "/shared"))
READY_DEADLINE = float(os.environ.get("READY_DEADLINE", "120"))
EDIT_DEADLINE = float(os.environ.get("EDIT_DEADLINE", "30"))
T0 = time.monotonic()


class CheckFailed(Exception):
    """A check did not hold."""


def log(msg: str) -> None:
    """One progress line with the time since the phase started."""
    print(f"runner [{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sha(data: bytes) -> str:
    """sha256 hex."""
    return hashlib.sha256(data).hexdigest()


def http(
    method: str,
    url: str,
    body: Any = None,
    timeout: float = 10,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """(status, body) of one request; connection errors raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if data else {}
    req = urllib.request.Request(
        url, data=data, method=method, headers=all_headers | (headers or {})
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> Any:
    """GET url, 200 expected, JSON body."""
    status, body = http("GET", url)
    if status != 200:
        raise CheckFailed(f"GET {url} -> {status}: {body[:300]!r}")
    return json.loads(body)


def wait_until(what: str, probe: Any, deadline_s: float) -> Any:
    """Call probe() until it returns (ok, value) with ok true; CheckFailed with the last value."""
    deadline = time.monotonic() + deadline_s
    last: Any = None
    while True:
        try:
            ok, last = probe()
        except (OSError, CheckFailed, ValueError) as exc:
            ok, last = False, f"{type(exc).__name__}: {exc}"
        if ok:
            return last
        if time.monotonic() >= deadline:
            raise CheckFailed(
                f"timed out after {deadline_s:.0f}s waiting for {what}; "
                f"last seen: {str(last)[:2000]}"
            )
        time.sleep(0.25)


# --- the database, through the gateway ---------------------------------------------------


class Database:
    """The project's files in PostgreSQL; edits as the editor; state kept between phases."""

    def __init__(self) -> None:
        self.expected: dict[str, Any] = json.loads((SHARED / "expected.json").read_text())
        self.project: str = self.expected["project_id"]
        self.editor_token = (SHARED / "editor_token").read_text().strip()
        self.anon = os.environ["REALTIME_APIKEY"]
        self.service = os.environ["SUPABASE_SERVICE_ROLE_KEY"]
        path = SHARED / "model.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        self.snapshot_gets: int | None = data.get("snapshot_gets")

    def save(self) -> None:
        """Persist for the next phase."""
        (SHARED / "model.json").write_text(json.dumps({"snapshot_gets": self.snapshot_gets}))

    def rpc(self, fn: str, token: str, **args: Any) -> tuple[int, Any]:
        """POST /rest/v1/rpc/fn with the anon key and token; (status, JSON answer)."""
        status, body = http(
            "POST",
            f"{GATEWAY}/rest/v1/rpc/{fn}",
            {"project_uuid": self.project, **args},
            headers={"apikey": self.anon, "Authorization": f"Bearer {token}"},
        )
        return status, json.loads(body) if body else None

    def edit(self, fn: str, **args: Any) -> Any:
        """One editor write; 200 expected."""
        status, answer = self.rpc(fn, self.editor_token, **args)
        if status != 200:
            raise CheckFailed(f"{fn} -> {status}: {str(answer)[:300]}")
        return answer

    def files(self) -> dict[str, str]:
        """The live files: path -> sha256 of the bytes (the database's content_hash)."""
        status, rows = self.rpc("list_current_files", self.service)
        if status != 200:
            raise CheckFailed(f"list_current_files -> {status}: {str(rows)[:300]}")
        return {r["file_path"]: r["content_hash"] for r in rows}

    def upsert(self, path: str, data: bytes) -> None:
        """upsert_project_file: text as text, other bytes as base64 with file_type binary."""
        try:
            self.edit("upsert_project_file", p_file_path=path, p_content=data.decode("utf-8"))
        except UnicodeDecodeError:
            content = base64.b64encode(data).decode()
            self.edit(
                "upsert_project_file", p_file_path=path, p_content=content, p_file_type="binary"
            )

    def delete(self, path: str) -> None:
        """delete_project_file."""
        self.edit("delete_project_file", p_file_path=path)

    def bulk(self, changes: list[tuple[str, bytes | None]]) -> None:
        """bulk_upsert_project_files: one transaction, one bulk:apply event."""
        files: list[dict[str, Any]] = []
        for path, data in changes:
            if data is None:
                files.append({"file_path": path, "action": "delete"})
            else:
                files.append({"file_path": path, "content": data.decode("utf-8")})
        self.edit("bulk_upsert_project_files", files=files)


# --- checks ---------------------------------------------------------------------------------


def served_tree(dev: str) -> dict[str, str]:
    """What a dev server (a sidecar's child) sees in PROJECT_DIR."""
    files: dict[str, str] = get_json(f"{dev}/__tree")["files"]
    return files


def diff(want: dict[str, str], got: dict[str, str]) -> str:
    """A short description of how two trees differ."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    return f"missing={missing} extra={extra} different={changed}"


def wait_tree(db: Database, what: str, deadline_s: float = EDIT_DEADLINE, dev: str = DEV) -> None:
    """Wait until the served tree is exactly the database's live files."""

    def probe() -> tuple[bool, str]:
        want, got = db.files(), served_tree(dev)
        return got == want, diff(want, got)

    wait_until(f"the served tree to equal the database ({what})", probe, deadline_s)
    log(f"ok: {what}: served tree equals the database")


def wait_ready(deadline_s: float, base: str = SIDECAR) -> None:
    """Wait until /readyz answers 200."""

    def probe() -> tuple[bool, str]:
        status, body = http("GET", f"{base}/readyz")
        return status == 200, f"{status} {body[:300]!r}"

    wait_until(f"{base}/readyz to answer 200", probe, deadline_s)
    log(f"ok: {base}/readyz 200")


def check_served_bytes(db: Database, dev: str = DEV) -> None:
    """Every file GET through the dev server has the database's bytes."""
    files = db.files()
    for path, digest in sorted(files.items()):
        status, body = http("GET", f"{dev}/{quote(path)}")
        if status != 200 or sha(body) != digest:
            raise CheckFailed(f"GET /{path}: status {status}, sha256 {sha(body)} != {digest}")
    log(f"ok: every file served with the database's bytes ({len(files)} GETs)")


def check_no_secrets(db: Database, where: str, text: str) -> None:
    """No secret (tokens, keys, signed-URL queries) in text."""
    for secret in db.expected["secrets"]:
        if secret and secret in text:
            raise CheckFailed(f"{where} contains a secret ({secret[:8]}...)")


def check_status(db: Database, base: str = SIDECAR) -> dict[str, Any]:
    """/status and /metrics carry no secret; /healthz answers."""
    status, _ = http("GET", f"{base}/healthz")
    if status != 200:
        raise CheckFailed(f"/healthz -> {status}")
    st_code, st_body = http("GET", f"{base}/status")
    m_code, m_body = http("GET", f"{base}/metrics")
    if st_code != 200 or m_code != 200:
        raise CheckFailed(f"/status -> {st_code}, /metrics -> {m_code}")
    text = st_body.decode()
    check_no_secrets(db, "/status", text)
    check_no_secrets(db, "/metrics", m_body.decode())
    log(f"ok: {base} /healthz, /status, /metrics; no secret in either")
    status_json: dict[str, Any] = json.loads(text)
    return status_json


def snapshot_gets(db: Database) -> int:
    """How many times Storage sent the published object (a 304 or a refusal sends nothing)."""
    reqs = get_json(f"{SNAPSHOTS}/_admin/requests")
    key = db.expected["snapshot_key"]
    return sum(
        1 for r in reqs if r["method"] == "GET" and r["key"] == key and r["status"] in (200, 206)
    )


# --- phases ---------------------------------------------------------------------------------


def phase_initial(db: Database) -> None:
    """Hydrated from the published snapshot, then edits through the gateway."""
    wait_ready(READY_DEADLINE)
    wait_tree(db, "hydrated from `snapshot publish`", READY_DEADLINE)
    check_served_bytes(db)
    status = check_status(db)
    if db.expected["snapshot_id"] not in json.dumps(status):
        raise CheckFailed(f"/status does not name {db.expected['snapshot_id']}: {status}")

    db.upsert("README.md", b"# compose demo\n\nedited live (v2)\n")
    wait_tree(db, "upsert of a text file")
    db.upsert("src/new/module.bin", b"\x00\xffbinary\x80 bytes\n" * 16384)
    wait_tree(db, "upsert of a binary file over the inline limit, in a new directory")
    db.delete("empty.txt")
    wait_tree(db, "delete")

    # A path leaving the project: the database refuses it and nothing changes anywhere.
    code, answer = db.rpc(
        "upsert_project_file", db.editor_token, p_file_path="../escape.txt", p_content="nope\n"
    )
    if code < 400:
        raise CheckFailed(f"the database accepted ../escape.txt: {code} {answer}")
    log(f"ok: ../escape.txt refused by the database ({code} {answer.get('code')})")

    db.bulk(
        [
            ("src/app.py", b"print('hello from bulk')\n"),
            ("docs/bulk.txt", b"added by bulk\n"),
            ("assets/logo.bin", None),
        ]
    )
    wait_tree(db, "bulk (update, create, delete)")

    wait_ready(10)
    check_served_bytes(db)
    status = check_status(db)
    log(f"status after the edits: {json.dumps(status)[:400]}")
    db.snapshot_gets = snapshot_gets(db)
    log(f"snapshot GETs so far: {db.snapshot_gets}")
    if db.snapshot_gets < 1:
        raise CheckFailed("Storage never served the published snapshot")


def phase_offline(db: Database) -> None:
    """Edits while the sidecar is down: in the event log, caught up on the next start."""
    status = None
    try:
        status, _ = http("GET", f"{SIDECAR}/healthz", timeout=2)
    except OSError:
        pass
    if status is not None:
        raise CheckFailed(f"the sidecar answers /healthz ({status}) but should be stopped")
    db.upsert("index.html", b"<!doctype html><title>demo</title><h1>offline v2</h1>\n")
    db.upsert("docs/offline.txt", b"written while the sidecar was down\n")
    db.delete("bin/run.sh")
    log("sent 3 edits while the sidecar is down")


def phase_restarted(db: Database) -> None:
    """Back up: converges to the database without a second download, and stays live."""
    wait_ready(READY_DEADLINE)
    wait_tree(db, "restart: offline edits caught up", READY_DEADLINE)
    check_served_bytes(db)
    check_status(db)
    gets = snapshot_gets(db)
    if db.snapshot_gets is not None and gets != db.snapshot_gets:
        raise CheckFailed(
            f"the snapshot was downloaded again on restart "
            f"({db.snapshot_gets} GETs before, {gets} after)"
        )
    log(f"ok: no snapshot download on restart ({gets} GETs in all)")
    db.upsert("README.md", b"# compose demo\n\nedited after the restart\n")
    wait_tree(db, "live edit after the restart")


def worker_answered() -> float:
    """sidecar_worker_requests_answered from the worker's /metrics."""
    status, body = http("GET", f"{WORKER}/metrics")
    if status != 200:
        raise CheckFailed(f"worker /metrics -> {status}")
    for line in body.decode().splitlines():
        if line.startswith("sidecar_worker_requests_answered"):
            return float(line.split()[-1])
    return 0.0


def phase_requested(db: Database) -> None:
    """The second container's URL had expired: the worker answered its request."""
    wait_ready(READY_DEADLINE, SIDECAR_B)
    wait_tree(db, "second container, hydrated from the worker's snapshot", 30, DEV_B)
    check_served_bytes(db, DEV_B)
    check_status(db, SIDECAR_B)
    refused = [
        r
        for r in get_json(f"{SNAPSHOTS}/_admin/requests")
        if r["key"] == db.expected["snapshot_key"] and r["status"] >= 400
    ]
    if not refused:
        raise CheckFailed("Storage never refused the second container's expired URL")
    log(f"ok: Storage refused the expired URL ({refused[0]['status']})")
    answered = worker_answered()
    if answered < 1:
        raise CheckFailed("the worker answered no snapshot request")
    log(f"ok: the worker answered {answered:.0f} snapshot request(s)")
    db.upsert("docs/both.txt", b"seen by both containers\n")
    wait_tree(db, "live edit, first container")
    wait_tree(db, "live edit, second container", dev=DEV_B)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The structured log lines (objects with an event) of a container's output."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "event" in entry:
            out.append(entry)
    return out


def phase_logs(db: Database) -> None:
    """The sidecar's logs (stdin): structured, carry project_id, never a secret."""
    text = sys.stdin.read()
    check_no_secrets(db, "the sidecar's logs", text)
    entries = json_lines(text)
    if not entries:
        raise CheckFailed(f"no JSON log lines in the sidecar's logs ({len(text)} chars)")
    for entry in entries:
        if entry.get("project_id") != db.project or not entry.get("session_id"):
            raise CheckFailed(f"log line without project_id/session_id: {json.dumps(entry)[:300]}")
    log(f"ok: {len(entries)} JSON log lines, all with project_id and session_id, no secret")
    # compose-test stopped the container once: SIGTERM reached the sidecar (PID 1), which
    # forwarded it to the dev server, which said so before exiting.
    if "devserver: signal 15" not in text:
        raise CheckFailed("the dev server never got SIGTERM: the stop signal was not forwarded")
    log("ok: SIGTERM was forwarded to the dev server on stop")


def phase_worker_logs(db: Database) -> None:
    """The worker's logs (stdin): structured, an answer for this project, never a secret."""
    text = sys.stdin.read()
    check_no_secrets(db, "the worker's logs", text)
    entries = json_lines(text)
    answers = [
        e for e in entries if e["event"] == "worker.answered" and e.get("project_id") == db.project
    ]
    if not answers:
        raise CheckFailed(f"no worker.answered line for the project in {len(entries)} lines")
    log(f"ok: worker logs: {len(entries)} JSON lines, {len(answers)} answer(s), no secret")


PHASES = {
    "initial": phase_initial,
    "offline": phase_offline,
    "restarted": phase_restarted,
    "requested": phase_requested,
    "logs": phase_logs,
    "worker-logs": phase_worker_logs,
}


def main() -> int:
    """Run the phase named on the command line."""
    if len(sys.argv) != 2 or sys.argv[1] not in PHASES:
        print(f"usage: runner.py {{{'|'.join(PHASES)}}}", file=sys.stderr)
        return 2
    name = sys.argv[1]
    db = Database()
    log(f"phase {name}")
    try:
        PHASES[name](db)
    except CheckFailed as exc:
        log(f"FAILED in phase {name}: {exc}")
        return 1
    finally:
        db.save()
    log(f"phase {name} passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
