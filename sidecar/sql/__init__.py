"""The database side as package data: the migration `sidecar db sql` prints.

`migration_sql()` is the whole migration (the numbered files in order); `OPTIONS` are opt-in
additions appended on request (`client_broadcast`: let an editor token broadcast on the channel).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["OPTIONS", "migration_files", "migration_sql", "option_sql"]

OPTIONS = ("client_broadcast",)


def migration_files() -> list[str]:
    """The migration's file names, in the order they apply."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".sql"))


def migration_sql() -> str:
    """The migration's SQL text, every file in order."""
    root = resources.files(__name__)
    return "\n".join(root.joinpath(name).read_text(encoding="utf-8") for name in migration_files())


def option_sql(name: str) -> str:
    """The SQL of one opt-in addition (a name from OPTIONS)."""
    if name not in OPTIONS:
        raise ValueError(f"unknown option {name!r}; known: {', '.join(OPTIONS)}")
    return resources.files(__name__).joinpath("options", f"{name}.sql").read_text(encoding="utf-8")
