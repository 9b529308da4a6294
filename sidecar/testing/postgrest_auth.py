"""What the two PostgREST stand-ins share: its error answer and its tokens.

`sidecar/testing/rpc_server.py` (over an in-memory table) and `sidecar/testing/gateway.py` (over
PostgreSQL) answer errors in PostgREST's `{code, message, details, hint}` shape and mint and
verify the same JWTs; both take them from here (no psycopg import, so the in-memory double stays
light).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from aiohttp import web

from sidecar.testing.realtime.jwt import signing_key

__all__ = ["RpcError", "TokenIssuer", "decode_token", "make_token"]


class RpcError(Exception):
    """A PostgREST error answer: `status` and the JSON `body`."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        details: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.body: dict[str, Any] = {
            "code": code,
            "details": details,
            "hint": hint,
            "message": message,
        }


def make_token(
    secret: str,
    project_id: str | None,
    *,
    role: str = "authenticated",
    exp_in: float = 3600,
    **claims: Any,
) -> str:
    """An HS256 JWT with role, iat, exp, aud and (when given) the project_id claim."""
    now = int(time.time())
    body: dict[str, Any] = {
        "role": role,
        "iat": now,
        "exp": now + int(exp_in),
        "aud": "authenticated" if role == "authenticated" else role,
    }
    if project_id is not None:
        body["project_id"] = project_id
    body.update(claims)
    return jwt.encode(body, secret, algorithm="HS256")


def decode_token(
    token: str,
    secret: str,
    jwks: Mapping[str, Any] | None,
    *,
    require: Sequence[str] = (),
    leeway: float = 0,
) -> dict[str, Any]:
    """Verified claims: HS256 with the secret, ES256/RS256 with the JWKS key of its `kid`.

    Raises `jwt.InvalidTokenError` (or its subclasses) as PyJWT does.
    """
    header = jwt.get_unverified_header(token)
    key = signing_key(header, secret, jwks)
    if key is None:
        raise jwt.InvalidAlgorithmError(f"no key for alg {header.get('alg')!r}")
    claims = jwt.decode(
        token,
        key,
        algorithms=[str(header.get("alg"))],
        leeway=leeway,
        options={"verify_aud": False, "require": list(require)},
    )
    if not isinstance(claims, dict):
        raise jwt.InvalidTokenError("JWT claims are not an object")
    return claims


class TokenIssuer:
    """Mixin for a server with a `jwt_secret`: `make_token` and the `/_admin/token` route."""

    jwt_secret: str

    def make_token(
        self,
        project_id: str | None,
        *,
        role: str = "authenticated",
        exp_in: float = 3600,
        **claims: Any,
    ) -> str:
        """An HS256 JWT for project_id with the given role and extra claims."""
        return make_token(self.jwt_secret, project_id, role=role, exp_in=exp_in, **claims)

    async def _handle_token(self, request: web.Request) -> web.Response:
        body = dict(await request.json())
        project = body.pop("project_id", None)
        role = str(body.pop("role", "authenticated"))
        exp_in = float(body.pop("exp_in", 3600))
        return web.json_response(
            {"token": self.make_token(project, role=role, exp_in=exp_in, **body)}
        )
