"""TeacherModule / TeacherDataModule: schedule, data pipeline, a short fit, and checkpoints that
rebuild the same teacher from the file alone (through `load_teacher` and the CLI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch

from corpus.manifest import write_manifest
from corpus.records import Record
from corpus.tasks import TASKS, instruction_for
from runtime.errors import InputError
from teacher.checkpoint import load_teacher, read_checkpoint
from teacher.lightning import (
    ClipDataset,
    ClipGroupDataset,
    EncoderCache,
    TeacherDataModule,
    TeacherModule,
    fit_length,
    merge_overrides,
    mix_at_snr,
    task_balanced_weights,
    warmup_cosine,
)

RATE = 16000
CLIP_S = 2.0
SPECIES = ("Kea", "Tui")
# A test-sized teacher: the tiny preset, narrower still, on 2 s clips.
SMALL = {"clip_s": CLIP_S,
         "encoder": {"encoder_layers": 1},
         "qformer": {"num_layers": 1},
         "llm": {"num_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                 "num_heads": 2, "num_kv_heads": 1}}
# The same with the encoder frozen (the freeze policy and the frozen-encoder cache).
FROZEN = {**SMALL, "train_encoder": False}


def _call(species: str | None, rng: np.random.Generator, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    audio = 0.01 * rng.standard_normal(t.shape[0])
    if species == "Kea":  # rising chirps
        audio += 0.3 * np.sin(2 * np.pi * (2000 + 1500 * (t % 0.25) / 0.25) * t) * (t % 0.5 < 0.25)
    elif species == "Tui":  # low tone pulses
        audio += 0.3 * np.sin(2 * np.pi * 800 * t) * (t % 0.4 < 0.1)
    return audio.astype(np.float32)


def write_corpus(folder: Path, per_split: int = 2, seconds: float = 1.5) -> Path:
    """A real little corpus: tone/chirp calls, background-only clips, JSONL manifest."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for split in ("train", "valid", "test"):
        for i in range(per_split):
            for species in (*SPECIES, None):
                name = f"{split}-{species or 'bg'}-{i}"
                path = folder / f"{name}.wav"
                sf.write(path, _call(species, rng, seconds), RATE)
                present = [species] if species else []
                records.append(Record(
                    id=f"{name}-det", task="detection", instruction=instruction_for("detection"),
                    output=TASKS["detection"].answer(present), labels=(*SPECIES, "None"),
                    split=split, file_name=str(path)))
                if species:
                    records.append(Record(
                        id=f"{name}-sp", task="species", instruction=instruction_for("species"),
                        output=species, labels=SPECIES, split=split, file_name=str(path)))
    manifest = folder / "manifest.jsonl"
    write_manifest(records, manifest)
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _datamodule(manifest: Path, **kwargs: object) -> TeacherDataModule:
    return TeacherDataModule(str(manifest), batch_size=4, clip_s=CLIP_S, **kwargs)


def test_warmup_cosine_schedule() -> None:
    values = [warmup_cosine(s, 10, 110, 0.1) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(values[9:], values[10:], strict=False))
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_merge_overrides_is_recursive_and_strict() -> None:
    base = {"a": 1, "b": {"c": 2, "d": 3}}
    assert merge_overrides(base, {"b": {"c": 5}}) == {"a": 1, "b": {"c": 5, "d": 3}}
    assert base["b"]["c"] == 2
    with pytest.raises(KeyError, match=r"config\.b\.x is not a teacher config field"):
        merge_overrides(base, {"b": {"x": 1}})


def test_mix_at_snr_hits_the_requested_ratio() -> None:
    rng = np.random.default_rng(0)
    signal = _call("Kea", rng, 1.0)
    noise = rng.standard_normal(signal.shape[0]).astype(np.float32)
    mixed = mix_at_snr(signal, noise, 10.0)
    added = mixed - signal
    snr = 10 * np.log10(np.mean(signal.astype(np.float64) ** 2) / np.mean(added**2))
    assert snr == pytest.approx(10.0, abs=1e-3)
    assert np.all(np.isfinite(mix_at_snr(np.zeros(100, np.float32), noise[:100], 10.0)))


def test_fit_length_crops_and_pads() -> None:
    x = np.arange(10, dtype=np.float32)
    assert fit_length(x, 4, None).tolist() == [0, 1, 2, 3]
    crop = fit_length(x, 4, np.random.default_rng(1))
    assert crop.shape == (4,) and np.all(np.diff(crop) == 1)
    assert fit_length(x, 12, None).tolist() == [*range(10), 0, 0]


def test_batches_hold_exact_clips_and_answers(corpus: Path) -> None:
    dm = _datamodule(corpus, noise_prob=0.0, none_prob=0.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["audio"].shape == (4, int(CLIP_S * RATE))
    assert batch["audio"].dtype == torch.float32
    by_id = {r.id: r for r in dm.records}
    for i, rid in enumerate(batch["id"]):
        record = by_id[rid]
        assert batch["answer"][i] == record.output
        assert batch["instruction"][i] == record.instruction
        file_audio, _ = sf.read(record.file_name, dtype="float32")
        n = file_audio.shape[0]
        np.testing.assert_allclose(batch["audio"][i, :n].numpy(), file_audio, atol=1e-6)
        assert torch.all(batch["audio"][i, n:] == 0)


def test_detection_becomes_background_answered_none(corpus: Path) -> None:
    dm = _datamodule(corpus, noise_prob=0.0, none_prob=1.0)
    dataset = ClipDataset(dm.split("train"), RATE, CLIP_S, augment=True, none_prob=1.0,
                          backgrounds=dm.backgrounds())
    assert {r.output for r in dm.backgrounds()} == {"None"}
    for i, record in enumerate(dataset.records):
        item = dataset[i]
        if record.task == "detection":
            assert item["answer"] == "None"
            assert float(item["audio"].abs().max()) < 0.1  # background only, no call
        else:
            assert item["answer"] == record.output


def test_cache_keys_only_for_unaugmented_clips(corpus: Path) -> None:
    dm = _datamodule(corpus)
    records = dm.split("train")
    clean = ClipDataset(records, RATE, CLIP_S, augment=True, noise_prob=0.0)
    noisy = ClipDataset(records, RATE, CLIP_S, augment=True, noise_prob=1.0)
    assert all(clean[i]["cache_key"] is not None for i in range(len(records)))
    assert all(noisy[i]["cache_key"] is None for i in range(len(records)))
    same_clip = [clean[i]["cache_key"] for i, r in enumerate(records) if r.id.endswith("-0-sp")
                 or r.id.endswith("-0-det")]
    assert len(set(same_clip)) < len(same_clip)  # tasks of one clip share its key


def test_encoder_cache_gives_the_same_loss(corpus: Path) -> None:
    torch.manual_seed(0)
    module = TeacherModule(config=FROZEN, cache_encoder=True)
    dm = _datamodule(corpus, noise_prob=0.0, none_prob=0.0)
    module.build(_tokenizer(dm))
    model = module.model.eval()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        plain = model(batch["audio"], batch["instruction"], batch["answer"])
        first = module._loss(batch)
        n = len(module.encoder_cache)
        second = module._loss(batch)
    assert n == len(set(batch["cache_key"])) and len(module.encoder_cache) == n
    assert "forward" not in vars(model.beats)  # the encoder is itself again afterwards
    assert torch.allclose(first, plain, atol=1e-6)
    assert torch.allclose(second, plain, rtol=1e-3, atol=1e-3)  # features stored in fp16
    features = torch.randn(3, 4, 5)
    cache = EncoderCache(torch.float32)
    stub = type("Stub", (torch.nn.Module,), {"forward": lambda self, w: (w * 2, None)})()
    out, mask = cache.encode(stub, features, ["a", None, "b"])
    again, _ = cache.encode(stub, features + 1, ["a", "c", "b"])
    assert mask is None and torch.equal(out, features * 2)
    assert torch.equal(again[0], features[0] * 2) and torch.equal(again[1], (features[1] + 1) * 2)


def _tokenizer(dm: TeacherDataModule):  # noqa: ANN202
    from teacher.tokenizer import train_tokenizer

    return train_tokenizer(dm.tokenizer_texts(), 512)


def test_task_balanced_sampling(corpus: Path) -> None:
    dm = _datamodule(corpus, samples_per_epoch=4000)
    records = dm.split("train")
    weights = task_balanced_weights(records)
    share = {task: float(sum(w for w, r in zip(weights, records, strict=True) if r.task == task))
             for task in ("species", "detection")}
    assert share["species"] == pytest.approx(share["detection"])
    torch.manual_seed(0)
    indices = list(dm.train_dataloader().sampler)
    detection = sum(records[i].task == "detection" for i in indices) / len(indices)
    assert abs(detection - 0.5) < 0.05  # corpus proportion would be 0.6


def test_tokenizer_texts_cover_answers_and_labels(corpus: Path) -> None:
    texts = set(_datamodule(corpus).tokenizer_texts())
    assert {"Kea", "Tui", "None", instruction_for("species")} <= texts


def test_data_and_teacher_clip_must_agree(corpus: Path, tmp_path: Path) -> None:
    module = TeacherModule(config=SMALL)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="teacher expects 2.0 s"):
        trainer.fit(module, datamodule=TeacherDataModule(str(corpus), clip_s=3.0))


def _fit(corpus: Path, root: Path, steps: int) -> tuple[TeacherModule, Path]:
    pl.seed_everything(0)
    module = TeacherModule(config=FROZEN, lr=3e-3, warmup_steps=2)
    dm = _datamodule(corpus)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root, filename="teacher")
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                         callbacks=[checkpoint], enable_progress_bar=False,
                         gradient_clip_val=1.0, default_root_dir=root, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return module, root / "teacher.ckpt"


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TeacherModule, Path]:
    return _fit(corpus, tmp_path_factory.mktemp("fit"), steps=3)


def test_fit_trains_only_what_the_freeze_policy_allows(
        trained: tuple[TeacherModule, Path]) -> None:
    module, _ = trained
    assert not module.teacher_config.train_encoder
    named = dict(module.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups
                 for p in group["params"]}
    assert optimized == {id(named[n]) for n in trainable}
    encoder = _encoder_prefix(module)
    assert not any(n.startswith(encoder) for n in trainable)
    assert any(n.startswith("audio_qformer.") for n in trainable)
    assert any(n.startswith("audio_llama_proj.") for n in trainable)
    assert not module.model.beats.training  # a frozen encoder stays in eval mode


def _encoder_prefix(module: TeacherModule) -> str:
    for name, child in module.model.named_children():
        if type(child).__name__ == "BEATs":
            return name + "."
    raise AssertionError("the teacher has no BEATs child")


def test_checkpoint_rebuilds_the_same_teacher(trained: tuple[TeacherModule, Path],
                                              corpus: Path) -> None:
    module, path = trained
    checkpoint = read_checkpoint(path)
    assert checkpoint["hyper_parameters"]["config"] == module.teacher_config.to_dict()
    assert checkpoint["hyper_parameters"]["config"]["clip_s"] == CLIP_S
    teacher = load_teacher(path)
    live = module.model.eval()
    audio = torch.stack([torch.from_numpy(fit_length(_call(s, np.random.default_rng(5), 1.5),
                                                     int(CLIP_S * RATE), None))
                         for s in SPECIES])
    instructions = [instruction_for("species")] * 2
    with torch.inference_mode():
        assert torch.equal(teacher.encode_audio(audio), live.encode_audio(audio))
        assert torch.equal(teacher(audio, instructions, list(SPECIES)),
                           live(audio, instructions, list(SPECIES)))
        assert teacher.generate(audio, instructions, max_new_tokens=4) == \
            live.generate(audio, instructions, max_new_tokens=4)
    # and Lightning's own loader rebuilds the module around the embedded tokenizer
    again = TeacherModule.load_from_checkpoint(path)
    for (name, a), (_, b) in zip(again.model.state_dict().items(),
                                 live.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_teacher_names_the_problem(trained: tuple[TeacherModule, Path],
                                        tmp_path: Path) -> None:
    _, path = trained
    with pytest.raises(InputError, match="no such teacher checkpoint"):
        load_teacher(tmp_path / "missing.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["teacher_tokenizer"]
    torch.save(checkpoint, tmp_path / "no_tok.ckpt")
    with pytest.raises(InputError, match="lacks teacher_tokenizer"):
        load_teacher(tmp_path / "no_tok.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if "qformer" in k)
    checkpoint["state_dict"]["model.extra.weight"] = checkpoint["state_dict"].pop(key)
    torch.save(checkpoint, tmp_path / "mismatch.ckpt")
    with pytest.raises(InputError) as info:
        load_teacher(tmp_path / "mismatch.ckpt")
    assert key.removeprefix("model.") in str(info.value) and "extra.weight" in str(info.value)


def test_cli_fit_then_eval(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from teacher.cli import eval as teacher_eval
    from teacher.cli import fit

    root = tmp_path / "run"
    assert fit(["--config", "tiny", "--data.manifest", str(corpus), "--data.clip_s", "2.0",
                "--data.batch_size", "4", "--model.config", json.dumps(SMALL),
                "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(root)]) == 0
    assert (root / "teacher.ckpt").is_file()
    assert torch.get_num_threads() == 1  # the shipped tiny config's num_threads
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert teacher_eval(root / "teacher.ckpt", corpus, split="test", out=out, batch_size=4,
                        max_new_tokens=4) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["task", "n"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert set(rows) == {"species", "detection"}
    assert rows["species"][1] == "4" and rows["detection"][1] == "6"
    payload = json.loads(out.read_text())
    assert len(payload["predictions"]) == 10
    assert {"accuracy", "scored_accuracy", "majority"} <= set(payload["results"]["species"])
    assert {"macro_f1", "mAP"} <= set(payload["results"]["detection"])
    assert all(len(p["scores"]) in (2, 3) for p in payload["predictions"])
    # the same split as a BEANS-Zero parquet file scores the same
    from corpus.beans import write_beans_parquet
    from corpus.manifest import read_manifest

    parquet = tmp_path / "test.parquet"
    write_beans_parquet([r for r in read_manifest(corpus) if r.split == "test"], parquet)
    assert teacher_eval(root / "teacher.ckpt", parquet, split="test", out=tmp_path / "p.json",
                        batch_size=4, max_new_tokens=4) == 0
    again = json.loads((tmp_path / "p.json").read_text())
    for task, metrics in payload["results"].items():
        assert again["results"][task] == pytest.approx(metrics, abs=1e-4), task


def test_grouped_batches_hold_each_clip_once_with_all_its_tasks(corpus: Path) -> None:
    dm = _datamodule(corpus, noise_prob=0.0, none_prob=0.0, group_by_clip=True)
    records = dm.split("train")
    batch = next(iter(dm.train_dataloader()))
    assert batch["audio"].shape == (4, int(CLIP_S * RATE))  # batch_size counts clips
    assert len(set(batch["cache_key"])) == 4
    by_id = {r.id: r for r in records}
    for i, rid in enumerate(batch["id"]):
        record = by_id[rid]
        assert batch["answer"][i] == record.output and batch["task"][i] == record.task
        file_audio, _ = sf.read(record.file_name, dtype="float32")
        row = batch["audio"][batch["clip_index"][i]]
        np.testing.assert_allclose(row[:file_audio.shape[0]].numpy(), file_audio, atol=1e-6)
    for key in batch["cache_key"]:  # every task of a drawn clip comes along
        clip_tasks = {r.task for r in records if r.file_name == key.split("|")[0]}
        rows = [i for i, c in enumerate(batch["clip_index"]) if batch["cache_key"][c] == key]
        assert sorted(batch["task"][i] for i in rows) == sorted(clip_tasks)


def test_grouped_detection_background_is_an_extra_clip(corpus: Path) -> None:
    dm = _datamodule(corpus)
    dataset = ClipGroupDataset(dm.split("train"), RATE, CLIP_S, augment=True, none_prob=1.0,
                               backgrounds=dm.backgrounds())
    for i in range(len(dataset)):
        item = dataset[i]
        for example in item["examples"]:
            if example["task"] == "detection":
                assert example["answer"] == "None" and example["clip"] >= 1
                assert item["cache_key"][example["clip"]] is None
                assert float(item["clips"][example["clip"]].abs().max()) < 0.1
            else:
                assert example["clip"] == 0


@pytest.mark.parametrize("train_encoder", [False, True])
def test_grouped_loss_equals_the_per_example_loss(corpus: Path, train_encoder: bool) -> None:
    torch.manual_seed(0)
    module = TeacherModule(config={**SMALL, "train_encoder": train_encoder},
                           cache_encoder=not train_encoder)
    dm = _datamodule(corpus, noise_prob=0.0, none_prob=0.0, group_by_clip=True)
    module.build(_tokenizer(dm))
    model = module.model.eval()
    batch = next(iter(dm.train_dataloader()))
    calls = []
    hook = model.beats.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    grouped = module._loss(batch)
    hook.remove()
    if train_encoder:  # the encoder ran once, on the 4 clips, for all their examples
        assert calls == [4]
    else:  # the frozen encoder's cache encoded the 4 clips, once each
        assert calls == [4] and len(module.encoder_cache) == 4
    plain = model(batch["audio"][batch["clip_index"]], batch["instruction"], batch["answer"])
    assert torch.allclose(grouped, plain, atol=1e-5)
    assert "forward" not in vars(model.beats) and "encode_audio" not in vars(model)
    if train_encoder:
        grouped.backward()
        grads = [p.grad for p in model.beats.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_task_weights_reach_the_model(corpus: Path) -> None:
    for bad in (0.0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="task_weights must be finite and > 0"):
            TeacherModule(config=SMALL, task_weights={"species": bad})
    torch.manual_seed(0)
    module = TeacherModule(config=FROZEN, cache_encoder=True, task_weights={"species": 3.0})
    dm = _datamodule(corpus, noise_prob=0.0, none_prob=0.0, group_by_clip=True)
    module.build(_tokenizer(dm))
    model = module.model.eval()
    batch = next(iter(dm.train_dataloader()))
    batch["answer"][0] = "Kea, Tui, Kea, Tui"  # answers of different lengths
    audio = batch["audio"][batch["clip_index"]]
    weights = torch.tensor([3.0 if task == "species" else 1.0 for task in batch["task"]])
    assert 1.0 in weights and 3.0 in weights
    weighted = model(audio, batch["instruction"], batch["answer"], weights)
    assert not torch.allclose(weighted, model(audio, batch["instruction"], batch["answer"]))
    assert torch.allclose(module._loss(batch), weighted, atol=1e-5)


def test_fit_refuses_task_weights_for_tasks_the_data_lacks(corpus: Path, tmp_path: Path) -> None:
    module = TeacherModule(config=FROZEN, task_weights={"species": 2.0, "calltype": 2.0})
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"task_weights names tasks the data does not have: "
                                         r"\['calltype'\]"):
        trainer.fit(module, datamodule=_datamodule(corpus))
