"""Gap recovery's phases (delta rule 5 in sidecar/live/__init__.py), in the order the sync engine walks them.

A seq gap first waits briefly in case it is plain reordering (`REORDER`), then the engine
rejoins with replay since its last applied event (`REPLAY`); when replay cannot fill it, the
missing events are read from the database's event log (`project_events_since`, the catch-up
step between `REPLAY` and `REQUEST`), and only then is a snapshot asked for (`REQUEST`), after
which the cycle starts again if the answer did not close the gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Gap", "GapPhase"]


class GapPhase(Enum):
    REORDER = "reorder"  # wait: replay and live frames may interleave during a join
    REPLAY = "replay"  # rejoined with replay; then catch up from the database's event log
    REQUEST = "request"  # snapshot:request sent; waiting for snapshot:ready


@dataclass(slots=True)
class Gap:
    """An open seq gap: its phase, when that phase ends (monotonic), when it opened."""

    phase: GapPhase
    deadline: float
    opened_at: float
    rounds: int = 0
