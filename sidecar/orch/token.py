"""`sidecar token mint`: the scoped JWT a preview container gets as REALTIME_TOKEN.

PostgREST, Realtime and Storage accept it and the migration's policies (sidecar/sql/) scope it to
one project: `role=authenticated` plus the `project_id`, `session_id` and `read_only` claims that
`sidecar.authorize()` reads. It is signed with PyJWT, either HS256 with the project's legacy JWT
secret (SUPABASE_JWT_SECRET) or ES256 with an imported signing key (SUPABASE_JWT_SIGNING_KEY:
the private JWK with its `kid`, as `supabase gen signing-key --algorithm ES256` prints it; the
signing key wins when both are set). `sub` is set only to a UUID because `auth.uid()` casts it
to uuid and raises on anything else. It never mints `service_role`: that is what the container
must never hold.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from sidecar.errors import ConfigError
from sidecar.redact import register_secret

__all__ = ["SigningKey", "mint_token", "parse_ttl", "signing_key_from_env", "write_token_file"]

DEFAULT_AUDIENCE = "authenticated"
MAX_TTL = 24 * 3600  # a scoped token is re-minted, never long-lived
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_FORBIDDEN_ROLES = frozenset({"service_role", "supabase_admin", "postgres"})


@dataclass(frozen=True, slots=True)
class SigningKey:
    """What signs: an HS256 secret, or an asymmetric private JWK (alg and kid from the JWK)."""

    algorithm: str
    key: Any  # str for HS256, a cryptography private key otherwise
    kid: str | None = None


def parse_ttl(text: str) -> int:
    """`15m`, `1h`, `900` or `900s` as whole seconds (1 s .. 24 h)."""
    m = _TTL.match(text)
    if m is None:
        raise ConfigError(f"--ttl must be a duration like 15m, 1h or 900s, got {text[:40]!r}")
    seconds = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not 1 <= seconds <= MAX_TTL:
        raise ConfigError(f"--ttl must be between 1s and 24h, got {text!r}")
    return seconds


def signing_key_from_env(env: Mapping[str, str]) -> SigningKey:
    """SUPABASE_JWT_SIGNING_KEY (a private JWK, or a JWKS holding one), else SUPABASE_JWT_SECRET."""
    raw_jwk = env.get("SUPABASE_JWT_SIGNING_KEY", "").strip()
    if raw_jwk:
        register_secret(raw_jwk)
        return _jwk_key(raw_jwk)
    secret = env.get("SUPABASE_JWT_SECRET", "")
    if secret:
        register_secret(secret)
        if len(secret.encode()) < 32:
            raise ConfigError("SUPABASE_JWT_SECRET is shorter than 32 bytes; HS256 needs 32+")
        return SigningKey("HS256", secret)
    raise ConfigError(
        "token mint needs SUPABASE_JWT_SIGNING_KEY (a private JWK with kid) "
        "or SUPABASE_JWT_SECRET (the project's legacy JWT secret)"
    )


def _jwk_key(raw: str) -> SigningKey:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ConfigError("SUPABASE_JWT_SIGNING_KEY is not JSON (a private JWK expected)") from None
    if isinstance(data, dict) and isinstance(data.get("keys"), list):
        private = [k for k in data["keys"] if isinstance(k, dict) and "d" in k]
        if len(private) != 1:
            raise ConfigError(
                "SUPABASE_JWT_SIGNING_KEY holds a JWKS without exactly one private key"
            )
        data = private[0]
    if not isinstance(data, dict):
        raise ConfigError("SUPABASE_JWT_SIGNING_KEY must be a JSON object (a private JWK)")
    if "d" not in data:
        raise ConfigError("SUPABASE_JWT_SIGNING_KEY is a public key; minting needs the private JWK")
    kid = data.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ConfigError("SUPABASE_JWT_SIGNING_KEY has no kid; Supabase picks the key by kid")
    try:
        jwk = jwt.PyJWK(data)
    except jwt.PyJWKError as exc:
        raise ConfigError(f"SUPABASE_JWT_SIGNING_KEY is not a usable JWK: {exc}") from None
    if jwk.algorithm_name.startswith("HS"):
        raise ConfigError(
            "SUPABASE_JWT_SIGNING_KEY is symmetric; use SUPABASE_JWT_SECRET for HS256"
        )
    return SigningKey(jwk.algorithm_name, jwk.key, kid)


def mint_token(
    key: SigningKey,
    *,
    project_id: str,
    session_id: str,
    ttl: int,
    read_only: bool = False,
    role: str = "authenticated",
    sub: str | None = None,
    audience: str = DEFAULT_AUDIENCE,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """A JWT scoped to project_id (a UUID) for session_id, valid for ttl seconds."""
    problems: list[str] = []
    if role in _FORBIDDEN_ROLES:
        problems.append(
            f"refusing to mint role {role!r}: a container token is scoped, never a service key"
        )
    try:
        project = str(uuid.UUID(project_id))
    except ValueError:
        problems.append(f"--project must be a UUID (the project's id), got {project_id[:60]!r}")
        project = project_id
    if not session_id.strip():
        problems.append("--session must not be empty (it becomes the events' sender)")
    if sub is not None:
        try:
            sub = str(uuid.UUID(sub))
        except ValueError:
            problems.append(f"--sub must be a UUID (auth.uid() casts it), got {sub[:60]!r}")
    if problems:
        raise ConfigError(problems)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "aud": audience,
        "role": role,
        "iat": issued,
        "exp": issued + ttl,
        "project_id": project,
        "session_id": session_id,
        "read_only": read_only,
    }
    if issuer:
        claims["iss"] = issuer
    if sub is not None:
        claims["sub"] = sub
    headers = {"typ": "JWT"} if key.kid is None else {"typ": "JWT", "kid": key.kid}
    return jwt.encode(claims, key.key, algorithm=key.algorithm, headers=headers)


def write_token_file(path: Path, token: str) -> None:
    """Replace path with the token atomically (temp file in the same directory, 0600, rename).

    A reader following REALTIME_TOKEN_FILE sees the old token or the new one, never a part.
    """
    directory = path.parent if str(path.parent) else Path()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
