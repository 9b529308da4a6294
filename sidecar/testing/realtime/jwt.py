"""JWT minting and a faithful copy of Supabase Realtime's token checks, for the test server.

`verify()` follows `RealtimeWeb.ChannelsAuthorization.authorize_conn/3` and
`RealtimeWeb.JwtVerification.verify/3` (supabase/realtime 2.129.8): URL-decode and strip
whitespace, peek at claims and header, pick a signer (HS* from the project secret, ES*/RS*/EdDSA
from the tenant's JWKS by `kid`), check the signature with PyJWT, run the Joken claim validators (`exp`, `iat` and the configured exact-match claims, in
sorted key order), round float `exp`/`iat`, then require `role` and `exp`. Failures come back as a
`TokenFailure` whose helpers render the exact text each call site uses (connect, join, refresh).
"""

from __future__ import annotations

import binascii
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

import jwt

__all__ = [
    "TokenFailure",
    "confirm_exp",
    "mint",
    "signing_key",
    "verify",
]

FailureKind = Literal[
    "invalid_token",  # not a string
    "malformed",  # not three base64url JSON parts
    "claims_not_map",
    "header_not_map",
    "signer",  # no signer for the header's alg
    "signature",
    "expired",  # integer exp in the past
    "claim_invalid",  # any other Joken validation failure (float exp in the past, bad iat, ...)
    "missing_claims",
    "invalid_exp",  # exp - now <= 0 after Joken passed (confirm_token)
    "crash",  # something the real server raises on (bad percent-encoding)
]

_HS = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
_MISSING = "Fields `role` and `exp` are required in JWT"
_MALFORMED = "The token provided is not a valid JWT"
_SIGNER = "Failed to generate JWT signer, check your JWT secret or JWKS configuration"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class TokenFailure:
    """Why a token was refused, with the texts Realtime shows for it at each call site."""

    kind: FailureKind
    message: str = ""  # "Token has expired N seconds ago" for kind="expired"
    detail: str = ""  # Elixir `inspect` of the raw error, used by the refresh path

    def join_reason(self) -> str:
        """The `reason` of the phx_join error reply (RealtimeChannel.join/3 else branch)."""
        match self.kind:
            case "expired":
                return f"InvalidJWTToken: {self.message}"
            case "missing_claims":
                return f"InvalidJWTToken: {_MISSING}"
            case "malformed":
                return f"MalformedJWT: {_MALFORMED}"
            case "signature":
                return "JwtSignatureError: Failed to validate JWT signature"
            case "signer":
                return f"JwtSignerError: {_SIGNER}"
            case "invalid_exp":
                return "InvalidJWTToken: Token expiration time is invalid"
            case _:
                return "Unknown Error on Channel"

    def connect_error(self) -> tuple[int, str]:
        """HTTP status and `error` text of a refused WebSocket handshake (UserSocket.handle_error)."""
        match self.kind:
            case "expired":
                return 401, "Token has expired"
            case "missing_claims":
                return 401, _MISSING
            case "malformed" | "invalid_token":
                return 401, _MALFORMED
            case "signature":
                return 401, "Failed to validate JWT signature"
            case "signer":
                return 401, _SIGNER
            case _:
                return 500, "Error connecting to Realtime"

    def refresh_message(self) -> str:
        """The system-message text when an `access_token` refresh or the expiry check fails."""
        match self.kind:
            case "expired":
                return self.message
            case "missing_claims":
                return _MISSING
            case "malformed":
                return _MALFORMED
            case _:
                return self.detail


def mint(
    secret: str,
    claims: Mapping[str, Any],
    *,
    alg: str = "HS256",
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Sign `claims` with `secret` (HS256 by default)."""
    return jwt.encode(dict(claims), secret, algorithm=alg, headers=dict(headers or {}))


def _b64json(part: str) -> Any:
    return json.loads(jwt.utils.base64url_decode(part))


def signing_key(
    header: Mapping[str, Any], secret: str | None, jwks: Mapping[str, Any] | None
) -> str | jwt.PyJWK | None:
    """The key that verifies a token with this header, or None when there is no signer.

    HS* use the shared secret; an asymmetric alg needs the JWKS key with the header's `kid`
    and that alg (Realtime's `jwt_jwks`, PostgREST's JWKS `jwt-secret`).
    """
    alg = header.get("alg")
    if alg in _HS:
        return secret or None
    if alg not in _ASYMMETRIC or not jwks:
        return None
    kid = header.get("kid")
    for raw in jwks.get("keys", []):
        if not isinstance(raw, Mapping) or raw.get("kid") != kid:
            continue
        if raw.get("alg") not in (None, alg):
            continue
        try:
            return jwt.PyJWK(dict(raw), algorithm=str(alg))
        except jwt.PyJWKError:
            return None
    return None


def _elixir_round(value: float) -> int:
    return math.floor(abs(value) + 0.5) * (1 if value >= 0 else -1)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _inspect(value: Any) -> str:
    """Approximately Elixir's `inspect/1` for JSON values."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_inspect(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_inspect(k)} => {_inspect(v)}" for k, v in value.items())
        return "%{" + inner + "}"
    return repr(value)


def _claim_failure(claim: str, value: Any, message: str = '"Invalid token"') -> TokenFailure:
    detail = f"[message: {message}, claim: {json.dumps(claim)}, claim_val: {_inspect(value)}]"
    return TokenFailure("claim_invalid", detail=detail)


def verify(
    token: object,
    secret: str | None,
    *,
    jwks: Mapping[str, Any] | None = None,
    validators: Mapping[str, Any] | None = None,
    now: int | None = None,
) -> dict[str, Any] | TokenFailure:
    """Check `token` like Realtime's `authorize_conn`; the claims on success, else a failure.

    `secret` verifies HS* tokens, `jwks` ({"keys": [public JWKs]}) the asymmetric ones.
    """
    if not isinstance(token, str):
        return TokenFailure("invalid_token", detail=":invalid_token")
    if _BAD_PERCENT.search(token):
        # URI.decode/1 raises on a malformed escape; the real server turns the crash into
        # "Unknown Error on Channel" at join and a 500 at connect.
        return TokenFailure("crash", detail="%ArgumentError{}")
    cleaned = re.sub(r"\s", "", unquote(token))
    parts = cleaned.split(".")
    if len(parts) != 3:
        return TokenFailure("malformed", detail=":token_malformed")
    try:
        claims = _b64json(parts[1])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return TokenFailure("malformed", detail=":token_malformed")
    if not isinstance(claims, dict):
        return TokenFailure("claims_not_map", detail=":expected_claims_map")
    try:
        header = _b64json(parts[0])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        return TokenFailure("header_not_map", detail=":expected_header_map")
    key = signing_key(header, secret, jwks)
    if key is None:
        return TokenFailure("signer", detail=":error_generating_signer")
    try:
        # Signature only: the claims are validated below the way Joken does, not PyJWT's way.
        jwt.api_jws.decode_complete(cleaned, key, algorithms=[str(header["alg"])])
    except jwt.PyJWTError:
        return TokenFailure("signature", detail=":signature_error")

    current = int(time.time()) if now is None else now
    checks: dict[str, Any] = dict(validators or {})
    checks["exp"] = None
    checks["iat"] = None
    for key in sorted(checks):
        if key not in claims:
            continue  # Joken validates only the claims the token carries
        value = claims[key]
        if key == "exp":
            if not (_is_number(value) and value > current):
                if isinstance(value, int) and not isinstance(value, bool):
                    return TokenFailure(
                        "expired", message=f"Token has expired {current - value} seconds ago"
                    )
                return _claim_failure("exp", value, message=str(current))
        elif key == "iat":
            if not _is_number(value):
                return _claim_failure("iat", value)
        elif value != checks[key]:
            return _claim_failure(key, value)
    for key in ("exp", "iat"):
        if key in claims and _is_number(claims[key]) and isinstance(claims[key], float):
            claims[key] = _elixir_round(claims[key])
    if "role" not in claims or "exp" not in claims:
        return TokenFailure("missing_claims", detail=":missing_claims")
    return claims


def confirm_exp(claims: Mapping[str, Any], now: int | None = None) -> int | TokenFailure:
    """Seconds until `exp` (RealtimeChannel.confirm_token); a failure when it is not positive."""
    current = int(time.time()) if now is None else now
    diff = int(claims["exp"]) - current
    if diff <= 0:
        return TokenFailure("invalid_exp", detail=str(diff))
    return diff
