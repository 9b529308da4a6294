"""The compose test's runner: checks, over HTTP only, that the sidecar container serves the project.

Run in phases by scripts/compose-test (state between phases lives in SHARED/model.json):

  initial    the sidecar hydrated: /readyz, every served file matches the snapshot, /status names
             the snapshot; then live edits through the Realtime admin API (update, create with
             binary bytes, delete, a stale version, an unsafe path, a bulk) each seen served.
  offline    the sidecar container is stopped: send edits it must catch up on (stored for replay).
  restarted  the container was started again: ready again, the tree converges to every edit
             (replayed), the snapshot was not downloaded a second time, and a live edit still
             arrives.
  logs       reads the sidecar container's logs on stdin: JSON lines carrying project_id, and no
             secret (token, signed URL query) anywhere.

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
REALTIME = os.environ.get("REALTIME_ADMIN", "http://realtime:4000")
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


def http(method: str, url: str, body: Any = None, timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of one request; connection errors raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
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


# --- the model: what the project should look like -------------------------------------------


class Model:
    """Expected files (path -> bytes sha256), per-path versions, next seq; persisted in SHARED."""

    def __init__(self) -> None:
        path = SHARED / "model.json"
        expected = json.loads((SHARED / "expected.json").read_text())
        self.expected = expected
        if path.exists():
            data = json.loads(path.read_text())
        else:
            data = {
                "files": expected["files"],
                "versions": expected["versions"],
                "seq": int(expected.get("seq") or 0),
                "snapshot_gets": None,
            }
        self.files: dict[str, str] = data["files"]
        self.versions: dict[str, int] = data["versions"]
        self.seq: int = data["seq"]
        self.snapshot_gets: int | None = data["snapshot_gets"]
        self.topic = f"project:{expected['project_id']}"

    def save(self) -> None:
        """Persist for the next phase."""
        data = {
            "files": self.files,
            "versions": self.versions,
            "seq": self.seq,
            "snapshot_gets": self.snapshot_gets,
        }
        (SHARED / "model.json").write_text(json.dumps(data, indent=1))

    def next_version(self, path: str) -> int:
        """One more than any version known for path."""
        return self.versions.get(path, 0) + 1

    # -- sending events (each event takes the next seq: the producer's seq is gap-free) --

    def send(self, event: str, payload: dict[str, Any], *, with_seq: bool = True) -> None:
        """Broadcast one event on the project's private channel, as realtime.send would."""
        payload = {**payload, "timestamp": int(time.time() * 1000)}
        if with_seq:
            self.seq += 1
            payload["seq"] = self.seq
        status, body = http(
            "POST",
            f"{REALTIME}/_admin/send",
            {"topic": self.topic, "event": event, "payload": payload, "private": True},
        )
        if status != 200 or json.loads(body).get("id") is None:
            raise CheckFailed(f"realtime send {event} -> {status}: {body[:300]!r}")

    @staticmethod
    def change(path: str, data: bytes | None, version: int) -> dict[str, Any]:
        """A change entry: update (text as content, other bytes as content_b64) or delete."""
        if data is None:
            return {"action": "delete", "file_path": path, "version": version}
        entry: dict[str, Any] = {
            "action": "update",
            "file_path": path,
            "version": version,
            "content_hash": sha(data),
        }
        try:
            entry["content"] = data.decode("utf-8")
        except UnicodeDecodeError:
            entry["content_b64"] = base64.b64encode(data).decode()
        return entry

    def update(
        self,
        path: str,
        data: bytes,
        *,
        version: int | None = None,
        expect_applied: bool = True,
        with_seq: bool = True,
    ) -> None:
        """Send file:update; the model follows when the sidecar must apply it."""
        v = self.next_version(path) if version is None else version
        entry = self.change(path, data, v)
        entry.pop("action")
        self.send("file:update", entry, with_seq=with_seq)
        if expect_applied:
            self.files[path] = sha(data)
            self.versions[path] = v

    def delete(self, path: str) -> None:
        """Send file:delete."""
        v = self.next_version(path)
        self.send("file:delete", {"file_path": path, "version": v})
        self.files.pop(path, None)
        self.versions[path] = v

    def bulk(self, changes: list[tuple[str, bytes | None]]) -> None:
        """Send one bulk:apply (applied as one unit)."""
        entries = []
        for path, data in changes:
            v = self.next_version(path)
            entries.append(self.change(path, data, v))
            self.versions[path] = v
            if data is None:
                self.files.pop(path, None)
            else:
                self.files[path] = sha(data)
        self.send("bulk:apply", {"files": entries})


# --- checks ---------------------------------------------------------------------------------


def served_tree() -> dict[str, str]:
    """What the dev server (the sidecar's child) sees in PROJECT_DIR."""
    files: dict[str, str] = get_json(f"{DEV}/__tree")["files"]
    return files


def diff(want: dict[str, str], got: dict[str, str]) -> str:
    """A short description of how two trees differ."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    return f"missing={missing} extra={extra} different={changed}"


def wait_tree(model: Model, what: str, deadline_s: float = EDIT_DEADLINE) -> None:
    """Wait until the served tree is exactly the model."""

    def probe() -> tuple[bool, str]:
        got = served_tree()
        return got == model.files, diff(model.files, got)

    wait_until(f"the served tree to match ({what})", probe, deadline_s)
    log(f"ok: {what}: served tree matches ({len(model.files)} files)")


def wait_ready(deadline_s: float) -> None:
    """Wait until /readyz answers 200."""

    def probe() -> tuple[bool, str]:
        status, body = http("GET", f"{SIDECAR}/readyz")
        return status == 200, f"{status} {body[:300]!r}"

    wait_until("/readyz to answer 200", probe, deadline_s)
    log("ok: /readyz 200")


def check_served_bytes(model: Model) -> None:
    """Every file GET through the dev server has the bytes the model says."""
    for path, digest in sorted(model.files.items()):
        status, body = http("GET", f"{DEV}/{quote(path)}")
        if status != 200 or sha(body) != digest:
            raise CheckFailed(f"GET /{path}: status {status}, sha256 {sha(body)} != {digest}")
    log(f"ok: every file served with the snapshot's bytes ({len(model.files)} GETs)")


def check_no_secrets(model: Model, where: str, text: str) -> None:
    """No secret (token, signed-URL query) in text."""
    for secret in model.expected["secrets"]:
        if secret and secret in text:
            raise CheckFailed(f"{where} contains a secret ({secret[:8]}...)")


def check_status(model: Model) -> dict[str, Any]:
    """/status names the snapshot; /status and /metrics carry no secret; /healthz answers."""
    status, _ = http("GET", f"{SIDECAR}/healthz")
    if status != 200:
        raise CheckFailed(f"/healthz -> {status}")
    st_code, st_body = http("GET", f"{SIDECAR}/status")
    m_code, m_body = http("GET", f"{SIDECAR}/metrics")
    if st_code != 200 or m_code != 200:
        raise CheckFailed(f"/status -> {st_code}, /metrics -> {m_code}")
    text = st_body.decode()
    check_no_secrets(model, "/status", text)
    check_no_secrets(model, "/metrics", m_body.decode())
    snap_id = model.expected["snapshot_id"]
    if snap_id and snap_id not in text:
        raise CheckFailed(f"/status does not name snapshot {snap_id}: {text[:500]}")
    log("ok: /healthz, /status (names the snapshot), /metrics; no secret in either")
    status_json: dict[str, Any] = json.loads(text)
    return status_json


def snapshot_gets(model: Model) -> int:
    """How many times the snapshot server sent the snapshot object (GETs not answered 304)."""
    reqs = get_json(f"{SNAPSHOTS}/_admin/requests")
    name = model.expected["snapshot_name"]
    # A 304 (the conditional request of a restart) sends no snapshot bytes: not a download.
    return sum(
        1
        for r in reqs
        if r["method"] == "GET" and r["key"].endswith("/" + name) and r["status"] != 304
    )


def barrier(model: Model, what: str) -> None:
    """A valid edit after events that must change nothing: once it shows, they were handled."""
    model.update("barrier.txt", f"barrier after {what} at {time.time()}\n".encode())
    wait_tree(model, f"barrier after {what}")


# --- phases ---------------------------------------------------------------------------------


def phase_initial(model: Model) -> None:
    """Hydrated from the snapshot, then live edits."""
    wait_ready(READY_DEADLINE)
    wait_tree(model, "hydrated from the snapshot", READY_DEADLINE)
    check_served_bytes(model)
    check_status(model)

    model.update("README.md", b"# compose demo\n\nedited live (v2)\n")
    wait_tree(model, "file:update of a text file")
    model.update("src/new/module.bin", b"\x00\xffbinary\x80 bytes\n" * 64)
    wait_tree(model, "file:update creating a binary file in a new directory")
    model.delete("empty.txt")
    wait_tree(model, "file:delete")

    # Stale: a version not above what the sidecar knows changes nothing (delta rule 1, sidecar/live/__init__.py).
    stale_v = model.versions["README.md"]
    model.update("README.md", b"stale bytes\n", version=stale_v, expect_applied=False)
    # Unsafe: a path leaving PROJECT_DIR is rejected, the sidecar keeps running. It carries the
    # next seq like every producer event: being rejected must not look like a gap in the seq.
    model.update(
        "../escape.txt",
        b"nope\n",
        version=1,
        expect_applied=False,
        with_seq=os.environ.get("UNSAFE_EVENT_SEQ", "1") == "1",
    )
    barrier(model, "a stale update and an unsafe path")

    model.bulk(
        [
            ("src/app.py", b"print('hello from bulk')\n"),
            ("docs/bulk.txt", b"added by bulk\n"),
            ("assets/logo.bin", None),
        ]
    )
    wait_tree(model, "bulk:apply (update, create, delete)")

    wait_ready(10)
    check_served_bytes(model)
    status = check_status(model)
    log(f"status after live edits: {json.dumps(status)[:400]}")
    model.snapshot_gets = snapshot_gets(model)
    log(f"snapshot GETs so far: {model.snapshot_gets}")


def phase_offline(model: Model) -> None:
    """Edits while the sidecar is down: stored by Realtime, replayed on the next join."""
    status = None
    try:
        status, _ = http("GET", f"{SIDECAR}/healthz", timeout=2)
    except OSError:
        pass
    if status is not None:
        raise CheckFailed(f"the sidecar answers /healthz ({status}) but should be stopped")
    model.update("index.html", b"<!doctype html><title>demo</title><h1>offline v2</h1>\n")
    model.update("docs/offline.txt", b"written while the sidecar was down\n")
    model.delete("bin/run.sh")
    log(f"sent 3 edits while the sidecar is down (seq now {model.seq})")


def phase_restarted(model: Model) -> None:
    """Back up: converges to every edit without a second download, and stays live."""
    wait_ready(READY_DEADLINE)
    wait_tree(model, "restart: offline edits replayed", READY_DEADLINE)
    check_served_bytes(model)
    check_status(model)
    gets = snapshot_gets(model)
    if model.snapshot_gets is not None and gets != model.snapshot_gets:
        raise CheckFailed(
            f"the snapshot was downloaded again on restart "
            f"({model.snapshot_gets} GETs before, {gets} after)"
        )
    log(f"ok: no snapshot download on restart ({gets} GETs in all)")
    model.update("README.md", b"# compose demo\n\nedited after the restart\n")
    wait_tree(model, "live edit after the restart")


def phase_logs(model: Model) -> None:
    """The sidecar's logs (stdin): structured, carry project_id, never a secret."""
    text = sys.stdin.read()
    check_no_secrets(model, "the sidecar's logs", text)
    json_lines = 0
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "event" not in entry:
            continue
        json_lines += 1
        if entry.get("project_id") != model.expected["project_id"] or not entry.get("session_id"):
            raise CheckFailed(f"log line without project_id/session_id: {line[:300]}")
    if json_lines == 0:
        raise CheckFailed(f"no JSON log lines in the sidecar's logs ({len(text)} chars)")
    log(f"ok: {json_lines} JSON log lines, all with project_id and session_id, no secret")
    # compose-test stopped the container once: SIGTERM reached the sidecar (PID 1), which
    # forwarded it to the dev server, which said so before exiting.
    if "devserver: signal 15" not in text:
        raise CheckFailed("the dev server never got SIGTERM: the stop signal was not forwarded")
    log("ok: SIGTERM was forwarded to the dev server on stop")


PHASES = {
    "initial": phase_initial,
    "offline": phase_offline,
    "restarted": phase_restarted,
    "logs": phase_logs,
}


def main() -> int:
    """Run the phase named on the command line."""
    if len(sys.argv) != 2 or sys.argv[1] not in PHASES:
        print(f"usage: runner.py {{{'|'.join(PHASES)}}}", file=sys.stderr)
        return 2
    name = sys.argv[1]
    model = Model()
    log(f"phase {name}")
    try:
        PHASES[name](model)
    except CheckFailed as exc:
        log(f"FAILED in phase {name}: {exc}")
        return 1
    finally:
        model.save()
    log(f"phase {name} passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
