"""`distill.lightning`: clip grouping, masking and counting, mixing, metrics, a few KD steps,
refusal of foreign targets, and the checkpoint rebuilt from the file alone."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from corpus.manifest import read_manifest
from distill.lightning import (
    StudentDataModule,
    StudentModule,
    evaluate,
    group_clips,
    hard_label,
    mix_batch,
    mix_presence,
    summarize,
    task_counts,
)
from distill.targets import (
    TargetMeta,
    TargetMismatchError,
    TaskLabels,
    write_index,
    write_meta,
    write_part,
)

TEACHER_HASH = "feedfacefeedface"
TINY = {"width_mult": 0.1, "n_blocks": 3, "embedding_dim": 16}


def make_store(manifest: Path, out: Path, teacher_hash: str = TEACHER_HASH,
               drop: frozenset[str] = frozenset(), seed: int = 0) -> Path:
    """A target store for ``manifest`` written without a teacher: scores that favour the ground
    truth (as a trained teacher would), one shard per record; ``drop`` ids get no target."""
    from teacher.lightning import is_multi_label

    rng = np.random.default_rng(seed)
    records = read_manifest(manifest)
    tasks = {r.task: TaskLabels(r.labels, is_multi_label(r.task)) for r in records}
    write_meta(out, TargetMeta(teacher_hash, {"preset": "tiny"}, tasks, 16000, 2.0))
    for i, r in enumerate(x for x in records if x.id not in drop):
        truth = hard_label(r, r.labels, is_multi_label(r.task)).numpy()
        row = {"id": r.id, "task": r.task, "answer": r.output}
        if is_multi_label(r.task):
            probs = np.clip(truth * 0.9 + 0.05 + rng.uniform(-0.04, 0.04, truth.shape), 0, 1)
            row["scores"] = [float(x) for x in np.log(probs)]
            row["probs"] = [float(x) for x in probs]
        else:
            scores = rng.normal(-6.0, 1.0, len(r.labels))
            scores[int(truth)] = -0.2
            row["scores"] = [float(x) for x in scores]
        write_part(out, 0, i, [row])
    write_index(out)
    return out


def test_clips_group_records_by_audio(corpus: Path) -> None:
    clips = group_clips(read_manifest(corpus))
    assert len(clips) == 8 and all(set(c.records) == {"species", "detection"} for c in clips)


def test_missing_targets_are_masked_and_counted(corpus: Path, tmp_path: Path) -> None:
    records = read_manifest(corpus)
    dropped = frozenset(r.id for r in records if r.split == "train" and r.task == "species")
    out = make_store(corpus, tmp_path / "partial", drop=dropped)
    data = StudentDataModule(str(corpus), str(out), batch_size=2)
    loader = data.train_dataloader()
    assert data.missing == {"train/species": len(dropped)}
    assert len(loader.dataset) == 4  # every train clip is kept
    items = [loader.dataset[i] for i in range(len(loader.dataset))]
    assert not any(bool(x["targets"]["species"]["mask"]) for x in items)
    assert all(bool(x["targets"]["detection"]["mask"]) for x in items)
    assert all(int(x["targets"]["species"]["hard"]) >= 0 for x in items)  # truth still trains


def test_student_refuses_targets_of_another_teacher_or_labels(corpus: Path, store: Path,
                                                              tmp_path: Path) -> None:
    with pytest.raises(TargetMismatchError, match="come from teacher"):
        StudentModule(str(store), config=TINY, teacher_hash="0" * 16)
    other = make_store(corpus, tmp_path / "other", teacher_hash="1" * 16)
    module = StudentModule(str(store), config=TINY)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(TargetMismatchError, match="come from teacher 1111111111111111, not feedface"):
        trainer.fit(module, datamodule=StudentDataModule(str(corpus), str(other), batch_size=2))
    # A manifest whose label set differs from the targets' is refused too.
    import json

    lines = corpus.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    for row in rows:
        if row["task"] == "species":
            row["labels"] = [*row["labels"], "Kiwi"]
    changed = tmp_path / "manifest.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TargetMismatchError, match="Kiwi"):
        StudentDataModule(str(changed), str(store)).clips("train")


def test_mixing_keeps_unmixed_rows_and_mixes_targets() -> None:
    audio = torch.randn(4, 100)
    logp = torch.log_softmax(torch.randn(4, 3), -1)
    probs = torch.rand(4, 4)
    targets = {"species": {"teacher": logp, "mask": torch.tensor([True, True, True, False]),
                           "hard": torch.tensor([0, 1, 2, -1])},
               "detection": {"teacher": probs, "mask": torch.ones(4, dtype=torch.bool),
                             "hard": torch.tensor([[1., 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0],
                                                   [0, 0, 1, 0]])}}
    multi, none = {"species": False, "detection": True}, {"species": None, "detection": 3}
    same, out = mix_batch(audio, targets, multi, none, mix_prob=0.0)
    assert torch.equal(same, audio) and torch.allclose(out["species"]["teacher"], logp)
    gen = torch.Generator().manual_seed(0)
    mixed, out = mix_batch(audio, targets, multi, none, mix_prob=1.0, generator=gen)
    assert not torch.equal(mixed, audio)
    assert torch.allclose(out["species"]["teacher"].exp().sum(-1), torch.ones(4))
    assert not bool(out["species"]["mask"][3])
    union = mix_presence(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]]), 2)
    assert union.tolist() == [[1.0, 0.0, 0.0]]  # "None" holds only when both clips are empty


def test_task_counts_agreement_and_accuracy() -> None:
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    target = {"teacher": torch.tensor([[0.0, -5.0], [0.0, -5.0], [0.0, -5.0]]),
              "mask": torch.tensor([True, True, False]), "hard": torch.tensor([0, 0, 0])}
    c = {k: int(v) for k, v in task_counts(logits, target, multi_label=False).items()}
    assert c == {"agree": 1, "with_target": 2, "correct": 1, "teacher_correct": 2,
                 "with_truth": 2, "student_right": 0, "teacher_right": 1, "neither_right": 0}


def test_task_counts_split_disagreements_by_who_is_right() -> None:
    """Student and teacher differ on clips 0-2 (student right, teacher right, neither), agree
    on clip 3, and clip 4 has no ground truth: it counts for agreement, not for who is right."""
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0], [0, 3.0, 0]])
    teacher = torch.log_softmax(torch.tensor(
        [[0, 3.0, 0], [3.0, 0, 0], [3.0, 0, 0], [3.0, 0, 0], [3.0, 0, 0]]), -1)
    target = {"teacher": teacher, "mask": torch.ones(5, dtype=torch.bool),
              "hard": torch.tensor([0, 0, 1, 0, -1])}
    c = {k: int(v) for k, v in task_counts(logits, target, multi_label=False).items()}
    assert (c["agree"], c["with_target"], c["with_truth"]) == (1, 5, 4)
    assert (c["student_right"], c["teacher_right"], c["neither_right"]) == (1, 1, 1)
    # Multi-label: an exact-set disagreement on the first clip, where the student's set is right.
    logits = torch.tensor([[3.0, -3.0], [3.0, 3.0]])
    target = {"teacher": torch.tensor([[0.9, 0.9], [0.9, 0.9]]),
              "mask": torch.ones(2, dtype=torch.bool), "hard": torch.tensor([[1, 0], [0, 1]])}
    c = {k: int(v) for k, v in task_counts(logits, target, multi_label=True).items()}
    assert (c["agree"], c["student_right"], c["teacher_right"], c["neither_right"]) == (1, 1, 0, 0)
    totals = summarize({"species": {k: float(v) for k, v in c.items()}})["species"]
    assert totals["student_right"] == 1.0 and totals["neither_right"] == 0.0


def test_a_channels_last_backbone_computes_what_the_contiguous_one_does(store: Path) -> None:
    """The CPU training layout (`StudentModule.configure_model`) changes speed, not results."""
    torch.manual_seed(0)
    module = StudentModule(str(store), config=TINY)
    audio = torch.randn(3, 32000)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        module.model.backbone.to(memory_format=layout)
        module.model.zero_grad()
        torch.manual_seed(1)  # the same dropout mask
        out = module.model(audio)
        sum(v.square().mean() for v in out.values()).backward()
        results.append(({k: v.detach() for k, v in out.items()},
                        {n: p.grad.clone() for n, p in module.model.named_parameters()}))
    (out_a, grad_a), (out_b, grad_b) = results
    for key in out_a:
        torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-4, atol=1e-5)
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-3, atol=1e-5)


def test_a_few_kd_steps_learn_and_checkpoint_rebuilds(corpus: Path, store: Path,
                                                      tmp_path: Path) -> None:
    from distill.checkpoint import load_student, teacher_hash_of

    pl.seed_everything(0)
    module = StudentModule(str(store), config=TINY, lr=5e-3, warmup_steps=1, mix_prob=0.5)
    data = StudentDataModule(str(corpus), str(store), batch_size=4, noise_prob=0.5)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False,
                         default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=1, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=data)
    changed = [k for k, v in module.model.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed
    convs = [m.weight for m in module.model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert "val/agreement" in trainer.callback_metrics
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    model, cfg = load_student(path)
    assert cfg == module.student_config and teacher_hash_of(path) == TEACHER_HASH
    audio = torch.randn(2, 32000)
    module.model.eval()
    with torch.no_grad():
        for key, value in module.model(audio).items():
            torch.testing.assert_close(model(audio)[key], value)
    rates = evaluate(model, data.eval_dataloader("valid"), {"species": False, "detection": True})
    assert set(rates) == {"species", "detection"}
    assert all(0.0 <= r["agreement"] <= 1.0 for r in rates.values())
