"""The one backoff rule (sidecar/retry.py)."""

from __future__ import annotations

from sidecar.retry import backoff_delay


def test_backoff_is_capped_full_jitter() -> None:
    """Delays are uniform in [0, min(max, initial*2**(n-1))]."""
    rng_samples = [backoff_delay(n, 0.25, 10.0) for n in range(1, 12) for _ in range(50)]
    assert all(0 <= d <= 10.0 for d in rng_samples)
    assert all(backoff_delay(1, 0.25, 10.0) <= 0.25 for _ in range(100))
    assert max(backoff_delay(10, 0.25, 10.0) for _ in range(200)) > 5.0


def test_backoff_floor_keeps_a_share_of_the_step() -> None:
    """With floor=0.5 (the upstream RPC retries) every delay is between half and all of the
    capped step."""
    for n, cap in ((1, 0.25), (3, 1.0), (12, 10.0)):
        samples = [backoff_delay(n, 0.25, 10.0, floor=0.5) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in samples), (n, min(samples), max(samples))


def test_backoff_floor_one_is_the_capped_step_without_jitter() -> None:
    """floor=1 (the child's restarts): exactly initial, 2x, 4x... up to the maximum."""
    assert [backoff_delay(n, 0.5, 30.0, floor=1.0) for n in range(1, 9)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
