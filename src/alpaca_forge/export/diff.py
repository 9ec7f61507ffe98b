"""`alpaca-forge export diff | recover`: share a fine-tune as a weight diff against its base model.

Someone who holds the base model rebuilds the tuned one from the diff, and the diff alone is no
use without the base (the way the original Stanford Alpaca release shared its weights).

Two kinds (`--kind`):

- `add` (default), the original release's scheme (its weight_diff.py): per tensor,
  `diff = tuned - base` in float32. The original first gave the base an added pad token "[PAD]"
  and grew its input embedding and its lm_head to the tuned vocabulary, each new row the mean of
  the existing rows; we apply that rule to any tensor whose shape goes from [V_base, H] in the
  base to [V_tuned, H] in the tuned model. Recovery grows the base the same way and computes
  `(diff + base).to(tuned dtype)`. Float addition is not always exact, so the diff records what
  recovery will give back (its sha256) and how far that is from the tuned weights.
- `xor`, OpenAssistant's scheme: the tuned tensor's bytes XORed with the base tensor's bytes
  (the base cast to the tuned dtype first where the two differ), rows past the base XORed with
  zeros. Recovery is bit for bit. The XORed bytes are stored as flat uint8 tensors, shape and
  dtype in our JSON: as floats they would hold arbitrary bit patterns (NaNs among them) that any
  cast on the way, such as a loader's dtype conversion, could silently change.

Either way a tensor of the tuned model that the base lacks is stored whole ("new"), except an
lm_head the base ties to its input embedding: that embedding stands in for it.

The diff folder is a Hugging Face model folder, the one the original wrote (for `add`,
`AutoModelForCausalLM.from_pretrained` loads it, as the original's `recover` does), plus our record:

    config.json, generation_config.json, tokenizer files, prompt_format.json   the tuned model's
    model.safetensors, or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    alpaca_forge_diff.json   {"format", "format_version", "kind", "created_by",
                              "tensors": {name: TensorRecord}}

Each TensorRecord holds the sha256 of the base tensor (checked before it is used: a wrong base
fails on the first tensor that differs), of the stored diff tensor (a damaged diff is told from a
wrong base), of the tuned tensor and of what recovery gives back. `recover` also reads diffs the
original wrote (pytorch_model*.bin shards, no alpaca_forge_diff.json); those cannot be verified,
and the result says so. Its output is a complete model folder in safetensors.

Both commands stream: one tensor of each model in memory at a time, plus the output shard being
filled (at most `--shard-size-mb`), each shard written as soon as it is full.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.errors import UserError
from ..core.files import staged_output
from ..core.prompts import FORMAT_FILE
from .config import DiffConfig, DiffKind, RecoverConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MANIFEST_FILE = "alpaca_forge_diff.json"
MANIFEST_FORMAT = "alpaca-forge weight diff"
MANIFEST_VERSION = 1
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BYTES_PER_MB = 1_000_000  # as Hugging Face counts "MB" in max_shard_size
# What travels with the weights, from the tuned model to the diff and from the diff to the
# recovered model: the config, the tokenizer (its files differ by tokenizer kind), the chat
# template, the generation defaults and our prompt format. Nothing else (checkpoints, logs).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    FORMAT_FILE,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "*.model",  # sentencepiece
    "chat_template.*",
)
FIX_WRONG_BASE = "pass the exact base model the diff was made from"
FIX_DAMAGED = "the file is cut off or damaged (an interrupted download or copy?): copy it again"


@dataclass(frozen=True)
class DiffResult:
    output: Path
    kind: DiffKind
    tensors: int  # every tensor in the tuned model's weight files
    resized: int  # of them, embeddings the tuned model grew (rows added to dim 0)
    new: int  # of them, absent from the base: stored whole
    shards: int  # weight files written
    bytes_written: int  # their size on disk
    bit_exact: int  # tensors `recover` gives back bit for bit (xor: all)
    max_abs_deviation: float  # largest |recovered - tuned| over every weight (0.0 when all are exact)
    max_deviation_tensor: str | None  # where that is; None when every tensor is bit-exact
    elapsed_s: float
    peak_rss_mb: float | None  # this process's peak resident memory so far; None where unknown


class Verification(str, Enum):
    """What `recover` could say about its output."""

    VERIFIED = "verified"  # every tensor sha256-equal to what the diff was made to give back
    NO_RECORD = "no record"  # a diff without alpaca_forge_diff.json (the original's): nothing to check
    ROUNDING_DIFFERS = "rounding differs"  # diff and base intact, yet some sums came out otherwise


@dataclass(frozen=True)
class RecoverResult:
    output: Path
    kind: DiffKind
    tensors: int
    shards: int
    bytes_written: int
    verification: Verification
    tensors_verified: int  # sha256-equal to what the diff was made to give back (0 without a record)
    bit_exact: int | None  # of those, equal to the tuned weights bit for bit (the diff's figures)
    max_abs_deviation: float | None  # largest |recovered - tuned| over those (the diff's figures)
    max_deviation_tensor: str | None  # where that is; None when every one is bit-exact
    unverified: tuple[str, ...]  # tensors whose sums came out otherwise (ROUNDING_DIFFERS)
    elapsed_s: float
    peak_rss_mb: float | None

    @property
    def verified(self) -> bool:
        return self.verification is Verification.VERIFIED


# ---------------------------------------------------------------------------------------------
# The per-tensor transforms (pure)


class Change(str, Enum):
    """How a tensor of the tuned model relates to its base tensor."""

    SAME = "same"  # same shape
    RESIZED = "resized"  # rows added at the end of dim 0: a grown vocabulary
    NEW = "new"  # nothing in the base to make it from: stored whole


def shape_change(base_shape: Iterable[int], tuned_shape: Iterable[int]) -> Change | None:
    """The change from a base shape to a tuned one; None where the resize rule cannot explain it."""
    base, tuned = tuple(base_shape), tuple(tuned_shape)
    if base == tuned:
        return Change.SAME
    grown = len(base) == len(tuned) == 2 and base[1] == tuned[1] and tuned[0] > base[0]
    return Change.RESIZED if grown else None


def resize_rows(base32: torch.Tensor, rows: int) -> torch.Tensor:
    """[V_base, H] -> [rows, H], each new row the mean of the base rows: the original's resize of
    the embeddings for its added pad token. The mean is computed in float32, as there."""
    import torch

    mean = base32.mean(dim=0, keepdim=True)  # [1, H]
    return torch.cat([base32, mean.expand(rows - base32.shape[0], -1)])


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor, whatever its dtype (bfloat16 has no numpy dtype,
    so the bytes are reached through torch's own views)."""
    import torch

    return t.contiguous().view(-1).view(torch.uint8)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(raw_bytes(t).numpy()).hexdigest()


def xor_bytes(data: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`data` XOR `base` over the base's length; bytes past it (rows the tuned model added) are
    XORed with zeros, i.e. kept. Both flat uint8. XOR is its own inverse: the same call recovers."""
    out = data.clone()
    out[: base.numel()] ^= base
    return out


def add_base(base: torch.Tensor | None, change: Change, shape: list[int]) -> torch.Tensor | None:
    """The base as `add` subtracts it: float32, grown to the tuned `shape` if the tuned model grew."""
    if base is None:
        return None
    base32 = base.float()
    return resize_rows(base32, shape[0]) if change is Change.RESIZED else base32


def xor_base(base: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The bytes `xor` XORs with: the base in the tuned dtype; none for a new tensor."""
    import torch

    if base is None:
        return torch.empty(0, dtype=torch.uint8)
    return raw_bytes(base if base.dtype == dtype else base.to(dtype))


def add_diff(tuned: torch.Tensor, base32: torch.Tensor | None) -> torch.Tensor:
    """tuned - base in float32, of the tuned shape; a new tensor (no base) is stored whole."""
    import torch

    return tuned.to(torch.float32, copy=True) if base32 is None else tuned.float() - base32


def add_recover(diff: torch.Tensor, base32: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """diff + base in float32, cast to the tuned dtype: what `recover` gives back."""
    recovered = diff.float() if base32 is None else diff.float() + base32
    return recovered.to(dtype)


def stored_layout(kind: DiffKind, shape: list[int], dtype: torch.dtype) -> tuple[list[int], torch.dtype]:
    """(shape, dtype) of the diff's tensor for a tuned tensor of `shape` and `dtype`."""
    import torch

    if kind == "add":
        return shape, torch.float32
    return [math.prod(shape) * dtype.itemsize], torch.uint8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ---------------------------------------------------------------------------------------------
# alpaca_forge_diff.json


@dataclass(frozen=True)
class TensorRecord:
    """What the diff records about one tensor of the tuned model."""

    change: Change
    base: str | None  # the base tensor it is made from (the input embedding for a tied lm_head)
    base_shape: list[int] | None
    base_dtype: str | None
    base_sha256: str | None  # of the base tensor's bytes as stored, before any resize or cast
    tuned_shape: list[int]
    tuned_dtype: str
    tuned_sha256: str
    stored_sha256: str  # of the diff's own tensor
    recovered_sha256: str  # of what recovery gives back (add: may differ from the tuned by rounding)
    bit_exact: bool  # recovered == tuned, bit for bit
    max_abs_deviation: float  # max |recovered - tuned|

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "change": self.change.value}


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _record_from_json(raw: Any) -> TensorRecord:
    """A TensorRecord, every field checked (ValueError saying which one is wrong)."""
    names = [f.name for f in dataclasses.fields(TensorRecord)]
    if not isinstance(raw, dict) or set(raw) != set(names):
        raise ValueError(f"not an object with exactly the fields {', '.join(names)}")
    record = TensorRecord(**{**raw, "change": Change(raw["change"])})
    base_fields = (record.base, record.base_shape, record.base_dtype, record.base_sha256)
    if record.change is Change.NEW:
        _expect(all(v is None for v in base_fields), "a new tensor has no base fields")
    else:
        _expect(isinstance(record.base, str), "base: not a tensor name")
        _expect(_is_shape(record.base_shape), "base_shape: not a list of sizes")
        dtype_from_name(str(record.base_dtype))
        _expect(_SHA256.fullmatch(str(record.base_sha256)) is not None, "base_sha256: not a sha256")
    _expect(_is_shape(record.tuned_shape), "tuned_shape: not a list of sizes")
    dtype_from_name(str(record.tuned_dtype))
    for field in ("tuned_sha256", "stored_sha256", "recovered_sha256"):
        _expect(_SHA256.fullmatch(str(getattr(record, field))) is not None, f"{field}: not a sha256")
    _expect(isinstance(record.bit_exact, bool), "bit_exact: not true or false")
    deviation = record.max_abs_deviation
    _expect(isinstance(deviation, (int, float)) and not isinstance(deviation, bool), "max_abs_deviation")
    return record


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and d >= 0 for d in value)


@dataclass(frozen=True)
class Manifest:
    kind: DiffKind
    tensors: dict[str, TensorRecord]


def write_manifest(folder: Path, kind: DiffKind, records: dict[str, TensorRecord]) -> None:
    data = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "kind": kind,
        "created_by": f"alpaca-forge {__version__}",
        "tensors": {name: record.to_json() for name, record in records.items()},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def read_manifest(diff: WeightFolder) -> Manifest | None:
    """The diff's record; None for a diff without one (as the original weight_diff.py wrote).
    A record that is damaged, or that does not list exactly the tensors of the diff, stops here."""
    path = diff.path / MANIFEST_FILE
    if not path.is_file():
        return None
    fix = f"copy the diff again; {MANIFEST_FILE} is written by `alpaca-forge export diff`"
    name = None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        _expect(isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT, "not our format")
        _expect(data.get("format_version") == MANIFEST_VERSION, f"format_version is not {MANIFEST_VERSION}")
        _expect(data.get("kind") in ("add", "xor"), "kind: not add or xor")
        _expect(isinstance(data.get("tensors"), dict), "tensors: not an object")
        tensors = {}
        for name, raw in data["tensors"].items():
            tensors[name] = _record_from_json(raw)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        where = f" (tensor {name})" if name else ""
        raise UserError(f"--diff {diff.path}: {MANIFEST_FILE} is damaged{where}: {e}", fix) from e
    unlisted = [n for n in diff.names if n not in tensors]
    missing = [n for n in tensors if n not in diff.files]
    if unlisted or missing:
        what = f"holds {unlisted[0]}, which" if unlisted else f"lacks {missing[0]}, which"
        raise UserError(
            f"--diff {diff.path}: the weight files and {MANIFEST_FILE} disagree: the weights {what} "
            f"{MANIFEST_FILE} {'does not list' if unlisted else 'lists'}",
            "copy the whole diff folder again (a weight file missing or from another diff?)",
        )
    return Manifest(data["kind"], tensors)


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


def model_config(folder: Path, flag: str) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        _expect(isinstance(config, dict), "not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{flag} {folder}: config.json is damaged ({e})", FIX_DAMAGED) from e
    return config


def check_inputs(base: WeightFolder, other: WeightFolder) -> None:
    """`other` (the tuned model or the diff) must be a whole model folder, of the base's kind."""
    other_config = model_config(other.path, other.flag)
    if other_config is None:
        raise UserError(
            f"{other.flag} {other.path}: no config.json (the output would not load without it)",
            "a model folder holds config.json beside the weights, as save_pretrained writes it: copy it in",
        )
    base_type = (model_config(base.path, base.flag) or {}).get("model_type")
    other_type = other_config.get("model_type")
    if base_type and other_type and base_type != other_type:
        raise UserError(
            f"--base {base.path} is a {base_type} model, {other.flag} {other.path} a {other_type} model",
            f"{FIX_WRONG_BASE} (the same architecture)",
        )


@dataclass(frozen=True)
class Embeddings:
    input: str  # e.g. model.embed_tokens.weight
    output: str  # e.g. lm_head.weight


def embedding_names(folder: Path) -> Embeddings | None:
    """The names of the input and output embeddings of the model in `folder`, found on a copy of
    its architecture without weights (on the meta device: no memory, under a second); None for an
    architecture transformers does not know."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, tie_word_embeddings=False)  # two distinct tensors
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    output = model.get_output_embeddings()
    if output is None:
        return None
    return Embeddings(names[id(model.get_input_embeddings().weight)], names[id(output.weight)])


def counterpart(name: str, base: WeightFolder, tied: Embeddings | None) -> str | None:
    """The base tensor `name` is made from: the same name, or, for an lm_head the base does not
    store because it ties it to its input embedding, that embedding. None: a new tensor."""
    if name in base.files:
        return name
    if tied is not None and name == tied.output and tied.input in base.files:
        return tied.input
    return None


def tied_embeddings(model: WeightFolder, base: WeightFolder) -> Embeddings | None:
    """The embedding names, looked up only when some tensor has no namesake in the base."""
    return embedding_names(model.path) if any(n not in base.files for n in model.files) else None


def explained_change(
    name: str, t: torch.Tensor, folder: WeightFolder, base_name: str, b: torch.Tensor, base: WeightFolder
) -> Change:
    """How base tensor `b` became `t` (of the tuned model or the diff), or an error naming both."""
    change = shape_change(b.shape, t.shape)
    if change is None:
        raise UserError(
            f"tensor {name}: shape {list(t.shape)} in {folder.flag} {folder.path}, but {list(b.shape)} "
            f"({base_name}) in --base {base.path}; only rows added to dim 0 (a grown vocabulary) can "
            "be explained",
            "pass the base model it was made from (the same architecture and size)",
        )
    return change


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


def copy_side_files(source: Path, target: Path) -> None:
    for file in sorted(source.iterdir()):
        if file.is_file() and any(fnmatch.fnmatch(file.name, p) for p in SIDE_FILES):
            shutil.copyfile(file, target / file.name)


def refuse_inputs_as_output(output: str, inputs: Iterable[WeightFolder]) -> None:
    """--output is replaced at the end: it must be neither an input nor a folder holding one."""
    out = Path(output).expanduser().resolve()
    for folder in inputs:
        where = folder.path.resolve()
        if out == where or out in where.parents:
            raise UserError(
                f"--output {output}: would replace {folder.flag} {folder.path}, which the command reads",
                "choose another --output",
            )


# ---------------------------------------------------------------------------------------------
# diff


def run_diff(config: DiffConfig, *, progress: bool = True) -> DiffResult:
    """Write the diff of `config.tuned` against `config.base` into `config.output`."""
    start = time.perf_counter()
    base = open_weights(config.base, "--base")
    tuned = open_weights(config.tuned, "--tuned")
    check_inputs(base, tuned)
    refuse_inputs_as_output(config.output, (base, tuned))
    tied = tied_embeddings(tuned, base)
    records: dict[str, TensorRecord] = {}
    with staged_output(config.output, force=config.force, folder=True) as tmp:
        tmp.mkdir()
        writer = ShardWriter(tmp, config.shard_size_mb * BYTES_PER_MB)
        for name in _bar(tuned.names, f"diff ({config.kind})", progress):
            stored, records[name] = diff_tensor(config.kind, name, tuned, base, tied)
            writer.add(name, stored)
            del stored  # the writer holds it until its shard is written
        shards, size = writer.finish()
        copy_side_files(tuned.path, tmp)
        write_manifest(tmp, config.kind, records)
    exact, deviation, worst = _figures(records)
    result = DiffResult(
        output=Path(config.output).expanduser(),
        kind=config.kind,
        tensors=len(records),
        resized=sum(r.change is Change.RESIZED for r in records.values()),
        new=sum(r.change is Change.NEW for r in records.values()),
        shards=shards,
        bytes_written=size,
        bit_exact=exact,
        max_abs_deviation=deviation,
        max_deviation_tensor=worst,
        elapsed_s=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
    )
    _log_diff(result)
    return result


def diff_tensor(
    kind: DiffKind, name: str, tuned: WeightFolder, base: WeightFolder, tied: Embeddings | None
) -> tuple[torch.Tensor, TensorRecord]:
    """One tuned tensor's diff, and the record that lets `recover` check the base and itself."""
    t = tuned.read(name)
    base_name = counterpart(name, base, tied)
    b = base.read(base_name) if base_name is not None else None
    change = Change.NEW if b is None else explained_change(name, t, tuned, base_name, b, base)
    if kind == "add":
        base32 = add_base(b, change, list(t.shape))
        stored = add_diff(t, base32)
        recovered = add_recover(stored, base32, t.dtype)
        del base32
    else:
        stored = xor_bytes(raw_bytes(t), xor_base(b, t.dtype))
        recovered = t
    tuned_sha = tensor_sha256(t)
    recovered_sha = tuned_sha if recovered is t else tensor_sha256(recovered)
    exact = recovered_sha == tuned_sha
    deviation = 0.0 if exact else float((recovered.float() - t.float()).abs_().max())
    record = TensorRecord(
        change=change,
        base=base_name,
        base_shape=None if b is None else list(b.shape),
        base_dtype=None if b is None else dtype_name(b.dtype),
        base_sha256=None if b is None else tensor_sha256(b),
        tuned_shape=list(t.shape),
        tuned_dtype=dtype_name(t.dtype),
        tuned_sha256=tuned_sha,
        stored_sha256=tensor_sha256(stored),
        recovered_sha256=recovered_sha,
        bit_exact=exact,
        max_abs_deviation=deviation,
    )
    return stored, record


# ---------------------------------------------------------------------------------------------
# recover


def run_recover(config: RecoverConfig, *, progress: bool = True) -> RecoverResult:
    """Rebuild the tuned model from `config.base` and the diff `config.diff` into `config.output`."""
    start = time.perf_counter()
    diff = open_weights(config.diff, "--diff")
    base = open_weights(config.base, "--base")
    check_inputs(base, diff)
    manifest = read_manifest(diff)
    refuse_inputs_as_output(config.output, (base, diff))
    kind: DiffKind = manifest.kind if manifest else "add"
    tied = None if manifest else tied_embeddings(diff, base)  # ours names each base tensor
    verified: set[str] = set()  # tensors sha256-equal to what the diff was made to give back
    with staged_output(config.output, force=config.force, folder=True) as tmp:
        tmp.mkdir()
        writer = ShardWriter(tmp, config.shard_size_mb * BYTES_PER_MB)
        for name in _bar(diff.names, f"recover ({kind})", progress):
            if manifest:
                recovered, ok = recover_checked(kind, name, manifest.tensors[name], diff, base)
                if ok:
                    verified.add(name)
            else:
                recovered = recover_unchecked(name, diff, base, tied)
            writer.add(name, recovered)
            del recovered
        shards, size = writer.finish()
        copy_side_files(diff.path, tmp)
    unverified = tuple(n for n in diff.names if n not in verified) if manifest else ()
    if manifest is None:
        verification, exact, deviation, worst = Verification.NO_RECORD, None, None, None
    else:
        verification = Verification.ROUNDING_DIFFERS if unverified else Verification.VERIFIED
        exact, deviation, worst = _figures({n: manifest.tensors[n] for n in verified})
    result = RecoverResult(
        output=Path(config.output).expanduser(),
        kind=kind,
        tensors=len(diff.names),
        shards=shards,
        bytes_written=size,
        verification=verification,
        tensors_verified=len(verified),
        bit_exact=exact,
        max_abs_deviation=deviation,
        max_deviation_tensor=worst,
        unverified=unverified,
        elapsed_s=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
    )
    _log_recovered(result, diff.path)
    return result


def recover_checked(
    kind: DiffKind, name: str, record: TensorRecord, diff: WeightFolder, base: WeightFolder
) -> tuple[torch.Tensor, bool]:
    """One tensor of our own diff: the diff's tensor and the base's checked before use, then
    (recovered, whether it is sha256-equal to what the diff was made to give back)."""
    tuned_dtype = dtype_from_name(record.tuned_dtype)
    stored = diff.read(name)
    shape, dtype = stored_layout(kind, record.tuned_shape, tuned_dtype)
    if list(stored.shape) != shape or stored.dtype != dtype or tensor_sha256(stored) != record.stored_sha256:
        raise UserError(
            f"--diff {diff.path}: tensor {name} is damaged (it is not the one {MANIFEST_FILE} records)",
            "copy the diff again (an interrupted download or copy?)",
        )
    b = None
    if record.base is not None:
        if record.base not in base.files:
            raise UserError(
                f"--base {base.path}: has no tensor {record.base}, which the diff was made from",
                f"{FIX_WRONG_BASE} (the same architecture and size)",
            )
        b = base.read(record.base)
        check_base_tensor(record, b, base)
    if kind == "add":
        recovered = add_recover(stored, add_base(b, record.change, record.tuned_shape), tuned_dtype)
    else:
        recovered = xor_bytes(stored, xor_base(b, tuned_dtype)).view(tuned_dtype).view(record.tuned_shape)
    ok = tensor_sha256(recovered) == record.recovered_sha256
    # Base and diff are intact here, and XOR or one float addition per element gives the same bits
    # on every machine; only a grown embedding's new rows (a mean, summed in an order the CPU's
    # vector width decides) may come out otherwise.
    if not ok and (kind == "xor" or record.change is not Change.RESIZED):
        raise UserError(
            f"tensor {name}: recovered from an intact base and diff, yet not what the diff was made to give back",
            "this should not happen: report it with the diff's alpaca_forge_diff.json",
        )
    return recovered, ok


def check_base_tensor(record: TensorRecord, b: torch.Tensor, base: WeightFolder) -> None:
    """A wrong base fails on its first tensor that is not the one the diff was made from."""
    sha = tensor_sha256(b)
    if sha == record.base_sha256:
        return
    shapes = (
        f"; its shape is {list(b.shape)}, the diff's base had {record.base_shape}"
        if list(b.shape) != record.base_shape
        else ""
    )
    raise UserError(
        f"--base {base.path}: tensor {record.base} is not the one the diff was made from "
        f"(sha256 {sha[:16]}…, the diff's base had {record.base_sha256[:16]}…{shapes})",
        FIX_WRONG_BASE,
    )


def recover_unchecked(
    name: str, diff: WeightFolder, base: WeightFolder, tied: Embeddings | None
) -> torch.Tensor:
    """One tensor of an add diff without our record (the original's): diff + grown base, in the
    diff's dtype (float32, as the original wrote it). Nothing says what it should give back."""
    stored = diff.read(name)
    base_name = counterpart(name, base, tied)
    if base_name is None:
        raise UserError(
            f"--base {base.path}: has no tensor {name}, which the diff holds",
            f"{FIX_WRONG_BASE} (the same architecture)",
        )
    b = base.read(base_name)
    change = explained_change(name, stored, diff, base_name, b, base)
    return add_recover(stored, add_base(b, change, list(stored.shape)), stored.dtype)


def _log_diff(result: DiffResult) -> None:
    exactness = _exactness(
        result.bit_exact, result.tensors, result.max_abs_deviation, result.max_deviation_tensor
    )
    log.info(
        "diff (%s) of %d tensors (%d resized, %d new) written to %s: %s; %s; %.1f s, peak memory %s",
        result.kind,
        result.tensors,
        result.resized,
        result.new,
        result.output,
        _files(result.shards, result.bytes_written),
        exactness,
        result.elapsed_s,
        _mb(result.peak_rss_mb),
    )


def _log_recovered(result: RecoverResult, diff: Path) -> None:
    if result.verification is Verification.NO_RECORD:
        check = (
            f"NOT verified: {diff} has no {MANIFEST_FILE} (a diff the original weight_diff.py wrote?), "
            "so nothing records what it should give back"
        )
    elif result.verification is Verification.ROUNDING_DIFFERS:
        check = (
            f"NOT verified: {len(result.unverified)} tensors (first {result.unverified[0]}) differ from "
            "what the diff was made to give back although the diff and the base are intact (this "
            "machine rounds float32 sums otherwise?)"
        )
    else:
        check = "verified: every tensor sha256-equal to what the diff was made to give back"
    if result.bit_exact is not None:
        check += "; " + _exactness(
            result.bit_exact,
            result.tensors_verified,
            result.max_abs_deviation or 0.0,
            result.max_deviation_tensor,
        )
    log.log(
        logging.INFO if result.verified else logging.WARNING,
        "recovered %d tensors (%s) into %s: %s; %s; %.1f s, peak memory %s",
        result.tensors,
        result.kind,
        result.output,
        _files(result.shards, result.bytes_written),
        check,
        result.elapsed_s,
        _mb(result.peak_rss_mb),
    )


# ---------------------------------------------------------------------------------------------
# Small helpers


def _figures(records: dict[str, TensorRecord]) -> tuple[int, float, str | None]:
    """(tensors recovered bit for bit, the largest deviation from the tuned weights, the tensor
    where it is: None when every one is exact)."""
    exact = sum(r.bit_exact for r in records.values())
    worst = max(records, key=lambda n: records[n].max_abs_deviation, default=None)
    if worst is None or exact == len(records):
        return exact, 0.0, None
    return exact, records[worst].max_abs_deviation, worst


def _bar(names: list[str], desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(names, desc=desc, unit="tensor", disable=not progress, file=sys.stderr)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / BYTES_PER_MB if sys.platform == "darwin" else peak * 1024 / BYTES_PER_MB  # bytes / KiB


def _mb(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} MB"


def _files(shards: int, size: int) -> str:
    return f"{shards} weight file{'s' if shards != 1 else ''}, {size / BYTES_PER_MB:.1f} MB"


def _exactness(exact: int, total: int, deviation: float, where: str | None) -> str:
    if exact == total:
        return f"all {total} tensors equal to the tuned weights bit for bit"
    return (
        f"{exact} of {total} tensors equal to the tuned weights bit for bit, the others within "
        f"{deviation:.3g} (largest in {where})"
    )
