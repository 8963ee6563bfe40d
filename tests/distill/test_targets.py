"""`distill.targets`: the store's format, checks, portability and damage detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distill.targets import (
    TargetMeta,
    TargetMismatchError,
    TargetStore,
    TaskLabels,
    answer_text,
    done_keys,
    next_seq,
    write_index,
    write_meta,
    write_part,
)
from runtime.errors import InputError

TASKS = {"species": TaskLabels(("Kea", "Tui", "Kaka")),
         "detection": TaskLabels(("Kea", "Tui", "Kaka", "None"), multi_label=True)}


def _meta(teacher_hash: str = "aaaaaaaaaaaaaaaa", tasks: dict | None = None) -> TargetMeta:
    return TargetMeta(teacher_hash=teacher_hash, teacher_config={"preset": "tiny"},
                      tasks=tasks or TASKS, sample_rate=16000, clip_s=10.0)


def _row(i: int, task: str) -> dict:
    rng = np.random.default_rng(i)
    n = len(TASKS[task].labels)
    row = {"id": f"c{i}.{task}", "task": task, "answer": "Kea",
           "scores": [float(x) for x in rng.normal(size=n)]}
    if TASKS[task].multi_label:
        row["probs"] = [float(x) for x in rng.uniform(size=n)]
    return row


def _store(out: Path) -> Path:
    write_meta(out, _meta())
    write_part(out, 0, 0, [_row(0, "species"), _row(0, "detection")])
    write_part(out, 1, 0, [_row(1, "species"), _row(1, "detection")])
    write_part(out, 0, 1, [_row(2, "species")])
    write_index(out)
    return out


def test_round_trip_and_copy_to_another_place(tmp_path: Path) -> None:
    out = _store(tmp_path / "a")
    moved = tmp_path / "elsewhere" / "targets"
    shutil.copytree(out, moved)
    store = TargetStore(moved)
    assert len(store) == 5 and store.verify() == 5
    assert store.keys()[0] == ("c0.detection", "detection")
    t = store.get("c1.detection", "detection")
    assert t is not None and t.probs is not None
    np.testing.assert_array_equal(t.scores, _row(1, "detection")["scores"])
    np.testing.assert_array_equal(t.probs, _row(1, "detection")["probs"])
    assert store.get("c2.detection", "detection") is None
    np.testing.assert_allclose(np.exp(t.logprobs).sum(), 1.0)
    assert done_keys(moved) == set(store.keys())
    assert next_seq(moved, 0) == 2 and next_seq(moved, 1) == 1 and next_seq(moved, 7) == 0


def test_refuses_another_teacher_and_other_label_sets(tmp_path: Path) -> None:
    out = _store(tmp_path / "s")
    store = TargetStore(out)
    store.check(teacher_hash="aaaaaaaaaaaaaaaa", label_sets={"species": ("Kea", "Tui", "Kaka")})
    with pytest.raises(TargetMismatchError, match="come from teacher aaaa"):
        store.check(teacher_hash="bbbbbbbbbbbbbbbb")
    with pytest.raises(TargetMismatchError, match=r"only in the student: \['Kiwi'\]"):
        store.check(label_sets={"species": ("Kea", "Tui", "Kaka", "Kiwi")})
    with pytest.raises(TargetMismatchError, match="other order"):
        store.check(label_sets={"species": ("Tui", "Kea", "Kaka")})
    with pytest.raises(TargetMismatchError, match="no task 'count'"):
        store.check(label_sets={"count": ("0", "1")})
    with pytest.raises(TargetMismatchError, match="come from teacher"):
        write_meta(out, _meta("bbbbbbbbbbbbbbbb"))
    with pytest.raises(TargetMismatchError, match="label set differs"):
        write_meta(out, _meta(tasks={"species": TaskLabels(("Kea", "Tui"))}))


def test_new_tasks_extend_the_store(tmp_path: Path) -> None:
    out = _store(tmp_path / "s")
    write_meta(out, _meta(tasks={"count": TaskLabels(("0", "1", "2"))}))
    store = TargetStore(out)
    assert set(store.meta.tasks) == {"species", "detection", "count"}


def test_damage_is_named(tmp_path: Path) -> None:
    out = _store(tmp_path / "s")
    part = next((out / "shards").glob("part-r0001-*.jsonl"))
    part.write_text(part.read_text().replace("Kea", "Kaka"))
    with pytest.raises(InputError, match="sha256 differs"):
        TargetStore(out).verify()
    (out / "shards" / "part-r0002-000000.jsonl").write_text(json.dumps(_row(5, "species")) + "\n")
    with pytest.raises(InputError, match="not in the index"):
        TargetStore(out).verify()
    bad = _row(9, "species")
    bad["scores"] = bad["scores"][:2]
    write_part(out, 3, 0, [bad])
    with pytest.raises(InputError, match="2 scores for the 3 labels"):
        TargetStore(out)


def test_missing_or_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="targets.json is missing"):
        TargetStore(tmp_path)
    (tmp_path / "targets.json").write_text(json.dumps({**_meta().to_dict(), "format": 99}))
    with pytest.raises(InputError, match="format 99"):
        TargetStore(tmp_path)


def test_duplicates_are_counted_not_doubled(tmp_path: Path) -> None:
    out = _store(tmp_path / "s")
    write_part(out, 5, 0, [_row(0, "species")])
    store = TargetStore(out)
    assert len(store) == 5 and store.duplicates == 1
    with pytest.raises(FileExistsError):
        write_part(out, 5, 0, [_row(1, "species")])


def test_partial_shard_files_are_ignored(tmp_path: Path) -> None:
    """A kill during a write leaves only a hidden temporary file, which is not a shard."""
    out = _store(tmp_path / "s")
    (out / "shards" / ".part-r0000-000002.jsonl.abc.tmp").write_text('{"id": "c9.spec')
    assert len(TargetStore(out)) == 5


def test_answer_text_matches_the_task_convention() -> None:
    from corpus.tasks import TASKS as CORPUS_TASKS

    assert answer_text({"Tui", "Kea"}) == CORPUS_TASKS["detection"].answer(["Tui", "Kea"])
    assert answer_text(set()) == "None"
