"""A model folder's weight files: read one tensor at a time, written as safetensors shards.

Reading takes every layout `save_pretrained` writes (a safetensors or `.bin` index and its
shards, one `model.safetensors`, `pytorch_model*.bin` as the original Alpaca release shipped)
and holds only the tensor asked for. Writing fills shards of at most a given size and writes
each as soon as it is full, named like Hugging Face's once their count is known. So a model
streams through in memory of one tensor plus one shard, whatever its size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
FIX_DAMAGED = "the file is cut off or damaged (an interrupted download or copy?): copy it again"


# ---------------------------------------------------------------------------------------------
# Reading a model folder, one tensor at a time


@dataclass(frozen=True)
class WeightFolder:
    """A model folder's weights, read one tensor at a time. Each read opens its file anew: a file
    kept open keeps every page read through it mapped, counted as resident memory, so reading a
    whole model through one open file would hold all of it."""

    path: Path
    flag: str  # the flag that named it, for messages
    files: dict[str, Path]  # tensor name -> the file holding it, in file order

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def read(self, name: str) -> torch.Tensor:
        file = self.files[name]
        with _reading(self.flag, file):
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(name)
            return _load_bin(file)[name]


def open_weights(folder: str, flag: str) -> WeightFolder:
    """The weights of a model folder, every file's header read (a cut-off file fails here)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(
            f"{flag} {folder}: no such folder", f"give {flag} a model folder (config.json and weights)"
        )
    files: dict[str, Path] = {}
    for file in _weight_files(path, flag):
        for name in _tensor_names(flag, file):
            files.setdefault(name, file)
    if not files:
        raise UserError(f"{flag} {path}: its weight files hold no tensors", FIX_DAMAGED)
    return WeightFolder(path, flag, files)


def _weight_files(path: Path, flag: str) -> list[Path]:
    """The weight files, by the first of: a safetensors index, *.safetensors, a .bin index,
    pytorch_model*.bin (the original Alpaca release's layout)."""
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (path / index).is_file():
            return _indexed_files(path, index, flag)
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not found:
        raise UserError(
            f"{flag} {path}: no model weights in this folder (expected *.safetensors or pytorch_model*.bin)",
            f"give {flag} the folder that save_pretrained (or alpaca-forge) wrote",
        )
    return found


def _indexed_files(path: Path, index: str, flag: str) -> list[Path]:
    try:
        weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))  # each file once, in index order
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{flag} {path}: {index} is damaged ({e})", FIX_DAMAGED) from e
    for name in names:
        if not (path / name).is_file():
            raise UserError(
                f"{flag} {path}: {index} names {name}, which is not there",
                "copy every weight file of the model into the folder",
            )
    return [path / name for name in names]


@contextmanager
def _reading(flag: str, file: Path) -> Iterator[None]:
    """Any failure to read a weight file becomes an error naming it (an OSError included: it must
    not pass for a failed write of the output)."""
    import pickle

    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{flag} {file.parent}: {file.name} cannot be read ({e})", FIX_DAMAGED) from e


def _tensor_names(flag: str, file: Path) -> list[str]:
    with _reading(flag, file):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        return list(_load_bin(file))


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A torch pickle's tensors, memory-mapped: only the pages of the tensors used are read."""
    import torch

    return torch.load(file, mmap=True, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------------------------------------
# Writing safetensors shards


# safetensors reports a failed write as its own error, the OS error number only in its text.
_OS_ERROR = re.compile(r"os error (\d+)")


class ShardWriter:
    """Safetensors shards of at most `max_bytes` (a larger tensor gets a shard of its own), each
    written as soon as it is full: at most one shard's tensors are held. Named at the end, when
    their count is known: model.safetensors, or model-0000i-of-0000n.safetensors and the index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # each shard and the tensors in it
        self.tensor_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.written) + 1:05d}.safetensors.tmp"
        _save_shard(self.pending, path)
        self.written.append((path, list(self.pending)))
        self.tensor_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> tuple[int, int]:
        """(shards, bytes on disk), the last shard written and every file named."""
        if self.pending:
            self._flush()
        count = len(self.written)
        weight_map = {}
        for i, (path, names) in enumerate(self.written, start=1):
            final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": weight_map}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        size = sum((self.folder / f).stat().st_size for f in set(weight_map.values()))
        return count, size


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})  # "pt": what transformers expects
    except SafetensorError as e:
        found = _OS_ERROR.search(str(e))
        if found is None:
            raise
        code = int(found.group(1))  # back to the OSError it was: staged_output says the fix
        raise OSError(code, os.strerror(code), str(path)) from e
