"""`distill.label`: labelling with a tiny random teacher, cache against live, resume, DDP.

Also holds the fixtures the other distillation tests build on: a tiny corpus of short chirp
clips on disk (`make_corpus`) and a tiny teacher checkpoint (`make_teacher_checkpoint`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.manifest import write_manifest
from corpus.records import Record
from corpus.tasks import NONE_LABEL, TASKS, instruction_for
from distill.label import LabelModule, label, teacher_rows
from distill.targets import TargetMismatchError, TargetStore, done_keys, read_meta
from tests.teacher.helpers import chirps, tiny_config, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
SPECIES = ("Kea", "Tui", "Morepork")
CLIP_S = 2.0
# One CPU process; short answers (a random teacher never stops before max_new_tokens).
CPU = {"accelerator": "cpu", "devices": "1", "max_new_tokens": 4}


def make_corpus(folder: Path, clips: int = 6, seed: int = 0) -> Path:
    """``clips`` 2 s chirp clips as FLAC, a species and a detection record each; 2/3 train."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    audio = chirps(clips, CLIP_S, seed=seed).numpy()
    rng = np.random.default_rng(seed)
    records = []
    for i in range(clips):
        path = folder / f"clip{i:03d}.flac"
        sf.write(path, audio[i], 16000)
        focal = SPECIES[i % len(SPECIES)]
        present = [focal] if rng.random() < 0.8 else []
        split = ("train", "train", "valid", "test")[i % 4] if clips >= 4 else "train"
        for task, labels, answer in (
                ("species", SPECIES, focal),
                ("detection", (*SPECIES, NONE_LABEL), TASKS["detection"].answer(present))):
            records.append(Record(id=f"clip{i:03d}.{task}", task=task,
                                  instruction=instruction_for(task), output=answer,
                                  labels=labels, split=split, file_name=str(path),
                                  recording=f"rec{i}"))
    manifest = folder / "manifest.jsonl"
    write_manifest(records, manifest)
    return manifest


def make_teacher_checkpoint(path: Path, seed: int = 0, **changes: object) -> Path:
    """A teacher checkpoint (as `TeacherModule` writes it) of a random tiny NatureLM."""
    from teacher.config import config_hash
    from teacher.lightning import CONFIG_HASH_KEY, TOKENIZER_KEY
    from teacher.tokenizer import tokenizer_to_json

    cfg = tiny_config(clip_s=CLIP_S, **changes)
    model = tiny_model(seed, cfg)
    torch.save({"hyper_parameters": {"config": cfg.to_dict()},
                TOKENIZER_KEY: tokenizer_to_json(tiny_tokenizer()),
                CONFIG_HASH_KEY: config_hash(cfg),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), clips=4)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.ckpt")


@pytest.fixture(scope="module")
def labelled(corpus: Path, teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("targets") / "store"
    assert label(teacher_ckpt, corpus, out, batch_size=4, **CPU) == 0
    return out


def _rows_by_key(out: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for part in sorted((out / "shards").glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            row = json.loads(line)
            key = (row["id"], row["task"])
            assert key not in rows, f"duplicate target {key}"
            rows[key] = row
    return rows


def test_store_holds_every_record_with_teacher_hash(labelled: Path, corpus: Path,
                                                    teacher_ckpt: Path) -> None:
    from corpus.manifest import read_manifest
    from teacher.checkpoint import load_teacher
    from teacher.config import config_hash

    store = TargetStore(labelled)
    records = read_manifest(corpus)
    assert len(store) == len(records) and store.duplicates == 0
    assert store.teacher_hash == config_hash(load_teacher(teacher_ckpt).cfg)
    assert store.labels("detection") == (*SPECIES, NONE_LABEL)
    assert store.verify() == len(records)
    for r in records:
        target = store.get(r.id, r.task)
        assert target is not None and target.scores.shape == (len(r.labels),)
        assert np.isclose(np.exp(target.logprobs).sum(), 1.0)
        if r.task == "detection":
            assert target.probs is not None and ((0 <= target.probs) & (target.probs <= 1)).all()


def test_cached_targets_equal_live_teacher(labelled: Path, corpus: Path,
                                           teacher_ckpt: Path) -> None:
    """The EfficientAT lesson: the cache must be what the teacher says live, on a sample."""
    from corpus.manifest import read_manifest
    from teacher.checkpoint import load_teacher
    from teacher.lightning import load_clip

    model = load_teacher(teacher_ckpt)
    store = TargetStore(labelled)
    sample = read_manifest(corpus)[:4]
    for r in sample:
        audio = torch.from_numpy(load_clip(r, 16000)).unsqueeze(0)
        live_scores = model.score_labels(audio, [r.instruction], list(r.labels))[0]
        live_answer = model.generate(audio, [r.instruction], max_new_tokens=4)[0]
        cached = store.get(r.id, r.task)
        assert cached is not None and cached.answer == live_answer
        np.testing.assert_allclose(cached.scores, live_scores.double().numpy(), atol=1e-4)
        if r.task == "detection":
            live = teacher_rows(model, audio, [r], max_new_tokens=4)[0]
            np.testing.assert_allclose(cached.probs, live["probs"], atol=1e-4)


def test_detection_probs_follow_the_scores() -> None:
    """Marginals: a label's probability grows with the teacher's score of answering it."""
    from distill.targets import detection_candidates, marginal_probs

    labels = ("Kea", "Tui", "None")
    cands = detection_candidates(labels, ["Kea"])
    assert cands[:3] == [frozenset(["Kea"]), frozenset(["Tui"]), frozenset()]
    assert frozenset(["Kea", "Tui"]) in cands and len(set(cands)) == len(cands)
    scores = np.full(len(cands), -20.0)
    scores[0] = 0.0  # "Kea" alone is the teacher's answer
    probs = marginal_probs(cands, scores, labels)
    assert probs[0] > 0.99 and probs[1] < 0.01 and probs[2] < 0.01
    scores[cands.index(frozenset(["Kea", "Tui"]))] = 0.0  # now also "Kea, Tui"
    probs = marginal_probs(cands, scores, labels)
    np.testing.assert_allclose(probs, [1.0, 0.5, 0.0], atol=1e-6)


def test_resume_after_partial_run_has_no_duplicates(corpus: Path, teacher_ckpt: Path,
                                                    labelled: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.label as label_module

    out = tmp_path / "store"
    real_write = label_module.write_part
    calls = []

    def dies_on_third_shard(*args: object, **kwargs: object) -> Path:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(label_module, "write_part", dies_on_third_shard)
    with pytest.raises(RuntimeError, match="killed"):  # one clip (two tasks) per shard
        label(teacher_ckpt, corpus, out, batch_size=1, **CPU)
    monkeypatch.setattr(label_module, "write_part", real_write)
    assert len(done_keys(out)) == 4 and not (out / "index.json").exists()
    label(teacher_ckpt, corpus, out, batch_size=1, **CPU)
    rows = _rows_by_key(out)  # asserts no duplicates
    full = TargetStore(labelled)
    assert sorted(rows) == full.keys()
    for key, row in rows.items():
        np.testing.assert_allclose(row["scores"], full.get(*key).scores, atol=1e-4)
    # Nothing left: a third run writes no shard.
    before = sorted((out / "shards").iterdir())
    label(teacher_ckpt, corpus, out, batch_size=4, **CPU)
    assert sorted((out / "shards").iterdir()) == before


def test_store_of_another_teacher_is_refused(corpus: Path, labelled: Path,
                                             tmp_path: Path) -> None:
    other = make_teacher_checkpoint(tmp_path / "other.ckpt", seed=1, end_token="<|end_of_text|>")
    with pytest.raises(TargetMismatchError, match="targets come from teacher"):
        label(other, corpus, labelled, **CPU)
    store = TargetStore(labelled)
    with pytest.raises(TargetMismatchError, match="not 0000"):
        store.check(teacher_hash="0000000000000000")


def test_label_module_predicts_rows_in_batch_order() -> None:
    model = tiny_model()
    recs = [Record(id=f"c{i}", task="species", instruction=instruction_for("species"),
                   output="Kea", labels=SPECIES) for i in range(2)]
    from distill.label import _plain

    rows = LabelModule(model, max_new_tokens=4).predict_step({"audio": chirps(2, 1.0),
                                            "records": [_plain(r) for r in recs],
                                            "cut_s": [0.0, 0.5]}, 0)
    assert [r["id"] for r in rows] == ["c0", "c1"] and rows[1]["cut_s"] == 0.5


def test_no_resume_refuses_existing_store(corpus: Path, teacher_ckpt: Path,
                                          labelled: Path) -> None:
    from runtime.errors import InputError

    with pytest.raises(InputError, match="already holds targets"):
        label(teacher_ckpt, corpus, labelled, resume=False, **CPU)
    assert read_meta(labelled).tasks["species"].labels == SPECIES


@pytest.mark.slow
def test_two_process_ddp_writes_the_same_targets(corpus: Path, teacher_ckpt: Path,
                                                 labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    script = tmp_path / "run_label.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        torch.set_num_threads(1)
        from distill.label import label
        label({str(teacher_ckpt)!r}, {str(corpus)!r}, {str(out)!r}, batch_size=2,
              accelerator="cpu", devices="2", strategy="ddp", max_new_tokens=4)
    """))
    env = {**os.environ, "PL_DISABLE_FORK": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {p.name[6:10] for p in (out / "shards").glob("part-*.jsonl")}
    assert ranks == {"0000", "0001"}
    rows = _rows_by_key(out)
    single = TargetStore(labelled)
    assert sorted(rows) == single.keys()
    for key, row in rows.items():
        assert row["answer"] == single.get(*key).answer
        np.testing.assert_allclose(row["scores"], single.get(*key).scores, atol=1e-4)
    assert TargetStore(out).verify() == len(rows)


def test_clip_tasks_share_one_encoding_and_match_labelling_each_record_alone() -> None:
    model = tiny_model(seed=2)
    audio = chirps(2, 1.0, seed=3)
    recs = [Record(id=f"c{c}.{task}", task=task, instruction=instruction_for(task),
                   output="Kea", labels=labels)
            for c in range(2) for task, labels in (("species", SPECIES),
                                                   ("detection", (*SPECIES, NONE_LABEL)))]
    index = [0, 0, 1, 1]
    encoded = []
    real_encode = model.encode_audio

    def counting_encode(wave: torch.Tensor, **kwargs: object) -> torch.Tensor:
        encoded.append(wave.shape[0])
        return real_encode(wave, **kwargs)

    model.encode_audio = counting_encode  # type: ignore[method-assign]
    rows = teacher_rows(model, audio, recs, max_new_tokens=4, audio_index=index)
    assert encoded == [2], "each clip is encoded once for all of its tasks"
    assert [r["id"] for r in rows] == [r.id for r in recs]
    for row, rec, clip in zip(rows, recs, index, strict=True):
        alone = teacher_rows(model, audio[clip:clip + 1], [rec], max_new_tokens=4)[0]
        assert row["answer"] == alone["answer"]
        np.testing.assert_allclose(row["scores"], alone["scores"], atol=1e-4)
        if rec.task == "detection":
            np.testing.assert_allclose(row["probs"], alone["probs"], atol=1e-4)
    with pytest.raises(ValueError, match="audio_index must give"):
        teacher_rows(model, audio, recs, max_new_tokens=4, audio_index=[0, 0, 1, 2])


def test_label_batches_are_clips_with_all_their_pending_tasks(corpus: Path) -> None:
    from corpus.manifest import read_manifest
    from distill.label import LabelDataset, _collate, group_by_clip

    records = read_manifest(corpus)
    groups = group_by_clip(records)
    assert [len(g) for g in groups] == [2] * 4
    assert all(len({r.file_name for r in g}) == 1 for g in groups)
    dataset = LabelDataset(records[1:], 16000, CLIP_S)  # first clip's species already done
    assert len(dataset) == 4 and len(dataset[0]["records"]) == 1
    batch = _collate([dataset[0], dataset[1]])
    assert batch["audio"].shape == (2, int(CLIP_S * 16000))
    assert batch["audio_index"] == [0, 1, 1]
    assert [r["id"] for r in batch["records"]] == [r.id for r in records[1:4]]
    in_memory = [Record(id=f"m{i}", task="species", instruction=instruction_for("species"),
                        output="Kea", labels=SPECIES, audio=np.zeros(10, np.float32),
                        sample_rate=16000) for i in range(2)]
    assert len(group_by_clip(in_memory)) == 2  # in-memory audio: one clip per record


def test_label_threads_are_set_while_labelling_and_restored(corpus: Path, teacher_ckpt: Path,
                                                            labelled: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import distill.label as label_module

    seen = []
    real_rows = label_module.teacher_rows

    def recording_rows(*args: object, **kwargs: object) -> list:
        seen.append(torch.get_num_threads())
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(label_module, "teacher_rows", recording_rows)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        label(teacher_ckpt, corpus, labelled.parent / "threads", batch_size=4, **CPU)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        label(teacher_ckpt, corpus, labelled, num_threads=-1, **CPU)
