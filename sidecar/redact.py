"""Removes secrets (JWTs, API keys, signed-URL query strings) from text before it is logged."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Secret", "redact", "redact_url", "register_secret"]

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_SB_KEY = re.compile(r"\bsb_(?:secret|publishable)_[A-Za-z0-9_-]+")
# Any URL's query string and fragment: signed URLs carry their token there. A query already
# redacted is taken whole (with anything after it), so that redacting twice changes nothing.
_URL_QUERY = re.compile(
    r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>]*)[?#](?:<redacted>)?[^\s\"'<>]*"
)
_known: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a literal secret so that any later text containing it is redacted."""
    if value and len(value) >= 8:
        _known.add(value)


def redact_url(url: str) -> str:
    """The URL without its query string and fragment, which may hold a signature."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    suffix = "?<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", "")) + suffix


def redact(value: Any) -> Any:
    """Redact secrets inside a string, or inside the strings of a list, tuple or dict."""
    if isinstance(value, str):
        value = _URL_QUERY.sub(r"\1?<redacted>", value)
        for secret in _known:
            if secret in value:
                value = value.replace(secret, "<redacted>")
        value = _JWT.sub("<redacted-jwt>", value)
        return _SB_KEY.sub("<redacted-key>", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


class Secret(str):
    """A string whose repr and str-in-containers never show the value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<SECRET>"
