"""A one-line hydration progress display for humans on a TTY; silent otherwise (logs suffice)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_bytes"]


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _format_eta(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Rewrites one status line in place on a TTY (at most every `interval` seconds).

    Show downloaded bytes (of the total when known), files written (of the manifest's count),
    the rate and an ETA. When the stream is not a TTY (or `enabled=False`) it does nothing.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.interval = interval
        self._clock = clock
        self._t0 = clock()
        self._last = float("-inf")
        self._shown = False
        self._width = 0

    def update(
        self,
        *,
        downloaded: int,
        total: int | None = None,
        files: int = 0,
        files_total: int | None = None,
        force: bool = False,
    ) -> None:
        """Redraw the line if enough time passed since the last redraw (cheap to call often)."""
        if not self.enabled:
            return
        now = self._clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._draw(
            self.render(
                downloaded=downloaded,
                total=total,
                files=files,
                files_total=files_total,
                elapsed=now - self._t0,
            )
        )

    def render(
        self,
        *,
        downloaded: int,
        total: int | None,
        files: int,
        files_total: int | None,
        elapsed: float,
    ) -> str:
        """The status text (no control characters)."""
        parts = ["hydrating"]
        if total:
            pct = min(100.0, 100.0 * downloaded / total)
            parts.append(f"{format_bytes(downloaded)} / {format_bytes(total)} ({pct:.0f}%)")
        else:
            parts.append(format_bytes(downloaded))
        parts.append(
            f"{files:,}/{files_total:,} files" if files_total is not None else f"{files:,} files"
        )
        rate = downloaded / elapsed if elapsed > 0 else 0.0
        parts.append(f"{format_bytes(rate)}/s")
        if total and rate > 0 and downloaded < total:
            parts.append(f"ETA {_format_eta((total - downloaded) / rate)}")
        return "  ".join(parts)

    def finish(self, message: str | None = None) -> None:
        """End the line (with a final message if given) so that later output starts clean."""
        if not self.enabled:
            return
        if message is not None:
            self._draw(message)
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False

    def _draw(self, text: str) -> None:
        # \r + erase-to-end-of-line: rewrite in place without leaving remnants of a longer line.
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self._shown = True
