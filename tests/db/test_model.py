"""Random programs of RPC calls against a reference model of the contract, on the real database.

Each example is a fresh project and a list of upserts, deletes and bulks with expected versions
that are current, stale, 0 or absent. After every call the answer (status, version, seq) must be
the model's; at the end the head of every path, the event log and the broadcasts must be too.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..pgfixtures import Db

pytestmark = pytest.mark.pg

PATHS = ["a", "b", "c", "d/e"]
CONTENTS = ["", "one", "two", "ünï"]
EXPECTS = ["none", "current", "stale", "zero"]


@dataclass
class Model:
    heads: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # version, hash|None
    seq: int = 0

    def current(self, path: str) -> int:
        return self.heads.get(path, (0, None))[0]

    def expected(self, path: str, how: str) -> int | None:
        return {
            "none": None,
            "current": self.current(path),
            "stale": self.current(path) + 1,
            "zero": 0,
        }[how]

    def conflicts(self, path: str, expected: int | None) -> bool:
        return expected is not None and expected != self.current(path)

    def upsert(self, path: str, content: str) -> tuple[int, bool]:
        """(version, changed) of writing content at path (expected already checked)."""
        digest = hashlib.sha256(content.encode()).hexdigest()
        version, head = self.heads.get(path, (0, None))
        if head == digest:
            return version, False
        self.heads[path] = (version + 1, digest)
        return version + 1, True

    def delete(self, path: str) -> tuple[int, bool]:
        version, head = self.heads.get(path, (0, None))
        if head is None:
            return version, False
        self.heads[path] = (version + 1, None)
        return version + 1, True


op = st.one_of(
    st.tuples(
        st.just("upsert"),
        st.sampled_from(PATHS),
        st.sampled_from(CONTENTS),
        st.sampled_from(EXPECTS),
    ),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.just(""), st.sampled_from(EXPECTS)),
    st.tuples(
        st.just("bulk"),
        st.lists(
            st.tuples(
                st.sampled_from(PATHS), st.sampled_from([*CONTENTS, None]), st.sampled_from(EXPECTS)
            ),
            min_size=1,
            max_size=4,
            unique_by=lambda e: e[0],
        ),
        st.just(""),
        st.just("none"),
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=st.lists(op, min_size=1, max_size=25))
async def test_random_programs_match_the_model(db: Db, program: list[tuple[Any, ...]]) -> None:
    project = str(uuid.uuid4())
    await db.call("register_project", {"role": "service_role"}, project_uuid=project)
    claims = {"role": "authenticated", "project_id": project, "session_id": "m"}
    model = Model()
    for kind, target, content, how in program:
        if kind == "bulk":
            entries = []
            conflict = False
            for path, body, ehow in target:
                expected = model.expected(path, ehow)
                conflict = conflict or model.conflicts(path, expected)
                entry: dict[str, Any] = {"file_path": path, "expected_version": expected}
                if body is None:
                    entry["action"] = "delete"
                else:
                    entry["content"] = body
                entries.append(entry)
            status, answer = await db.call(
                "bulk_upsert_project_files", claims, project_uuid=project, files=entries
            )
            if conflict:
                assert (status, answer["code"]) == (409, "PT409")
                continue
            assert status == 200, answer
            any_change = False
            predicted = {}
            for path, body, _ in target:
                version, changed = (
                    model.upsert(path, body) if body is not None else model.delete(path)
                )
                predicted[path] = (version, changed)
                any_change = any_change or changed
            if any_change:
                model.seq += 1
            assert answer["seq"] == (model.seq if any_change else None)
            assert {
                f["file_path"]: (f["version"], f["changed"]) for f in answer["files"]
            } == predicted
            continue
        expected = model.expected(target, how)
        if kind == "upsert":
            status, answer = await db.call(
                "upsert_project_file",
                claims,
                project_uuid=project,
                p_file_path=target,
                p_content=content,
                expected_version=expected,
            )
        else:
            status, answer = await db.call(
                "delete_project_file",
                claims,
                project_uuid=project,
                p_file_path=target,
                expected_version=expected,
            )
        if model.conflicts(target, expected):
            assert (status, answer["code"]) == (409, "PT409")
            continue
        assert status == 200, answer
        version, changed = (
            model.upsert(target, content) if kind == "upsert" else model.delete(target)
        )
        if changed:
            model.seq += 1
        assert (answer["version"], answer["seq"]) == (version, model.seq if changed else None)

    # Heads, the log and the broadcasts agree with the model.
    for path in PATHS:
        status, head = await db.call(
            "get_project_file", claims, project_uuid=project, p_file_path=path
        )
        want = model.heads.get(path)
        if want is None:
            assert head is None
        else:
            assert (head["version"], head["content_hash"]) == want
    rows = await db.sql(
        "select seq from sidecar.events where project_id = %s order by seq", project
    )
    assert [r[0] for r in rows] == list(range(1, model.seq + 1))
    [(sent,)] = await db.sql(
        "select count(*) from realtime.messages where topic = %s", f"project:{project}"
    )
    assert sent == model.seq
    status, snap = await db.call("project_snapshot", claims, project_uuid=project)
    assert snap["seq"] == model.seq
    assert {f["file_path"]: (f["version"], f["content_hash"]) for f in snap["files"]} == {
        p: h for p, h in model.heads.items() if h[1] is not None
    }
