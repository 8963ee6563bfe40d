"""JSONL / CSV manifests round-trip records and name the file and line on bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from corpus.manifest import read_manifest, write_manifest
from corpus.records import Record
from corpus.tasks import instruction_for
from runtime.errors import ManifestError


def _records(root: Path) -> list[Record]:
    return [
        Record(id="a", task="species", instruction=instruction_for("species"), output="Kea",
               labels=("Kea", "Tui, the parson bird"), dataset_name="synth", split="train",
               file_name=str(root / "audio" / "a é.flac"), offset_s=1.5, duration_s=10.0,
               recording="rec1", metadata={"snr_db": 3.5, "calls": [[0.1, 0.4]]}),
        Record(id="b", task="detection", instruction=instruction_for("detection"),
               output="None", labels=("Kea", "None"), split="test",
               file_name="/elsewhere/b.wav"),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_round_trip_keeps_every_field(tmp_path: Path, suffix: str) -> None:
    records = _records(tmp_path)
    path = tmp_path / f"manifest{suffix}"
    write_manifest(records, path)
    back = read_manifest(path)
    assert back == records
    assert [r.metadata for r in back] == [r.metadata for r in records]


def test_paths_under_the_manifest_folder_are_stored_relative(tmp_path: Path) -> None:
    write_manifest(_records(tmp_path), tmp_path / "m.jsonl")
    text = (tmp_path / "m.jsonl").read_text(encoding="utf-8")
    assert '"file_name": "audio/a é.flac"' in text
    assert '"/elsewhere/b.wav"' in text


def test_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "task": "species", "instruction": "x", "output": "y"}\n'
                    '{"id": "b", "task": "species", "output": "y"}\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: missing field\(s\) instruction"):
        read_manifest(path)


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "task"\n', "not valid JSON"),
    ('[1, 2]\n', "JSON object"),
    ('{"id": "a", "task": "t", "instruction": "i", "output": "o", "split": "dev"}\n', "split"),
    ('{"id": "a", "task": "t", "instruction": "i", "output": "o", "offset_s": "x"}\n', "bad value"),
])
def test_bad_rows_are_refused_clearly(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_duplicate_ids_and_unknown_suffix_are_refused(tmp_path: Path) -> None:
    rows = _records(tmp_path)
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        write_manifest([rows[0], rows[0]], tmp_path / "d.jsonl")
        read_manifest(tmp_path / "d.jsonl")
    with pytest.raises(ManifestError, match=r"\.jsonl or \.csv"):
        write_manifest(rows, tmp_path / "m.txt")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.jsonl")
