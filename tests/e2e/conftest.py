"""The session's PostgreSQL cluster (tests/pgfixtures.py) for the end-to-end tests: one for the
whole directory, each test on its own project."""

from __future__ import annotations

from ..pgfixtures import pg_cluster

__all__ = ["pg_cluster"]
