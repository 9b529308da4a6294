"""Settings.from_env: parsing, validation, and the refusal of service-role credentials."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from sidecar.config import VARIABLES, Settings, jwt_claims
from sidecar.errors import ConfigError, ExitCode


def _jwt(claims: dict[str, object]) -> str:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}.c2lnbmF0dXJl"


def test_defaults_follow_the_contract() -> None:
    """With nothing set, the project lives in /app/project and state in its .sidecar."""
    s = Settings.from_env({})
    assert s.project_dir == Path("/app/project")
    assert s.state_dir == Path("/app/project/.sidecar")
    assert s.write_mode == "atomic"
    assert s.twoway.conflict == "remote-wins"
    assert s.http.port == 8787
    assert s.log_format == "json"


def test_console_logs_on_a_tty() -> None:
    """LOG_FORMAT defaults to console when stdout is a terminal."""
    assert Settings.from_env({}, isatty=True).log_format == "console"


def test_sizes_and_topic_are_parsed() -> None:
    """Sizes accept SI and binary units; the topic derives from PROJECT_ID."""
    s = Settings.from_env(
        {
            "SIDECAR_MAX_BYTES": "2GiB",
            "SIDECAR_MAX_FILE_BYTES": "500kb",
            "SIDECAR_MAX_FILES": "10",
            "PROJECT_ID": "p-1",
        }
    )
    assert s.limits.max_bytes == 2 * 1024**3
    assert s.limits.max_file_bytes == 500_000
    assert s.limits.max_files == 10
    assert s.realtime.topic == "project:p-1"


def test_every_problem_is_listed_at_once() -> None:
    """One ConfigError names every bad variable, with the configuration exit code."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {
                "SIDECAR_MAX_BYTES": "lots",
                "SIDECAR_CONFLICT": "yolo",
                "SIDECAR_WRITE_MODE": "sometimes",
                "SNAPSHOT_SHA256": "abc",
                "SIDECAR_HTTP_ADDR": "nope",
            }
        )
    text = str(info.value)
    for name in (
        "SIDECAR_MAX_BYTES",
        "SIDECAR_CONFLICT",
        "SIDECAR_WRITE_MODE",
        "SNAPSHOT_SHA256",
        "SIDECAR_HTTP_ADDR",
    ):
        assert name in text
    assert info.value.exit_code == ExitCode.CONFIG


@pytest.mark.parametrize(
    "env",
    [
        {"SUPABASE_SERVICE_ROLE_KEY": "x"},
        {"SERVICE_ROLE_KEY": "x"},
        {"SUPABASE_SECRET_KEY": "x"},
        {"SOMETHING": "sb_secret_abcdef123"},
        {"REALTIME_TOKEN": _jwt({"role": "service_role", "exp": 9999999999})},
        {"REALTIME_APIKEY": _jwt({"role": "service_role", "exp": 9999999999})},
    ],
)
def test_service_role_credentials_are_refused(env: dict[str, str]) -> None:
    """Any service-role credential in the environment stops the sidecar from starting."""
    with pytest.raises(ConfigError, match=r"service|sb_secret"):
        Settings.from_env(env)


def test_scoped_token_is_accepted_and_hidden() -> None:
    """An authenticated-role token is accepted, and its repr never shows the value."""
    token = _jwt({"role": "authenticated", "exp": 9999999999})
    s = Settings.from_env({"REALTIME_TOKEN": token})
    assert s.realtime.token == token
    assert token not in repr(s)


def test_token_file_is_read(tmp_path: Path) -> None:
    """REALTIME_TOKEN_FILE supplies the token when REALTIME_TOKEN is absent."""
    token = _jwt({"role": "authenticated", "exp": 9999999999})
    f = tmp_path / "token"
    f.write_text(token + "\n")
    assert Settings.from_env({"REALTIME_TOKEN_FILE": str(f)}).realtime.token == token


def test_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    """A token file that cannot be read is reported, not ignored."""
    with pytest.raises(ConfigError, match="REALTIME_TOKEN_FILE"):
        Settings.from_env({"REALTIME_TOKEN_FILE": str(tmp_path / "missing")})


def test_on_change_rules_parse() -> None:
    """SIDECAR_ON_CHANGE is a ;-separated list of GLOB=ACTION rules."""
    s = Settings.from_env({"SIDECAR_ON_CHANGE": "package.json=npm install; *.env=restart"})
    assert s.process.on_change == (("package.json", "npm install"), ("*.env", "restart"))
    with pytest.raises(ConfigError, match="GLOB=ACTION"):
        Settings.from_env({"SIDECAR_ON_CHANGE": "justaglob"})


def test_jwt_claims_of_garbage_is_empty() -> None:
    """Non-JWT strings have no claims rather than raising."""
    assert jwt_claims("potato") == {}
    assert jwt_claims("a.b.c") == {}


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_variables() -> set[str]:
    """The backticked names in the first column of the README's configuration table."""
    text = README.read_text()
    section = text.split("### Configuration (environment)", 1)[1].split("\n\n", 2)[1]
    names: set[str] = set()
    for row in section.splitlines()[2:]:
        first = row.split("|")[1]
        names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first))
    return names


def test_readme_configuration_table_lists_every_variable() -> None:
    """Every row of VARIABLES is in the README's table, and the table names nothing else."""
    assert {v.name for v in VARIABLES} == _readme_variables()


def test_every_variable_targets_a_field_and_its_default_is_the_fields() -> None:
    """A row's field exists, and an unset variable leaves that field's default (written once)."""
    assert len({v.name for v in VARIABLES}) == len(VARIABLES)
    settings = Settings()
    for var in VARIABLES:
        section, _, name = var.field.rpartition(".")
        owner = getattr(settings, section) if section else settings
        assert name in {f.name for f in fields(owner)}, var
        assert var.default == getattr(owner, name), var


def test_an_empty_variable_is_an_unset_one_except_http_addr() -> None:
    """SIDECAR_STOP_GRACE="" keeps the default; SIDECAR_HTTP_ADDR="" turns the listener off."""
    s = Settings.from_env({"SIDECAR_STOP_GRACE": "", "SIDECAR_MAX_FILES": " "})
    assert s.process.stop_grace == 10.0
    assert s.limits.max_files == 0
    assert Settings.from_env({"SIDECAR_HTTP_ADDR": ""}).http.port is None


def test_every_bad_value_is_reported_at_once() -> None:
    """One ConfigError names every variable that failed to parse."""
    env = {
        "SIDECAR_SNAPSHOT_RETRIES": "many",
        "SIDECAR_BACKOFF_MAX": "-1",
        "SIDECAR_HEARTBEAT_WINDOW": "soon",
        "SIDECAR_AFTER_HYDRATE": "npm 'ci",
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    for name in env:
        assert name in str(info.value)


def test_cli_help_lists_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """`sidecar --help` ends with the variables, from the same table."""
    from sidecar.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {v.name} " in out for v in VARIABLES)
