"""Settings read from the environment, validated up front; the only reader of os.environ.

Every variable is one row of `VARIABLES`: its name, where its value goes (a field of `Settings`
or of one of its slices, `section.field`), how its text is parsed, and one line of help. A
variable that is unset (or empty) keeps the dataclass field's default, so each default is
written once, on its field. Adding a variable is a field plus a row (and a README line: a test
checks that the README's configuration table names every row).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from sidecar.errors import ConfigError
from sidecar.redact import Secret, register_secret

__all__ = [
    "VARIABLES",
    "HttpSettings",
    "Limits",
    "ProcessSettings",
    "RealtimeSettings",
    "Settings",
    "SnapshotSettings",
    "TwoWaySettings",
    "Var",
    "jwt_claims",
]

WriteMode = Literal["atomic", "inplace"]
ConflictPolicy = Literal["remote-wins", "local-wins", "merge"]
LogFormat = Literal["json", "console"]
_N = TypeVar("_N", int, float)

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
    ping_interval: float = 25.0  # Phoenix's heartbeat: one liveness ping of ours per interval
    rebuild_backoff_initial: float = 0.5
    rebuild_backoff_max: float = 30.0
    auth_fail_window: float = 120.0  # refusals with no newer token for this long are fatal

    def check_channel(self) -> None:
        """Raise ConfigError unless the channel can be subscribed to (the token aside)."""
        if not self.url:
            raise ConfigError("REALTIME_URL is required to subscribe")
        if not self.apikey:
            raise ConfigError("REALTIME_APIKEY (the anon/publishable key) is required")


@dataclass(frozen=True, slots=True)
class TwoWaySettings:
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
class ProcessSettings:
    """The child and the hook commands."""

    after_hydrate: tuple[str, ...] = ()
    on_change: tuple[tuple[str, str], ...] = ()  # (glob, action): "restart" or a command
    restart_child: bool = False
    stop_grace: float = 10.0
    child_user: str | None = None  # unset = "app" when started as root


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar reads from its environment."""

    project_id: str = "local"
    session_id: str = "local"
    project_dir: Path = Path("/app/project")
    state_dir: Path = Path("/app/project/.sidecar")  # from_env: PROJECT_DIR/.sidecar
    write_mode: WriteMode = "atomic"
    limits: Limits = field(default_factory=Limits)
    snapshot: SnapshotSettings = field(default_factory=SnapshotSettings)
    realtime: RealtimeSettings = field(default_factory=RealtimeSettings)
    twoway: TwoWaySettings = field(default_factory=TwoWaySettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    process: ProcessSettings = field(default_factory=ProcessSettings)
    log_format: LogFormat = "json"  # from_env: console when stdout is a TTY
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, isatty: bool = False) -> Settings:
        """Parse and validate; raise one ConfigError listing every problem."""
        problems: list[str] = []
        _refuse_service_role(env, problems)
        values: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
        for var in VARIABLES:
            raw = env.get(var.name)
            if raw is None or (not raw.strip() and not var.parse_empty):
                continue  # the field's default
            try:
                value = var.parse(raw.strip())
            except ValueError as exc:
                problems.append(f"{var.name} {exc}")
                continue
            section, _, name = var.field.rpartition(".")
            values[section][name] = value
        top, realtime = values[""], values["realtime"]
        # Defaults that depend on another value or on the terminal.
        project_dir = top.setdefault("project_dir", _default("", "project_dir"))
        top.setdefault("state_dir", project_dir / ".sidecar")
        top.setdefault("log_format", "console" if isatty else "json")
        realtime["topic"] = f"project:{top.get('project_id', _default('', 'project_id'))}"
        _read_token(realtime, problems)
        twoway = values["twoway"]
        if twoway.get("upstream") == "rpc" and not twoway.get("supabase_url"):
            problems.append("SIDECAR_UPSTREAM=rpc needs SUPABASE_URL")
        if problems:
            raise ConfigError(problems)
        # A slice given whole (SIDECAR_HTTP_ADDR -> http) is not built from its fields.
        slices = {s: _SECTIONS[s](**v) for s, v in values.items() if s and s not in top}
        return cls(**top, **slices)


# -- parsers: text -> value, or ValueError with the rest of the one-line reason --


def _text(raw: str) -> str:
    return raw


def _absolute(raw: str) -> Path:
    return Path(raw).absolute()


def _path(raw: str) -> Path:
    return Path(raw)


def _non_negative(number: Callable[[str], _N], what: str) -> Callable[[str], _N]:
    def parse(raw: str) -> _N:
        try:
            value = number(raw)
        except ValueError:
            raise ValueError(f"must be {what}, got {raw!r}") from None
        if value < 0:
            raise ValueError("must not be negative")
        return value

    return parse


_integer = _non_negative(int, "an integer")
_seconds = _non_negative(lambda raw: float(raw.removesuffix("s")), "a number of seconds")


def _size(raw: str) -> int:
    m = _SIZE.match(raw)
    if not m:
        raise ValueError(f"must be a size such as 500MB or 2GiB, got {raw!r}")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def _flag(raw: str) -> bool:
    low = raw.lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"must be true or false, got {low!r}")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        low = raw.lower()
        if low not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {low!r}")
        return low

    return parse


def _secret(raw: str) -> Secret:
    register_secret(raw)
    return Secret(raw)


def _snapshot_url(raw: str) -> Secret:
    if urlsplit(raw).scheme not in {"http", "https", "file"}:
        raise ValueError("must be an http(s) URL")
    register_secret(urlsplit(raw).query)  # the signature, also when logged apart from the URL
    return _secret(raw)


def _sha256(raw: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", raw.lower()):
        raise ValueError("must be 64 hex digits")
    return raw.lower()


def _realtime_url(raw: str) -> str:
    if urlsplit(raw).scheme not in {"http", "https", "ws", "wss"}:
        raise ValueError("must be an http(s):// or ws(s):// URL")
    return raw


def _http_addr(raw: str) -> HttpSettings:
    if raw in {"", "off", "none"}:
        return HttpSettings(port=None)
    host, _, port = raw.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be host:port, got {raw!r}")
    return HttpSettings(host=host.strip("[]") or "0.0.0.0", port=int(port))


def _ignore(raw: str) -> tuple[str, ...]:
    base: tuple[str, ...] = _default("twoway", "ignore")
    return base + tuple(x for x in raw.split(",") if x.strip())


def _argv(raw: str) -> tuple[str, ...]:
    return tuple(shlex.split(raw))  # ValueError on unbalanced quotes


def _on_change(raw: str) -> tuple[tuple[str, str], ...]:
    rules: list[tuple[str, str]] = []
    for rule in filter(None, (r.strip() for r in raw.split(";"))):
        glob, sep, action = rule.partition("=")
        if not sep or not glob.strip() or not action.strip():
            raise ValueError(f"rule must be GLOB=ACTION, got {rule!r}")
        rules.append((glob.strip(), action.strip()))
    return tuple(rules)


@dataclass(frozen=True, slots=True)
class Var:
    """One environment variable: where its value goes, how it is parsed, one line of help.

    field: a `Settings` field, or `section.field` of one of its slices.
    parse_empty: an empty value is parsed (SIDECAR_HTTP_ADDR="" turns the listener off)
        instead of meaning "unset".
    """

    name: str
    field: str
    parse: Callable[[str], Any]
    doc: str
    parse_empty: bool = False

    @property
    def default(self) -> object:
        """The field's default (what an unset variable means)."""
        section, _, name = self.field.rpartition(".")
        return _default(section, name)


def _default(section: str, name: str) -> Any:
    """The default of a field of Settings ("" section) or of one of its slices."""
    f = next(f for f in fields(_SECTIONS[section]) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


VARIABLES: tuple[Var, ...] = (
    Var("PROJECT_ID", "project_id", _text, "the project; the channel is project:{PROJECT_ID}"),
    Var("SESSION_ID", "session_id", _text, "this preview's session, on every log line and metric"),
    Var("PROJECT_DIR", "project_dir", _absolute, "where the files live"),
    Var(
        "SIDECAR_STATE_DIR",
        "state_dir",
        _absolute,
        "the sidecar's own state (PROJECT_DIR/.sidecar)",
    ),
    Var("SIDECAR_WRITE_MODE", "write_mode", _choice("atomic", "inplace"), "atomic or inplace"),
    Var("SIDECAR_MAX_BYTES", "limits.max_bytes", _size, "quota: total bytes (0 = none)"),
    Var("SIDECAR_MAX_FILES", "limits.max_files", _integer, "quota: files (0 = none)"),
    Var("SIDECAR_MAX_FILE_BYTES", "limits.max_file_bytes", _size, "largest file (0 = none)"),
    Var("SNAPSHOT_URL", "snapshot.url", _snapshot_url, "signed URL of the snapshot"),
    Var("SNAPSHOT_SHA256", "snapshot.sha256", _sha256, "sha256 of the compressed snapshot"),
    Var("SIDECAR_SNAPSHOT_RETRIES", "snapshot.retries", _integer, "download attempts"),
    Var("SIDECAR_BACKOFF_INITIAL", "snapshot.backoff_initial", _seconds, "first retry wait"),
    Var("SIDECAR_BACKOFF_MAX", "snapshot.backoff_max", _seconds, "longest retry wait"),
    Var("SIDECAR_READ_TIMEOUT", "snapshot.read_timeout", _seconds, "download read timeout"),
    Var(
        "SIDECAR_SNAPSHOT_REQUEST_WAIT",
        "snapshot.request_wait",
        _seconds,
        "wait for snapshot:ready after snapshot:request",
    ),
    Var("REALTIME_URL", "realtime.url", _realtime_url, "Realtime endpoint; unset = no live sync"),
    Var("REALTIME_APIKEY", "realtime.apikey", _secret, "the anon/publishable key"),
    Var("REALTIME_TOKEN", "realtime.token", _secret, "the scoped JWT"),
    Var("REALTIME_TOKEN_FILE", "realtime.token_file", _path, "a file holding the scoped JWT"),
    Var(
        "SIDECAR_HEARTBEAT_WINDOW",
        "realtime.heartbeat_window",
        _seconds,
        "a channel silent this long is rebuilt",
    ),
    Var(
        "SIDECAR_PING_INTERVAL",
        "realtime.ping_interval",
        _seconds,
        "at most one liveness ping per this many seconds",
    ),
    Var(
        "SIDECAR_REBUILD_BACKOFF",
        "realtime.rebuild_backoff_initial",
        _seconds,
        "first wait before rebuilding a dead channel",
    ),
    Var(
        "SIDECAR_AUTH_FAIL_WINDOW",
        "realtime.auth_fail_window",
        _seconds,
        "token refusals this long without a newer token exit 77",
    ),
    Var("SIDECAR_UPSTREAM", "twoway.upstream", _choice("none", "rpc"), "rpc pushes local changes"),
    Var("SUPABASE_URL", "twoway.supabase_url", _text, "the project's API root for the RPCs"),
    Var(
        "SIDECAR_CONFLICT",
        "twoway.conflict",
        _choice("remote-wins", "local-wins", "merge"),
        "conflict policy",
    ),
    Var("SIDECAR_IGNORE", "twoway.ignore", _ignore, "extra comma-separated ignore patterns"),
    Var("SIDECAR_LOCAL_CHANGES", "twoway.local_changes", _flag, "watch for local changes"),
    Var(
        "SIDECAR_ACCEPT_CLIENT_EVENTS",
        "twoway.accept_client_events",
        _flag,
        "also apply events without meta.id (weaker)",
    ),
    Var("SIDECAR_HTTP_ADDR", "http", _http_addr, "health listener host:port, off", True),
    Var("SIDECAR_AFTER_HYDRATE", "process.after_hydrate", _argv, "command before the child"),
    Var("SIDECAR_ON_CHANGE", "process.on_change", _on_change, "GLOB=ACTION;... hooks"),
    Var("SIDECAR_RESTART_CHILD", "process.restart_child", _flag, "restart a child that exits"),
    Var("SIDECAR_STOP_GRACE", "process.stop_grace", _seconds, "SIGTERM to SIGKILL, seconds"),
    Var("SIDECAR_CHILD_USER", "process.child_user", _text, "user of the child when root"),
    Var("LOG_FORMAT", "log_format", _choice("json", "console"), "json or console"),
    Var("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"), "log level"),
)

_SECTIONS: dict[str, type] = {
    "": Settings,
    "limits": Limits,
    "snapshot": SnapshotSettings,
    "realtime": RealtimeSettings,
    "twoway": TwoWaySettings,
    "http": HttpSettings,
    "process": ProcessSettings,
}


def _read_token(realtime: dict[str, Any], problems: list[str]) -> None:
    """REALTIME_TOKEN_FILE's token when REALTIME_TOKEN is not set; refuse a service_role one."""
    token_file = realtime.get("token_file")
    if realtime.get("token") is None and token_file is not None:
        try:
            text = token_file.read_text().strip()
        except OSError as exc:
            problems.append(f"REALTIME_TOKEN_FILE cannot be read: {exc.strerror}")
        else:
            if text:
                realtime["token"] = _secret(text)
    token = realtime.get("token")
    if token is not None and jwt_claims(str(token)).get("role") == "service_role":
        problems.append(
            "REALTIME_TOKEN has role service_role; refusing to start "
            "with a key that can read every project"
        )


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
