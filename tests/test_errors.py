"""The SidecarError tree reads in one place: sidecar/errors.py (README: exit codes)."""

from __future__ import annotations

import re
from pathlib import Path

import sidecar
from sidecar import errors
from sidecar.errors import ChildStartError, ExitCode, HookFailedError, SidecarError

PACKAGE = Path(sidecar.__file__).parent
CLASS = re.compile(r"^class (\w+)\(([^)]*)\):", re.MULTILINE)


def _error_classes_outside_errors() -> dict[str, str]:
    """Classes deriving (by name, transitively) from an errors.py class, defined elsewhere."""
    known = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, SidecarError)
    }
    classes: list[tuple[str, set[str], str]] = []  # (name, base names, file) parsed once
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "errors.py":
            continue
        for name, bases in CLASS.findall(path.read_text()):
            names = {b.strip().rpartition(".")[2] for b in bases.split(",")}
            classes.append((name, names, str(path.relative_to(PACKAGE))))
    found: dict[str, str] = {}
    grew = True
    while grew:
        grew = False
        for name, bases, where in classes:
            if name not in found and bases & (known | set(found)):
                found[name] = where
                grew = True
    return found


def test_every_sidecar_error_outside_errors_py_is_listed_in_its_docstring() -> None:
    """A SidecarError defined next to its raiser is named, with its file, in errors.py."""
    doc = errors.__doc__ or ""
    outside = _error_classes_outside_errors()
    assert outside, "the scan finds the known outliers"
    missing = {name: where for name, where in outside.items() if f"`{where}` {name}(" not in doc}
    assert not missing


def test_per_instance_exit_codes() -> None:
    """The hook's status and the shell's 126/127 become the process's exit code."""
    assert HookFailedError("npm ci failed", 3).exit_code == 3
    assert ChildStartError("nope", ExitCode.CHILD_NOT_FOUND).exit_code == 127
