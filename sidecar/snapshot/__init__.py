"""Hydration: download a signed ``.tar.zst`` snapshot, verify it while it streams, publish it whole.

Kept import-light: ``sidecar hydrate`` imports only this package and ``sidecar.tree``.
"""
