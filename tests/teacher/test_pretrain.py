"""Supervised encoder pretraining: targets per clip, a checkpoint `load_beats` reads, and an
encoder whose pooled features separate two easy classes better than at init."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.manifest import write_manifest
from corpus.records import Record
from runtime.errors import ManifestError
from teacher.beats import BEATs, load_beats
from teacher.config import teacher_config
from teacher.pretrain import clip_targets, pretrain_encoder

SPECIES = ("Kea", "Tui")
RATE = 16000
CLIP_S = 1.0


def _clip(species: int, rng: np.random.Generator) -> np.ndarray:
    """Noise plus tone bursts: 800 Hz for Kea, 4 kHz for Tui, at a random level and time."""
    t = np.arange(int(RATE * CLIP_S)) / RATE
    freq = 800.0 if species == 0 else 4000.0
    start = rng.uniform(0.0, 0.5)
    burst = ((t > start) & (t < start + 0.4)).astype(np.float64)
    tone = rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * freq * t) * burst
    return (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def _corpus(root: Path, per_class: dict[str, int]) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(0)
    records: list[Record] = []
    index = 0
    for split, n in per_class.items():
        for _ in range(n):
            for species, name in enumerate(SPECIES):
                path = root / f"clip{index:03d}.wav"
                sf.write(path, _clip(species, rng), RATE)
                common = {"file_name": str(path), "split": split, "duration_s": CLIP_S}
                records.append(Record(id=f"c{index}.species", task="species", instruction="q",
                                      output=name, labels=SPECIES, **common))
                records.append(Record(id=f"c{index}.detection", task="detection",
                                      instruction="q", output=name,
                                      labels=(*SPECIES, "None"), **common))
                index += 1
    manifest = root / "manifest.jsonl"
    write_manifest(records, manifest)
    return manifest


def _fisher(model: BEATs, waves: torch.Tensor, classes: torch.Tensor) -> float:
    """Between-class distance of pooled features over their within-class spread."""
    with torch.no_grad():
        pooled = model.eval()(waves)[0].mean(dim=1)
    a, b = pooled[classes == 0], pooled[classes == 1]
    between = float((a.mean(0) - b.mean(0)).pow(2).sum())
    within = float(a.var(0).sum() + b.var(0).sum())
    return between / within


def test_clip_targets_groups_tasks_and_multi_hot() -> None:
    common = {"instruction": "q", "file_name": "a.wav"}
    clips, heads = clip_targets([
        Record(id="a.s", task="species", output="Tui", labels=SPECIES, **common),
        Record(id="a.d", task="detection", output="Tui, Kea", labels=(*SPECIES, "None"),
               **common),
        Record(id="b.d", task="detection", output="None", labels=(*SPECIES, "None"),
               instruction="q", file_name="b.wav"),
    ])
    assert [c.record.file_name for c in clips] == ["a.wav", "b.wav"]
    assert clips[0].targets == {"species": 1, "detection": (0, 1)}
    assert clips[1].targets == {"detection": (2,)}
    assert heads["detection"].multi_label and not heads["species"].multi_label


def test_answer_outside_labels_raises() -> None:
    bad = Record(id="x.s", task="species", instruction="q", output="Moa", labels=SPECIES,
                 file_name="x.wav")
    with pytest.raises(ManifestError, match="'Moa' is not among its labels"):
        clip_targets([bad])


def test_unknown_preset_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown teacher preset"):
        pretrain_encoder(tmp_path / "none.jsonl", tmp_path / "out.pt", preset="huge")


def test_pretrained_encoder_loads_and_separates_classes(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    import soundfile as sf

    manifest = _corpus(tmp_path, {"train": 12, "valid": 6})
    out = tmp_path / "beats.pt"
    assert pretrain_encoder(manifest, out, epochs=6, batch_size=8, lr=3e-3, warmup_steps=3,
                            clip_s=CLIP_S, seed=0) == 0
    assert "species acc" in capsys.readouterr().out

    trained = load_beats(out)
    cfg = teacher_config("tiny").encoder
    assert trained.cfg == cfg
    torch.manual_seed(0)
    initial = BEATs(cfg)  # the same seed and order pretrain_encoder builds the encoder with
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["pretrain"]["tasks"]["species"] == list(SPECIES)
    assert checkpoint["pretrain"]["pooling"] == "mean"  # the default
    assert checkpoint["pretrain"]["history"][-1]["species"] == 1.0

    files = sorted(tmp_path.glob("clip*.wav"))[-12:]  # the validation clips
    waves = torch.stack([torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files])
    classes = torch.tensor([i % 2 for i in range(len(files))])
    assert _fisher(trained, waves, classes) > 2.0 * _fisher(initial, waves, classes)


def test_encode_fbank_is_forward_after_preprocess() -> None:
    torch.manual_seed(0)
    model = BEATs(teacher_config("tiny").encoder).eval()
    wave = 0.1 * torch.randn(2, 16000)
    with torch.no_grad():
        direct, _ = model(wave)
        cached, _ = model.encode_fbank(model.preprocess(wave))
    assert torch.equal(direct, cached)


def test_roll_time_rotates_each_clip_on_its_own() -> None:
    from teacher.pretrain import roll_time

    feats = torch.arange(4 * 50 * 3, dtype=torch.float32).view(4, 50, 3)
    rolled = roll_time(feats, torch.Generator().manual_seed(0))
    shifts = []
    for clip, out in zip(feats, rolled, strict=True):
        shift = next(s for s in range(50) if torch.equal(torch.roll(clip, s, dims=0), out))
        shifts.append(shift)
    assert len(set(shifts)) > 1  # not one shift for the whole batch


def test_extra_manifests_are_trained_whole_and_may_not_share_clips(tmp_path: Path) -> None:
    from teacher.pretrain import pretraining_records

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    main = _corpus(tmp_path / "a", {"train": 2, "valid": 1})
    extra = _corpus(tmp_path / "b", {"train": 1, "valid": 1, "test": 1})  # same record ids
    records, added = pretraining_records(main, [extra], "train")
    assert {r.split for r in records} == {"train", "valid"}
    assert len(added) == 2 * 3 * 2 and {r.split for r in added} == {"train"}
    assert {r.id for r in added} <= {r.id for r in records} | {f"c{i}.{t}" for i in range(6)
                                                               for t in ("species", "detection")}
    with pytest.raises(ManifestError, match=r"also holds: the extra manifests must hold other"):
        pretraining_records(main, [main], "train")
    with pytest.raises(ManifestError, match=str(extra)):
        pretraining_records(main, [extra, extra], "train")


def test_cli_pretrain_with_an_extra_corpus(tmp_path: Path) -> None:
    from naturelm_edge.cli import main as cli

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    main = _corpus(tmp_path / "a", {"train": 2, "valid": 1})
    extra = _corpus(tmp_path / "b", {"train": 1, "test": 1})
    out = tmp_path / "enc.pt"
    assert cli(["teacher", "pretrain", str(main), str(out), "--epochs", "1", "--batch-size",
                "4", "--clip-s", str(CLIP_S), "--extra-manifests", str(extra),
                "--pooling", "meanmax"]) == 0
    info = torch.load(out, weights_only=True)["pretrain"]
    assert info["pooling"] == "meanmax"
    assert info["train_clips"] == 2 * 2 + 2 * 2  # main's train clips + every extra clip
    assert info["extra_manifests"] == [str(extra)]
    assert [h["epoch"] for h in info["history"]] == [1.0]


def test_pooling_mean_or_mean_and_max_of_the_tokens() -> None:
    from teacher.pretrain import build_pretrain_model, clip_targets

    _, heads = clip_targets([Record(id="a.s", task="species", instruction="", output="Kea",
                                    labels=SPECIES, file_name="a.wav")])
    cfg = teacher_config("tiny").encoder
    fbank = torch.randn(3, 200, cfg.num_mel_bins)
    width = cfg.encoder_embed_dim
    torch.manual_seed(0)
    both = build_pretrain_model(cfg, heads, "meanmax").eval()
    torch.manual_seed(0)
    mean = build_pretrain_model(cfg, heads).eval()  # mean by default
    with torch.no_grad():
        tokens, _ = both.beats.encode_fbank(fbank)
        pooled, logits = both(fbank)
        mean_pooled, _ = mean(fbank)
    assert pooled.shape == (3, 2 * width) and logits["species"].shape == (3, len(SPECIES))
    torch.testing.assert_close(pooled, torch.cat([tokens.mean(1), tokens.amax(1)], -1))
    torch.testing.assert_close(mean_pooled, tokens.mean(1))  # same seed, same encoder
    with pytest.raises(ValueError, match="unknown pooling 'sum'; known: mean, meanmax"):
        build_pretrain_model(cfg, heads, "sum")


def test_a_device_that_is_not_there_is_refused_before_any_work(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, {"train": 1})
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pretrain_encoder(manifest, tmp_path / "enc.pt", pooling="max")
    with pytest.raises(ValueError, match="unknown torch device 'gpu0'"):
        pretrain_encoder(manifest, tmp_path / "enc.pt", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            pretrain_encoder(manifest, tmp_path / "enc.pt", device="cuda")
    assert not (tmp_path / "enc.pt").exists()


@pytest.mark.cuda
def test_pretraining_on_cuda_writes_a_cpu_checkpoint(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, {"train": 4, "valid": 2})
    out = tmp_path / "enc.pt"
    assert pretrain_encoder(manifest, out, epochs=2, batch_size=4, clip_s=CLIP_S,
                            device="cuda") == 0
    state = torch.load(out, weights_only=True)
    assert all(v.device.type == "cpu" for v in state["model"].values())
    assert 0.0 <= state["pretrain"]["history"][-1]["species"] <= 1.0
    assert load_beats(out).cfg == teacher_config("tiny").encoder
