"""The one backoff rule of every retry loop: capped exponential, with a chosen share of jitter.

Each loop keeps its own attempt count, its own reasons to retry and its own reset (git-sync's
shape: the caller owns the retry policy); what they share is how long to wait before attempt N.

`floor` picks the jitter: 0 is full jitter (uniform in [0, cap], for many clients hitting one
server: the snapshot download), 0.5 is equal jitter (at least half the step: upstream RPCs,
realtime rebuilds), 1 is none (one local process with nothing to spread out: the child's
restarts, LocalSync's push retries).
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, initial: float, maximum: float, *, floor: float = 0.0) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry): uniform in
    [floor * cap, cap] where cap = min(maximum, initial * 2**(attempt-1))."""
    cap = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    if floor >= 1.0:
        return cap
    return random.uniform(floor * cap, cap)  # jitter, not cryptography
