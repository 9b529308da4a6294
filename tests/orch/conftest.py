"""The real-PostgreSQL fixtures (tests/pgfixtures.py) for the orchestrator's tests."""

from __future__ import annotations

from ..pgfixtures import db, pg_cluster, project

__all__ = ["db", "pg_cluster", "project"]
