"""structlog configuration: JSON (or console on a TTY), project and session on every line,
and every string field redacted of tokens and signed-URL query strings."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from sidecar.redact import redact

__all__ = ["LinePrinter", "configure_logging", "redact_processor"]


class LinePrinter(structlog.PrintLogger):
    """structlog's PrintLogger, except that:

    - a line its stream cannot take (stdout redirected to a file on a full disk, a pipe whose
      reader went away) is lost instead of raised: a log call must never be the fault that
      ends the sidecar, and its child with it (README, "A fault of the environment while
      running"). `dropped` counts the lost lines of the process;
    - a line and its newline go out in one write: print() makes two when stdout is unbuffered
      (PYTHONUNBUFFERED=1, as the Dockerfile runs us), and the child shares our stdout (the
      container's log), so its output could land between a line and its newline.

    Without a stream it writes to whatever sys.stdout is at the time of the call.
    """

    dropped = 0

    def __init__(self, file: TextIO | None = None) -> None:
        super().__init__(file)
        self._current_stdout = file is None

    def msg(self, message: str) -> None:
        out = sys.stdout if self._current_stdout else self._file
        try:
            with self._lock:
                out.write(message + "\n")
                out.flush()
        except OSError:
            LinePrinter.dropped += 1

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Redact every value, including exception text, before it is rendered."""
    for key, value in list(event_dict.items()):
        if isinstance(value, BaseException):
            event_dict[key] = redact(f"{type(value).__name__}: {value}")
        else:
            event_dict[key] = redact(value)
    return event_dict


def _redact_rendered(_logger: Any, _name: str, rendered: str) -> str:
    # Tracebacks are rendered late; scrub the final line as well.
    return redact(rendered)  # type: ignore[no-any-return]


def configure_logging(
    fmt: str = "json",
    level: str = "info",
    *,
    project_id: str = "local",
    session_id: str = "local",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog once (cli.py); binds project_id and session_id to every line."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=(stream or sys.stdout).isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        # Frame locals could hold a token: tracebacks carry code and line only.
        processors.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    processors += [redact_processor, renderer, _redact_rendered]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # No explicit stream: print to whatever sys.stdout is at the time of the call.
        logger_factory=lambda *_args: LinePrinter(stream),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(project_id=project_id, session_id=session_id)
