"""`naturelm-edge corpus convert` end to end, through the console script's table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from corpus.beans import write_beans_parquet
from corpus.convert import file_stem
from corpus.manifest import read_manifest, write_manifest
from corpus.records import Record
from corpus.splits import leaking_groups
from corpus.tasks import instruction_for
from naturelm_edge.cli import main
from runtime.audio import read_audio
from runtime.raven import Selection, write_raven_table


def _class_folders(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for label in ("Kea", "Tui", "Weka"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            sf.write(root / label / f"{i}.flac",
                     (0.1 * rng.standard_normal(1600)).astype(np.float32), 16000)
    return root


def test_class_folders_to_manifest_with_splits(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    source = _class_folders(tmp_path / "src")
    assert main(["corpus", "convert", str(source), str(tmp_path / "out"), "--fractions", "0.6",
                 "0.2", "0.2", "--seed", "4", "--dataset-name", "birds"]) == 0
    assert "wrote 18 records" in capsys.readouterr().out
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert len(records) == 18 and leaking_groups(records) == {}
    counts = {s: sum(r.split == s for r in records) for s in ("train", "valid", "test")}
    assert counts == {"train": 11, "valid": 4, "test": 3} or min(counts.values()) >= 3
    assert {r.dataset_name for r in records} == {"birds"}
    assert {r.labels for r in records} == {("Kea", "Tui", "Weka")}
    assert all(Path(r.file_name).is_file() for r in records)
    # Same seed, same manifest bytes.
    main(["corpus", "convert", str(source), str(tmp_path / "again.jsonl"), "--fractions", "0.6",
          "0.2", "0.2", "--seed", "4", "--dataset-name", "birds"])
    first = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["split"] for r in first] == [r["split"] for r in again]


def _beans_file(path: Path) -> list[Record]:
    rng = np.random.default_rng(1)
    records = [Record(id=f"enabirds/clip {i}", task="detection",
                      instruction=instruction_for("detection"),
                      output=("Blue Jay" if i % 2 else "None"), dataset_name="enabirds",
                      split="test", audio=(0.2 * rng.standard_normal(3200)).astype(np.float32),
                      sample_rate=32000, recording=f"soundscape{i // 3}.flac")
               for i in range(12)]
    write_beans_parquet(records, path, batch_rows=5)
    return records


def test_beans_parquet_extracts_audio_and_assigns_splits_by_recording(tmp_path: Path) -> None:
    source = tmp_path / "shard.parquet"
    original = _beans_file(source)
    assert main(["corpus", "convert", str(source), str(tmp_path / "out")]) == 0
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [r.id for r in records] == [r.id for r in original]
    assert leaking_groups(records) == {}
    assert len({r.split for r in records}) > 1  # all-"test" source: splits were assigned
    for record, source_record in zip(records, original, strict=True):
        assert record.file_name == str((tmp_path / "out" / "audio" /
                                        f"{file_stem(record.id)}.wav").resolve())
        assert record.recording == source_record.recording and record.audio is None
        samples, rate = sf.read(record.file_name, dtype="float32")
        assert rate == 32000
        np.testing.assert_array_equal(samples, source_record.audio)
        assert record.labels == ("Blue Jay", "None") and record.output == source_record.output

    assert main(["corpus", "convert", str(source), str(tmp_path / "kept.csv"), "--splits",
                 "keep", "--audio-format", "flac"]) == 0
    kept = read_manifest(tmp_path / "kept.csv")
    assert {r.split for r in kept} == {"test"}
    decoded = read_audio(kept[0].file_name, target_rate=None)
    np.testing.assert_allclose(decoded, original[0].audio, atol=2.0 ** -22)


def test_raven_table_to_detection_manifest(tmp_path: Path, real_recording: Path) -> None:
    shutil.copy(real_recording, tmp_path / "dawn.wav")
    write_raven_table(tmp_path / "dawn.Table.1.selections.txt", [
        Selection(0.5, 1.5, annotations={"Annotation": "Song Sparrow"}),
        Selection(6.0, 7.0, annotations={"Annotation": "Blue Jay"})])
    assert main(["corpus", "convert", str(tmp_path / "dawn.Table.1.selections.txt"),
                 str(tmp_path / "out"), "--clip-s", "5", "--min-overlap-s", "0.2"]) == 0
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    detection = [(r.offset_s, r.output) for r in records if r.task == "detection"]
    assert detection == [(0.0, "Song Sparrow"), (5.0, "Blue Jay"), (10.0, "None")]
    # One recording is one group: every window lands in the same split.
    assert len({r.split for r in records}) == 1


def test_manifest_source_keeps_its_splits_and_names_missing_audio(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], real_recording: Path) -> None:
    rows = [Record(id=f"c{i}", task="species", instruction=instruction_for("species"),
                   output="Kea", labels=("Kea",), file_name=str(real_recording),
                   offset_s=float(i), duration_s=1.0, split=("train", "valid", "test")[i % 3],
                   recording=f"r{i}") for i in range(6)]
    write_manifest(rows, tmp_path / "in.jsonl")
    assert main(["corpus", "convert", str(tmp_path / "in.jsonl"), str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out" / "manifest.jsonl") == rows

    write_manifest([*rows, Record(id="gone", task="species", instruction="q", output="Kea",
                                  file_name=str(tmp_path / "gone.wav"))], tmp_path / "bad.jsonl")
    capsys.readouterr()
    assert main(["corpus", "convert", str(tmp_path / "bad.jsonl"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "gone.wav: audio not found (referenced by" in err and "bad.jsonl, record 'gone'" in err
    assert not (tmp_path / "o2" / "manifest.jsonl").exists()


def test_bad_sources_and_options_fail_with_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    source = _class_folders(tmp_path / "src", per_class=2)
    assert main(["corpus", "convert", str(source), str(tmp_path / "o"), "--clip-s", "5"]) == 2
    assert "folders source; the option(s) clip_s do not apply" in capsys.readouterr().err
    assert main(["corpus", "convert", str(source), str(tmp_path / "o"), "--task", "colour"]) == 2
    assert "unknown task 'colour'" in capsys.readouterr().err
    assert main(["corpus", "convert", str(source), str(tmp_path / "o"), "--fractions",
                 "0.5", "0.6", "0.1"]) == 2
    assert "must sum to 1" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("just text\n")
    assert main(["corpus", "convert", str(tmp_path / "notes.txt"), str(tmp_path / "o")]) == 2
    assert "notes.txt: unknown source" in capsys.readouterr().err
    assert main(["corpus", "convert", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "nothing: source not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_file_stem_is_safe_and_unique() -> None:
    assert file_stem("clip_01") == "clip_01"
    a, b = file_stem("a/b c"), file_stem("a_b_c")
    assert a.startswith("a_b_c-") and b == "a_b_c" and a != b
    assert "/" not in file_stem("../../etc/passwd")


def test_read_records_picks_the_reader_and_checks_options(tmp_path: Path) -> None:
    from corpus.sources import read_records, source_kind

    source = _class_folders(tmp_path / "src", per_class=1)
    _beans_file(tmp_path / "x.parquet")
    assert source_kind(source) == "folders" and source_kind(tmp_path / "x.parquet") == "beans"
    assert len(read_records(tmp_path / "x.parquet", batch_rows=3)) == 12
    with pytest.raises(ValueError, match=r"does not take clip_s \(it takes: task, dataset_name"):
        read_records(source, clip_s=5.0)
