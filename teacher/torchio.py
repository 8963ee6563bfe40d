"""One safe reader for torch checkpoint files (teacher, BEATs and student checkpoints).

`load_checkpoint` reads with ``torch.load(weights_only=True)``: only tensors and plain
containers are unpickled, never arbitrary objects, so a checkpoint from elsewhere cannot run
code when it is read. Every way a file can be unusable raises `runtime.errors.InputError`
naming the file and the problem: missing, a folder, empty, not a torch file at all, truncated
or corrupt, holding pickled objects that weights_only refuses, or not a dict at the top level.

    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "weights.pt"
    >>> torch.save({"w": torch.ones(2)}, path)
    >>> load_checkpoint(path, what="weights file")["w"]
    tensor([1., 1.])
    >>> path.write_bytes(b"hello")
    5
    >>> load_checkpoint(path, what="weights file")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    runtime.errors.InputError: .../weights.pt: not a torch weights file (...)
"""

from __future__ import annotations

import os
import pickle
import re
import struct
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from runtime.errors import InputError

if TYPE_CHECKING:
    import torch

# torch.save writes a zip archive (since 1.6) or, in the legacy format, a pickle stream that
# opens with the PROTO opcode.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
# What torch.load raises on damaged bytes (found by truncating and flipping bytes of both
# formats): the zip reader's RuntimeError, and whatever the unpickler trips over.
_DAMAGED = (RuntimeError, EOFError, ValueError, LookupError, AssertionError, TypeError,
            AttributeError, struct.error, pickle.UnpicklingError)
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# A legacy torch file opens with four pickles: magic number, protocol, system info, the object.
_LEGACY_PICKLES = 4


def load_checkpoint(path_or_file: str | os.PathLike[str] | IO[bytes], *, what: str,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict stored in a torch checkpoint, read with ``weights_only=True``.

    Args:
        path_or_file: a file path, or a readable, seekable binary file object (read from where
            it stands).
        what: what the file should be, for error messages ("teacher checkpoint").
        map_location: device the tensors are loaded onto.

    Raises:
        InputError: naming the file, when it is missing, a folder, empty, not a torch file,
            truncated or corrupt, holds objects weights_only refuses to unpickle, or its top
            level is not a dict.
    """
    import torch

    source, start, head = _open_head(path_or_file, what)
    try:
        checkpoint = torch.load(path_or_file, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise InputError(source, f"cannot read the {what} ({exc.strerror or exc})") from exc
    except _DAMAGED as exc:
        raise InputError(source, _failure_reason(exc, path_or_file, start, head, what)) from exc
    if not isinstance(checkpoint, dict):
        raise InputError(source, f"not a {what}: its top level is a "
                                 f"{type(checkpoint).__name__}, not a dict")
    return checkpoint


def _open_head(path_or_file: str | os.PathLike[str] | IO[bytes],
               what: str) -> tuple[str, int, bytes]:
    """``(name for messages, start offset, first bytes)``; a missing or empty file raises."""
    if isinstance(path_or_file, str | os.PathLike):
        path = Path(path_or_file)
        if path.is_dir():
            raise InputError(path, f"is a folder, not a {what}")
        if not path.is_file():
            raise InputError(path, f"no such {what} (file not found)")
        try:
            with path.open("rb") as handle:
                head = handle.read(len(_ZIP_MAGIC))
        except OSError as exc:
            raise InputError(path, f"cannot read the {what} ({exc.strerror or exc})") from exc
        source, start = str(path), 0
    else:
        source = str(getattr(path_or_file, "name", "<in-memory file>"))
        start = path_or_file.tell()
        head = path_or_file.read(len(_ZIP_MAGIC))
        path_or_file.seek(start)
    if not head:
        raise InputError(source, f"empty file, not a {what}")
    return source, start, head


def _failure_reason(exc: BaseException, path_or_file: str | os.PathLike[str] | IO[bytes],
                    start: int, head: bytes, what: str) -> str:
    """Why torch.load failed, in words: not a torch file, damaged bytes, or refused objects.

    The weights_only unpickler raises the same error for a damaged stream and for an intact
    one holding objects (or pickle opcodes) it does not allow; parsing the stream's opcodes
    without executing any (`pickletools.genops`) tells the two apart.
    """
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        return (f"not a torch {what} (it starts with {head!r}; a torch checkpoint is a zip "
                "archive or a pickle)")
    reason = _torch_reason(exc)
    if not isinstance(exc, pickle.UnpicklingError) or not _pickles_intact(path_or_file, start,
                                                                          head):
        return f"truncated or corrupt {what} ({reason})"
    found = _REFUSED_GLOBAL.search(reason)
    if found and not _DOTTED_NAME.fullmatch(found[1]):  # a name mangled by flipped bytes
        return f"truncated or corrupt {what} ({reason})"
    refused = found[1] if found else f"what it holds ({reason})"
    return (f"refusing to unpickle {refused} from the {what}: weights_only loading accepts only "
            "tensors and plain containers in torch.save's default pickle protocol; re-save it "
            "with plain types from a trusted environment")


def _pickles_intact(path_or_file: str | os.PathLike[str] | IO[bytes], start: int,
                    head: bytes) -> bool:
    """Whether the checkpoint's object pickle parses to its STOP opcode (nothing is executed)."""
    if isinstance(path_or_file, str | os.PathLike):
        with open(path_or_file, "rb") as handle:
            return _stream_intact(handle, start, head)
    return _stream_intact(path_or_file, start, head)


def _stream_intact(handle: IO[bytes], start: int, head: bytes) -> bool:
    """`_pickles_intact` on an open file: the zip's ``data.pkl``, or each legacy pickle."""
    import io
    import pickletools
    import zipfile
    import zlib

    try:
        handle.seek(start)
        if head.startswith(_ZIP_MAGIC):
            with zipfile.ZipFile(handle) as archive:
                names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if len(names) != 1:
                    return False
                streams, stream = 1, io.BytesIO(archive.read(names[0]))
        else:
            streams, stream = _LEGACY_PICKLES, handle
        for _ in range(streams):
            where = stream.tell()
            if not stream.read(1):  # a plain pickle.dump file holds fewer pickles
                break
            stream.seek(where)
            for _op in pickletools.genops(stream):
                pass
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error):
        return False
    return True


def _torch_reason(exc: BaseException) -> str:
    """The gist of a torch.load error: the unpickler's own words, first sentence, one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    _, marker, inner = text.partition("WeightsUnpickler error:")
    text = inner.strip() if marker else text
    end = text.find(". ")
    return text[: end + 1] if 0 < end < 200 else text[:200]
