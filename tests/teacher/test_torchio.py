"""teacher.torchio.load_checkpoint: the one weights_only reader names the file and the problem."""

from __future__ import annotations

import io
import pickle
import random
import warnings
from pathlib import Path

import pytest
import torch

from runtime.errors import InputError
from teacher.torchio import load_checkpoint


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran while loading",))


class _NotAWeight:
    pass


def _saved(tmp_path: Path, legacy: bool = False) -> Path:
    path = tmp_path / ("legacy.pt" if legacy else "good.pt")
    torch.save({"w": torch.arange(40.0), "meta": {"labels": ["Kea", "Tui"], "n": 2}}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_reads_both_torch_formats(tmp_path: Path, legacy: bool) -> None:
    checkpoint = load_checkpoint(_saved(tmp_path, legacy), what="test checkpoint")
    assert torch.equal(checkpoint["w"], torch.arange(40.0))
    assert checkpoint["meta"] == {"labels": ["Kea", "Tui"], "n": 2}


def test_reads_a_file_object_from_where_it_stands(tmp_path: Path) -> None:
    buffer = io.BytesIO(b"prefix" + _saved(tmp_path).read_bytes())
    buffer.seek(len(b"prefix"))
    assert torch.equal(load_checkpoint(buffer, what="x")["w"], torch.arange(40.0))
    with pytest.raises(InputError, match=r"^<in-memory file>: not a torch x"):
        load_checkpoint(io.BytesIO(b"garbage!"), what="x")


def test_missing_folder_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(InputError, match=r"no such student checkpoint \(file not found\)") as err:
        load_checkpoint(missing, what="student checkpoint")
    assert err.value.path == str(missing)
    with pytest.raises(InputError, match="is a folder, not a student checkpoint"):
        load_checkpoint(tmp_path, what="student checkpoint")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(InputError, match="empty file, not a student checkpoint"):
        load_checkpoint(tmp_path / "empty.ckpt", what="student checkpoint")


def test_garbage_bytes_are_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.ckpt"
    path.write_text("species,count\nKea,3\n")
    with pytest.raises(InputError, match=r"notes.ckpt: not a torch teacher checkpoint "
                                         r"\(it starts with b'spec'"):
        load_checkpoint(path, what="teacher checkpoint")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_is_named_corrupt(tmp_path: Path, legacy: bool) -> None:
    data = _saved(tmp_path, legacy).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut.pt: truncated or corrupt BEATs checkpoint \("):
        load_checkpoint(path, what="BEATs checkpoint")


def test_damaged_bytes_always_raise_input_error(tmp_path: Path) -> None:
    """Cuts and flipped bytes of both formats: torch raises a dozen exception types; the
    reader turns every one into an InputError naming the file (or loads a harmless dict)."""
    rng = random.Random(7)
    path = tmp_path / "damaged.pt"
    for legacy in (False, True):
        data = _saved(tmp_path, legacy).read_bytes()
        for trial in range(60):
            damaged = bytearray(data[: rng.randrange(1, len(data))] if trial % 2 else data)
            if trial % 2 == 0:
                for _ in range(3):
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path.write_bytes(bytes(damaged))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # odd pickle protocol numbers
                try:
                    load_checkpoint(path, what="checkpoint")
                except InputError as exc:
                    assert exc.path == str(path)
                    assert exc.reason.startswith(("truncated or corrupt checkpoint",
                                                  "not a torch checkpoint",
                                                  "refusing to unpickle")), exc.reason


def test_pickled_objects_are_refused_and_never_run(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Payload()}, path)
    with pytest.raises(InputError, match=r"evil.ckpt: refusing to unpickle print from the "
                                         r"teacher checkpoint.*re-save it"):
        load_checkpoint(path, what="teacher checkpoint")
    assert "code ran" not in capsys.readouterr().out
    legacy = tmp_path / "legacy_obj.pt"
    with legacy.open("wb") as handle:
        pickle.dump({"cfg": _NotAWeight(), "model": {}}, handle, protocol=2)
    with pytest.raises(InputError, match=r"refusing to unpickle \S*_NotAWeight from the BEATs"):
        load_checkpoint(legacy, what="BEATs checkpoint")


def test_a_top_level_that_is_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(InputError, match=r"list.pt: not a student checkpoint: its top level "
                                         r"is a list, not a dict"):
        load_checkpoint(path, what="student checkpoint")


def test_map_location_is_honoured(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(_saved(tmp_path), what="x", map_location=torch.device("meta"))
    assert checkpoint["w"].device.type == "meta"


def test_a_legacy_file_cut_inside_a_class_name_is_corrupt_not_refused(tmp_path: Path) -> None:
    data = _saved(tmp_path, legacy=True).read_bytes()
    cut = data.index(b"collections\nOrderedDict") + len(b"collection")
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:cut])
    with pytest.raises(InputError, match="truncated or corrupt checkpoint"):
        load_checkpoint(path, what="checkpoint")


def test_a_plain_object_pickled_with_protocol_5_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p5.pt"
    torch.save({"x": _NotAWeight()}, path, pickle_protocol=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about the protocol
        with pytest.raises(InputError, match="p5.pt: refusing to unpickle what it holds"):
            load_checkpoint(path, what="checkpoint")
