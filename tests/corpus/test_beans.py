"""BEANS-Zero parquet: round trips, a file shaped like the public one, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.beans import (
    BEANS_COLUMNS,
    beans_label_sets,
    iter_beans_parquet,
    read_beans_parquet,
    write_beans_parquet,
)
from corpus.records import Record
from corpus.tasks import AUDIO_PLACEHOLDER, instruction_for
from runtime.audio import read_audio
from runtime.errors import AudioError, ManifestError

DETECT_Q = "Which of these, if any, are present in the audio recording? Answer:"


def _our_records() -> list[Record]:
    rng = np.random.default_rng(0)
    return [
        Record(id="a", task="species", instruction=instruction_for("species"), output="Kea",
               labels=("Kea", "Tui"), dataset_name="chorus", split="train",
               audio=rng.standard_normal(16000).astype(np.float32) * 0.1, sample_rate=16000,
               recording="tape1", metadata={"snr_db": 3.5}),
        Record(id="b", task="detection", instruction=instruction_for("detection"),
               output="Kea, Tui", labels=("Kea", "Tui", "None"), dataset_name="chorus",
               split="valid", audio=rng.standard_normal(44100).astype(np.float32) * 0.1,
               sample_rate=44100, offset_s=10.0, duration_s=1.0, recording="tape1"),
        Record(id="c", task="count", instruction=instruction_for("count"), output="2",
               labels=("0", "1", "2", "3"), dataset_name="chorus", split="test",
               audio=np.zeros(8000, np.float32), sample_rate=8000),
    ]


def test_round_trip_keeps_records_audio_and_metadata(tmp_path: Path) -> None:
    records = _our_records()
    path = tmp_path / "ours.parquet"
    assert write_beans_parquet(records, path, batch_rows=2) == 3
    back = read_beans_parquet(path, batch_rows=2)
    assert back == records
    for a, b in zip(records, back, strict=True):
        np.testing.assert_array_equal(a.audio, b.audio)
        assert b.audio.dtype == np.float32
        assert b.metadata["sample_rate"] == a.sample_rate
    assert back[0].metadata["snr_db"] == 3.5
    # The file has exactly the BEANS-Zero columns, so their tools read it.
    table = pq.read_table(path)
    assert tuple(table.column_names) == BEANS_COLUMNS
    assert table.column("instruction_text").to_pylist()[0] == records[0].instruction_text
    # Written again, the bytes read back the same.
    write_beans_parquet(back, tmp_path / "again.parquet")
    assert read_beans_parquet(tmp_path / "again.parquet") == records


def _public_style(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A parquet file as the public BEANS-Zero shards look: float64 audio lists, JSON metadata."""
    table = {name: [row.get(name) for row in rows] for name in BEANS_COLUMNS}
    schema = pa.schema([("audio", pa.list_(pa.float64())),
                        *((n, pa.string()) for n in BEANS_COLUMNS[1:])])
    pq.write_table(pa.table(table, schema=schema), path)
    return path


def _row(i: int, dataset: str, task: str, output: str, rate: int = 16000,
         **extra: Any) -> dict[str, Any]:
    question = DETECT_Q if task == "detection" else "What is the common name? Answer:"
    row = {"audio": list(np.sin(np.arange(160 + i) / 7.0)), "task": task, "output": output,
           "metadata": json.dumps({"sample_rate": rate, "license": "CC-BY"}),
           "instruction": f"{AUDIO_PLACEHOLDER} {question}", "instruction_text": question,
           "dataset_name": dataset, "id": f"{dataset}-{i}", "file_name": f"{dataset}/{i}.wav"}
    row.update(extra)
    return row


def test_public_style_file_label_sets_and_batches(tmp_path: Path) -> None:
    path = _public_style(tmp_path / "shard-0.parquet", [
        _row(0, "esc50", "classification", "dog"),
        _row(1, "esc50", "classification", "rooster"),
        _row(2, "enabirds", "detection", "American Crow, Blue Jay"),
        _row(3, "enabirds", "detection", "None"),
        _row(4, "captioning", "captioning", "A bird sings twice."),
        _row(5, "esc50", "classification", "dog", rate=44100),
    ])
    assert beans_label_sets(path) == {"esc50": ("dog", "rooster"),
                                      "enabirds": ("American Crow", "Blue Jay", "None"),
                                      "captioning": ()}
    one = list(iter_beans_parquet(path, batch_rows=1))
    many = read_beans_parquet(path, batch_rows=100)
    assert one == many
    assert [r.labels for r in many][:3] == [("dog", "rooster"), ("dog", "rooster"),
                                            ("American Crow", "Blue Jay", "None")]
    assert {r.split for r in many} == {"test"}
    assert [r.sample_rate for r in many] == [16000] * 5 + [44100]
    assert many[2].recording == "enabirds/2.wav" and many[2].file_name is None
    assert many[2].instruction_text == DETECT_Q
    assert many[0].metadata == {"sample_rate": 16000, "license": "CC-BY"}
    for i, record in enumerate(many):
        np.testing.assert_allclose(record.audio, np.sin(np.arange(160 + i) / 7.0), atol=1e-7)


def test_placeholder_added_and_default_rate(tmp_path: Path) -> None:
    path = _public_style(tmp_path / "x.parquet", [
        _row(0, "d", "classification", "dog", instruction="What is it?",
             metadata=json.dumps({"duration": 1.0}))])
    with pytest.raises(ManifestError, match=r"x.parquet: row 0: metadata names no sample rate"):
        read_beans_parquet(path)
    record = read_beans_parquet(path, default_rate=22050)[0]
    assert record.sample_rate == 22050
    assert record.instruction == f"{AUDIO_PLACEHOLDER} What is it?"


def test_records_from_files_are_read_at_their_offsets(tmp_path: Path,
                                                      real_recording: Path) -> None:
    clip = Record(id="real", task="species", instruction=instruction_for("species"),
                  output="Song Sparrow", labels=("Song Sparrow",), file_name=str(real_recording),
                  offset_s=2.0, duration_s=3.0)
    path = tmp_path / "real.parquet"
    write_beans_parquet([clip], path, target_rate=16000)
    back = read_beans_parquet(path)[0]
    expected = read_audio(real_recording, 16000, offset_s=2.0, duration_s=3.0)
    np.testing.assert_array_equal(back.audio, expected)
    assert back.sample_rate == 16000 and back.audio.shape == (48000,)
    assert back.file_name is None and back.offset_s == 0.0
    native = read_beans_parquet(_written(tmp_path / "native.parquet", clip))[0]
    assert native.sample_rate == 32000 and native.audio.shape == (96000,)


def _written(path: Path, record: Record) -> Path:
    write_beans_parquet([record], path)
    return path


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="parquet file not found"):
        read_beans_parquet(tmp_path / "nope.parquet")
    text = tmp_path / "text.parquet"
    text.write_text("id,output\n1,dog\n")
    with pytest.raises(ManifestError, match="text.parquet: not a readable parquet file"):
        read_beans_parquet(text)
    partial = tmp_path / "partial.parquet"
    pq.write_table(pa.table({"audio": [[0.0]], "output": ["dog"]}), partial)
    with pytest.raises(ManifestError, match="missing column.*metadata.*instruction"):
        read_beans_parquet(partial)


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"metadata": "{not json"}, ManifestError, "row 1: metadata is not valid JSON"),
    ({"metadata": "[16000]"}, ManifestError, "row 1: metadata must be a JSON object"),
    ({"metadata": json.dumps({"sample_rate": "fast"})}, ManifestError, "row 1: metadata sample"),
    ({"audio": []}, AudioError, "row 1: audio is empty"),
    ({"audio": [0.0, float("nan"), 0.0]}, AudioError, "row 1: audio holds NaN or Inf at sample 1"),
    ({"audio": None}, AudioError, "row 1: audio is missing"),
    ({"output": None}, ManifestError, "row 1: missing output"),
])
def test_bad_rows_are_named(tmp_path: Path, change: dict[str, Any], error: type[Exception],
                            message: str) -> None:
    path = _public_style(tmp_path / "bad.parquet", [
        _row(0, "esc50", "classification", "dog"),
        {**_row(1, "esc50", "classification", "cat"), **change}])
    with pytest.raises(error, match=message):
        read_beans_parquet(path)


def test_duplicate_ids_and_bad_records_to_write(tmp_path: Path) -> None:
    rows = [_row(0, "esc50", "classification", "dog"), _row(0, "esc50", "classification", "cat")]
    with pytest.raises(ManifestError, match="duplicate id 'esc50-0'"):
        read_beans_parquet(_public_style(tmp_path / "dup.parquet", rows))
    no_rate = Record(id="x", task="species", instruction="q", output="Kea",
                     audio=np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="'x' holds audio without a sample_rate"):
        write_beans_parquet([no_rate], tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    assert not list(tmp_path.glob(".out.parquet*"))
    missing = Record(id="y", task="species", instruction="q", output="Kea",
                     file_name=str(tmp_path / "gone.wav"))
    with pytest.raises(AudioError, match="gone.wav: file does not exist"):
        write_beans_parquet([missing], tmp_path / "out.parquet")
