"""The orchestrator commands' environment: the credentials the container never holds.

`sidecar.config.Settings` refuses service-role keys for the container's commands; these
commands need one and refuse the opposite: a scoped token (a JWT whose role is not
service_role) or a publishable key where the service-role key belongs, which would fail
later with a less clear Storage or database error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config import jwt_claims
from sidecar.errors import ConfigError
from sidecar.redact import register_secret

__all__ = ["OrchestratorEnv"]

_KEY_VARS = ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SECRET_KEY")


@dataclass(frozen=True, slots=True)
class OrchestratorEnv:
    database_url: str  # "" = read through PostgREST (publish only)
    supabase_url: str
    storage_url: str  # SIDECAR_STORAGE_URL, default SUPABASE_URL
    service_key: str
    bucket: str
    url_ttl: int  # seconds a signed snapshot URL stays valid

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, need_database: bool) -> OrchestratorEnv:
        """DATABASE_URL (optional for publish: without it the files are read through PostgREST
        at SUPABASE_URL), SUPABASE_URL, the service key, SIDECAR_STORAGE_URL,
        SIDECAR_SNAPSHOT_BUCKET and SIDECAR_SNAPSHOT_URL_TTL; every problem at once."""
        problems: list[str] = []
        database_url = env.get("DATABASE_URL", "").strip()
        register_secret(database_url)
        if need_database and not database_url:
            problems.append(
                "DATABASE_URL is required (a connection as postgres: LISTEN and row locks)"
            )
        supabase_url = env.get("SUPABASE_URL", "").strip()
        if not supabase_url.startswith(("http://", "https://")):
            problems.append("SUPABASE_URL must be the project's http(s) URL (Storage lives there)")
        key_name, key = next(((n, env[n].strip()) for n in _KEY_VARS if env.get(n)), ("", ""))
        register_secret(key)
        if not key:
            problems.append("SUPABASE_SERVICE_ROLE_KEY or SUPABASE_SECRET_KEY is required")
        elif key.startswith("sb_publishable_"):
            problems.append(f"{key_name} holds a publishable key; the service-role key is needed")
        elif key.count(".") == 2:
            role = jwt_claims(key).get("role")
            if role != "service_role":
                problems.append(
                    f"{key_name} is a scoped token (role {role!r}); refusing: publishing "
                    "needs the service-role key, never a container's token"
                )
        elif not key.startswith("sb_secret_"):
            problems.append(f"{key_name} is neither a service_role JWT nor an sb_secret_ key")
        storage_url = env.get("SIDECAR_STORAGE_URL", "").strip() or supabase_url
        if not storage_url.startswith(("http://", "https://")):
            problems.append("SIDECAR_STORAGE_URL must be an http(s) URL")
        bucket = env.get("SIDECAR_SNAPSHOT_BUCKET", "").strip() or "project-snapshots"
        ttl_text = env.get("SIDECAR_SNAPSHOT_URL_TTL", "").strip() or "3600"
        ttl = int(ttl_text) if ttl_text.isdigit() else 0
        if not 60 <= ttl <= 7 * 86400:
            problems.append(
                f"SIDECAR_SNAPSHOT_URL_TTL must be 60..604800 seconds, got {ttl_text!r}"
            )
        if problems:
            raise ConfigError(problems)
        return cls(
            database_url, supabase_url.rstrip("/"), storage_url.rstrip("/"), key, bucket, ttl
        )
