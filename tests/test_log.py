"""Logging: a line the output cannot take is lost, never raised into the code that logged it."""

from __future__ import annotations

import errno
import io
import json

import pytest
import structlog

from sidecar.log import LinePrinter, configure_logging


class _Unwritable(io.StringIO):
    """stdout redirected to a file on a full disk, or a pipe whose reader is gone."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def write(self, s: str) -> int:
        raise OSError(self.code, "cannot write")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EPIPE, errno.EIO])
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_line_the_stream_cannot_take_is_dropped_and_counted(code: int, fmt: str) -> None:
    configure_logging(fmt, stream=_Unwritable(code))
    before = LinePrinter.dropped
    log = structlog.get_logger(component="test")
    log.info("test.line", n=1)  # a sync engine's log call: it must go on
    log.error("test.error", n=2)
    assert LinePrinter.dropped == before + 2


def test_lines_still_reach_a_working_stream() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out, project_id="p", session_id="s")
    before = LinePrinter.dropped
    structlog.get_logger(component="test").info("test.line", n=1)
    doc = json.loads(out.getvalue())
    assert (doc["event"], doc["n"], doc["project_id"]) == ("test.line", 1, "p")
    assert LinePrinter.dropped == before


class _Recording(io.StringIO):
    """A stream that keeps each write() call apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, s: str) -> int:
        self.calls.append(s)
        return super().write(s)


def test_each_line_is_one_write_with_its_newline() -> None:
    """Unbuffered (as the image runs), a line in two writes lets the child's output, which
    shares our stdout, land between a line and its newline."""
    out = _Recording()
    configure_logging("json", stream=out)
    log = structlog.get_logger(component="test")
    log.info("test.one", n=1)
    log.warning("test.two", text="x" * 5000)
    assert len(out.calls) == 2
    assert all(c.endswith("\n") and c.count("\n") == 1 for c in out.calls)
    assert [json.loads(c)["event"] for c in out.calls] == ["test.one", "test.two"]
