"""Redaction of tokens, keys and signed-URL query strings from anything logged."""

from __future__ import annotations

import json

import pytest
import structlog

from sidecar.log import configure_logging
from sidecar.redact import redact, redact_url, register_secret

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.abcdefghijklmnop"


def test_signed_url_query_is_removed() -> None:
    """A signed URL keeps its path and loses its query string."""
    url = "https://x.supabase.co/storage/v1/object/sign/b/p.tar.zst?token=SECRET123"
    assert redact_url(url) == "https://x.supabase.co/storage/v1/object/sign/b/p.tar.zst?<redacted>"
    assert "SECRET123" not in redact(f"GET {url} failed")


def test_jwts_and_keys_are_removed_inside_structures() -> None:
    """JWTs and sb_ keys are replaced wherever they appear in nested values."""
    out = redact({"a": [f"Bearer {JWT}"], "b": ("sb_secret_abc123",)})
    assert JWT not in json.dumps(out)
    assert "sb_secret_abc123" not in json.dumps(out)


def test_registered_literal_secrets_are_removed() -> None:
    """A secret that looks like nothing special is still removed once registered."""
    register_secret("plainsecretvalue42")
    assert "plainsecretvalue42" not in redact("the key is plainsecretvalue42")


def test_log_lines_never_carry_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    """A rendered JSON log line with a token and a signed URL shows neither."""
    configure_logging("json", project_id="p", session_id="s")
    structlog.get_logger().info("x.y", url="https://h/o?token=QQQ", err=ValueError(JWT))
    line = json.loads(capsys.readouterr().out)
    assert line["project_id"] == "p"
    assert line["session_id"] == "s"
    assert "QQQ" not in json.dumps(line)
    assert JWT not in json.dumps(line)


def test_redacting_twice_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """An already redacted URL passes through the log pipeline (which redacts each field and then
    the rendered line) unchanged, and a secret placed after a redaction marker is still removed."""
    url = "https://h/storage/v1/object/sign/b/p.tar.zst?token=SECRET123"
    shown = redact_url(url)
    assert redact(redact(shown)) == shown
    assert redact(f"{shown}token=SECRET456 and more") == f"{shown} and more"
    configure_logging("json", project_id="p", session_id="s")
    structlog.get_logger().info("x.y", url=shown)
    assert json.loads(capsys.readouterr().out)["url"] == shown
