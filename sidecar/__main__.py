"""`python -m sidecar` runs the command line."""

from __future__ import annotations

from sidecar.cli import entrypoint

entrypoint()
