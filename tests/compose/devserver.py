"""A tiny dev server for the compose test: the sidecar's child, serving PROJECT_DIR over HTTP.

Stdlib only. `GET /<path>` answers the file's current bytes (never cached, so what the test reads
is what is on disk now); `GET /__tree` answers {"files": {path: sha256}} for every regular file
(the sidecar's reserved `.sidecar` directory excluded), so the runner compares the whole tree
in one request; `GET /__info` answers this process's pid and start time. Exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RESERVED = ".sidecar"
STARTED_AT = time.time()


def tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under root, by POSIX relative path."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path():
            dirnames[:] = [d for d in dirnames if d != RESERVED]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:  # removed while we walked: it is not there
                continue
            out[(rel_dir / name).as_posix()] = digest
    return out


class Handler(BaseHTTPRequestHandler):
    """Serves files, the tree and the process info."""

    root: Path

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the sidecar's logs are what the test reads."""

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: object) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def do_GET(self) -> None:
        """Answer one GET."""
        path = unquote(urlsplit(self.path).path)
        if path == "/__tree":
            self._json(200, {"files": tree(self.root)})
            return
        if path == "/__info":
            self._json(200, {"pid": os.getpid(), "started_at": STARTED_AT})
            return
        rel = path.lstrip("/")
        parts = rel.split("/")
        if not rel or ".." in parts or parts[0] == RESERVED:
            self._json(404, {"error": "not found"})
            return
        target = self.root / rel
        try:
            data = target.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._json(404, {"error": "not found"})
            return
        self._send(200, data, "application/octet-stream")


def main() -> int:
    """Serve until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("PROJECT_DIR", ".")))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=3000)
    args = p.parse_args()
    Handler.root = args.dir.resolve()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True

    def stop(signum: int, _frame: object) -> None:
        print(f"devserver: signal {signum}, stopping", file=sys.stderr, flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"devserver: pid {os.getpid()} serving {Handler.root} on {args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
