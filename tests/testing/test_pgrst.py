"""PostgREST's SQLSTATE -> HTTP status table (Error.hs mapSQLtoHTTP), as the gateway applies it."""

from __future__ import annotations

import pytest

from sidecar.testing.pgrst import http_status

CASES = [
    ("PT409", True, 409),
    ("PT404", True, 404),
    ("P0001", True, 400),
    ("P0002", True, 500),
    ("42501", True, 403),
    ("42501", False, 401),
    ("23505", True, 409),
    ("23503", True, 409),
    ("40001", True, 500),
    ("40P01", True, 500),
    ("25006", True, 405),
    ("42883", True, 404),
    ("42P01", True, 404),
    ("08006", True, 503),
    ("53300", True, 503),
    ("57014", True, 500),
    ("28000", True, 403),
    ("22023", True, 400),
    ("22P02", True, 400),
    (None, True, 400),
]


@pytest.mark.parametrize(("sqlstate", "had_jwt", "status"), CASES)
def test_sqlstate_to_http(sqlstate: str | None, had_jwt: bool, status: int) -> None:
    assert http_status(sqlstate, had_jwt=had_jwt) == status
