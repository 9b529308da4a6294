"""Comments and docs cite files of this repository, and the two copies of the delta rules agree."""

from __future__ import annotations

import re
from pathlib import Path

import sidecar.live

ROOT = Path(__file__).resolve().parents[1]
RULES_HOME = "sidecar/live/__init__.py"
# Documents outside the repository that comments used to cite.
FOREIGN = re.compile(
    r"protocol notes|shared/reference|shared/contract|\.\./shared|contract rules?|§"
)
RULE = re.compile(r"\brules? \d", re.IGNORECASE)


def _sources() -> list[Path]:
    files = [*ROOT.glob("sidecar/**/*.py"), *ROOT.glob("tests/**/*.py")]
    files += [p for p in (ROOT / "scripts").iterdir() if p.is_file()]
    return [p for p in files if "node_modules" not in p.parts and p != Path(__file__).resolve()]


def test_no_citation_of_documents_outside_the_repository() -> None:
    """No "protocol notes", "contract rules", "§8.8" or path into ../shared."""
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources()
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if FOREIGN.search(line)
    ]
    assert not hits


def test_a_file_citing_a_rule_by_number_names_where_the_rules_are() -> None:
    """ "delta rule 3" resolves: the file also names sidecar/live/__init__.py."""
    unresolved = [
        str(p.relative_to(ROOT))
        for p in _sources()
        if p != ROOT / RULES_HOME
        and RULE.search(p.read_text(errors="replace"))
        and RULES_HOME not in p.read_text(errors="replace")
    ]
    assert not unresolved


def _numbered_list(text: str) -> list[str]:
    """The items 0. to 7. of the first numbered list in `text`, whitespace collapsed."""
    items = re.findall(r"^(\d)\. (.*?)(?=^\d\. |^\s*$)", text + "\n\n", re.MULTILINE | re.DOTALL)
    return [" ".join(body.split()) for _, body in items]


def test_readme_and_live_docstring_hold_the_same_delta_rules() -> None:
    """The README's "Live deltas" list and sidecar/live/__init__.py's are the same rules 0-7."""
    readme = (ROOT / "README.md").read_text().split("## Live deltas", 1)[1]
    from_readme = _numbered_list(readme)
    from_module = _numbered_list(sidecar.live.__doc__ or "")
    assert len(from_module) == 8
    assert from_readme[:8] == from_module


def test_every_python_script_is_linted_and_type_checked() -> None:
    """scripts/check names each extensionless Python script (ruff and mypy only see them so)."""
    check = (ROOT / "scripts" / "check").read_text()
    python = [
        p.name
        for p in (ROOT / "scripts").iterdir()
        if p.is_file()
        and not p.suffix
        and p.read_text(errors="replace").startswith("#!/usr/bin/env python")
    ]
    assert python
    assert [name for name in python if f"scripts/{name}\n" not in check] == []


def test_every_slow_entry_names_an_existing_test() -> None:
    """tests/conftest.py's SLOW list does not silently outlive a renamed or moved test."""
    from tests.conftest import SLOW

    stale = [
        key
        for key in SLOW
        if f"def {key.partition('::')[2]}("
        not in (ROOT / "tests" / key.partition("::")[0]).read_text()
    ]
    assert stale == []
