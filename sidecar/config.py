"""Settings read from the environment, validated up front; the only reader of os.environ."""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from sidecar.errors import ConfigError
from sidecar.redact import Secret, register_secret

__all__ = [
    "HttpSettings",
    "Limits",
    "RealtimeSettings",
    "Settings",
    "SnapshotSettings",
    "SyncSettings",
    "jwt_claims",
]

WriteMode = Literal["atomic", "inplace"]
ConflictPolicy = Literal["remote-wins", "local-wins", "merge"]
LogFormat = Literal["json", "console"]

_FORBIDDEN_ENV = ("SUPABASE_SERVICE_ROLE_KEY", "SERVICE_ROLE_KEY", "SUPABASE_SECRET_KEY")
_SB_SECRET = re.compile(r"^sb_secret_")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Quota and limits, enforced on snapshots, deltas and local growth (0 = unlimited)."""

    max_bytes: int = 0
    max_files: int = 0
    max_file_bytes: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotSettings:
    """Where the snapshot comes from and how hard to try."""

    url: Secret | None = None
    sha256: str | None = None
    retries: int = 8
    backoff_initial: float = 0.25
    backoff_max: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    request_wait: float = 60.0  # how long to wait for snapshot:ready after snapshot:request


@dataclass(frozen=True, slots=True)
class RealtimeSettings:
    """How to reach the project's private Realtime channel."""

    url: str | None = None
    apikey: Secret | None = None
    token: Secret | None = None
    token_file: Path | None = None
    topic: str = ""
    heartbeat_window: float = 60.0
    rebuild_backoff_initial: float = 0.5
    rebuild_backoff_max: float = 30.0
    auth_fail_window: float = 120.0  # refusals with no newer token for this long are fatal


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Two-way sync: upstream pushes, conflict policy and watcher patterns."""

    upstream: Literal["none", "rpc"] = "none"
    supabase_url: str | None = None
    conflict: ConflictPolicy = "remote-wins"
    ignore: tuple[str, ...] = (
        "node_modules",
        ".git",
        "dist",
        "build",
        ".next",
        ".cache",
        "__pycache__",
        ".venv",
    )
    local_changes: bool = True
    accept_client_events: bool = False  # apply file:*/bulk:apply/snapshot:ready without meta.id


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The health/metrics listener; None disables it."""

    host: str = "0.0.0.0"
    port: int | None = 8787


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar reads from its environment."""

    project_id: str = "local"
    session_id: str = "local"
    project_dir: Path = Path("/app/project")
    state_dir: Path = Path("/app/project/.sidecar")
    write_mode: WriteMode = "atomic"
    limits: Limits = field(default_factory=Limits)
    snapshot: SnapshotSettings = field(default_factory=SnapshotSettings)
    realtime: RealtimeSettings = field(default_factory=RealtimeSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log_format: LogFormat = "json"
    log_level: str = "info"
    after_hydrate: tuple[str, ...] = ()
    on_change: tuple[
        tuple[str, str], ...
    ] = ()  # (glob, action) where action is "restart" or a command
    restart_child: bool = False
    stop_grace: float = 10.0
    child_user: str | None = None  # SIDECAR_CHILD_USER; unset = "app" when started as root

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, isatty: bool = False) -> Settings:
        """Parse and validate; raise one ConfigError listing every problem."""
        p = _Parser(env)
        _refuse_service_role(env, p.problems)
        project_id = p.text("PROJECT_ID", "local")
        project_dir = Path(p.text("PROJECT_DIR", "/app/project")).absolute()
        state_dir = Path(p.text("SIDECAR_STATE_DIR", str(project_dir / ".sidecar"))).absolute()
        url = p.text("SNAPSHOT_URL", "") or None
        if url is not None and urlsplit(url).scheme not in {"http", "https", "file"}:
            p.problems.append("SNAPSHOT_URL must be an http(s) URL")
        sha = p.text("SNAPSHOT_SHA256", "").lower() or None
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            p.problems.append("SNAPSHOT_SHA256 must be 64 hex digits")
        token = p.text("REALTIME_TOKEN", "") or None
        token_file = p.text("REALTIME_TOKEN_FILE", "") or None
        if token is None and token_file is not None:
            try:
                token = Path(token_file).read_text().strip() or None
            except OSError as exc:
                p.problems.append(f"REALTIME_TOKEN_FILE cannot be read: {exc.strerror}")
        if token is not None:
            claims = jwt_claims(token)
            if claims.get("role") == "service_role":
                p.problems.append(
                    "REALTIME_TOKEN has role service_role; refusing to start "
                    "with a key that can read every project"
                )
        rt_url = p.text("REALTIME_URL", "") or None
        if rt_url is not None and urlsplit(rt_url).scheme not in {"http", "https", "ws", "wss"}:
            p.problems.append("REALTIME_URL must be an http(s):// or ws(s):// URL")
        apikey = p.text("REALTIME_APIKEY", "") or None
        for secret in (url, token, apikey):
            register_secret(secret)
        if url is not None:
            register_secret(urlsplit(url).query)
        http_addr = p.text("SIDECAR_HTTP_ADDR", "0.0.0.0:8787")
        http = HttpSettings(port=None)
        if http_addr not in {"", "off", "none"}:
            host, _, port_s = http_addr.rpartition(":")
            if not port_s.isdigit() or int(port_s) > 65535:
                p.problems.append(f"SIDECAR_HTTP_ADDR must be host:port, got {http_addr!r}")
            else:
                http = HttpSettings(host=host.strip("[]") or "0.0.0.0", port=int(port_s))
        on_change: list[tuple[str, str]] = []
        for rule in filter(None, (r.strip() for r in p.text("SIDECAR_ON_CHANGE", "").split(";"))):
            glob, sep, action = rule.partition("=")
            if not sep or not glob.strip() or not action.strip():
                p.problems.append(f"SIDECAR_ON_CHANGE rule must be GLOB=ACTION, got {rule!r}")
            else:
                on_change.append((glob.strip(), action.strip()))
        ignore_extra = tuple(x for x in p.text("SIDECAR_IGNORE", "").split(",") if x.strip())
        settings = cls(
            project_id=project_id,
            session_id=p.text("SESSION_ID", "local"),
            project_dir=project_dir,
            state_dir=state_dir,
            write_mode=p.choice("SIDECAR_WRITE_MODE", ("atomic", "inplace"), "atomic"),  # type: ignore[arg-type]
            limits=Limits(
                max_bytes=p.size("SIDECAR_MAX_BYTES"),
                max_files=p.integer("SIDECAR_MAX_FILES", 0),
                max_file_bytes=p.size("SIDECAR_MAX_FILE_BYTES"),
            ),
            snapshot=SnapshotSettings(
                url=Secret(url) if url else None,
                sha256=sha,
                retries=p.integer("SIDECAR_SNAPSHOT_RETRIES", 8),
                backoff_initial=p.seconds("SIDECAR_BACKOFF_INITIAL", 0.25),
                backoff_max=p.seconds("SIDECAR_BACKOFF_MAX", 10.0),
                read_timeout=p.seconds("SIDECAR_READ_TIMEOUT", 30.0),
                request_wait=p.seconds("SIDECAR_SNAPSHOT_REQUEST_WAIT", 60.0),
            ),
            realtime=RealtimeSettings(
                url=rt_url,
                apikey=Secret(apikey) if apikey else None,
                token=Secret(token) if token else None,
                token_file=Path(token_file) if token_file else None,
                topic=f"project:{project_id}",
                heartbeat_window=p.seconds("SIDECAR_HEARTBEAT_WINDOW", 60.0),
                rebuild_backoff_initial=p.seconds("SIDECAR_REBUILD_BACKOFF", 0.5),
                auth_fail_window=p.seconds("SIDECAR_AUTH_FAIL_WINDOW", 120.0),
            ),
            sync=SyncSettings(
                upstream=p.choice("SIDECAR_UPSTREAM", ("none", "rpc"), "none"),  # type: ignore[arg-type]
                supabase_url=p.text("SUPABASE_URL", "") or None,
                conflict=p.choice(
                    "SIDECAR_CONFLICT", ("remote-wins", "local-wins", "merge"), "remote-wins"
                ),  # type: ignore[arg-type]
                ignore=SyncSettings().ignore + ignore_extra,
                local_changes=p.flag("SIDECAR_LOCAL_CHANGES", True),
                accept_client_events=p.flag("SIDECAR_ACCEPT_CLIENT_EVENTS", False),
            ),
            http=http,
            log_format=p.choice("LOG_FORMAT", ("json", "console"), "console" if isatty else "json"),  # type: ignore[arg-type]
            log_level=p.choice("LOG_LEVEL", ("debug", "info", "warning", "error"), "info"),
            after_hydrate=tuple(shlex.split(p.text("SIDECAR_AFTER_HYDRATE", ""))),
            on_change=tuple(on_change),
            restart_child=p.flag("SIDECAR_RESTART_CHILD", False),
            stop_grace=p.seconds("SIDECAR_STOP_GRACE", 10.0),
            child_user=p.text("SIDECAR_CHILD_USER", "") or None,
        )
        if settings.sync.upstream == "rpc" and not settings.sync.supabase_url:
            p.problems.append("SIDECAR_UPSTREAM=rpc needs SUPABASE_URL")
        if p.problems:
            raise ConfigError(p.problems)
        return settings


def jwt_claims(token: str) -> dict[str, object]:
    """The unverified claims of a JWT (empty when it is not one); used for policy checks only."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _refuse_service_role(env: Mapping[str, str], problems: list[str]) -> None:
    for name in _FORBIDDEN_ENV:
        if env.get(name):
            problems.append(f"{name} is set; the sidecar never runs with a service-role key")
    for name, value in env.items():
        if _SB_SECRET.match(value or ""):
            problems.append(f"{name} holds an sb_secret_ key; the sidecar never runs with one")
        elif (
            name in {"REALTIME_APIKEY", "SUPABASE_ANON_KEY"}
            and jwt_claims(value).get("role") == "service_role"
        ):
            problems.append(f"{name} is a service_role key; use the anon/publishable key")


class _Parser:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, default).strip()

    def integer(self, name: str, default: int) -> int:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be an integer, got {raw!r}")
            return default
        if value < 0:
            self.problems.append(f"{name} must not be negative")
        return value

    def seconds(self, name: str, default: float) -> float:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw.removesuffix("s"))
        except ValueError:
            self.problems.append(f"{name} must be a number of seconds, got {raw!r}")
            return default
        if value < 0:
            self.problems.append(f"{name} must not be negative")
        return value

    def size(self, name: str) -> int:
        raw = self.env.get(name, "").strip()
        if not raw:
            return 0
        m = _SIZE.match(raw)
        if not m:
            self.problems.append(f"{name} must be a size such as 500MB or 2GiB, got {raw!r}")
            return 0
        unit = (m.group(2) or "").lower().removesuffix("b")
        return int(float(m.group(1)) * _SIZE_UNITS[unit])

    def flag(self, name: str, default: bool) -> bool:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in {"1", "true", "yes", "on"}:
            return True
        if raw in {"0", "false", "no", "off"}:
            return False
        self.problems.append(f"{name} must be true or false, got {raw!r}")
        return default

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw not in allowed:
            self.problems.append(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
            return default
        return raw
