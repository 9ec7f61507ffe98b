"""The weight diff formats of `alpaca-forge export diff | recover`: a fine-tune shared as a diff
against its base model, per tensor, and the record that lets recovery check both. The commands
that stream model folders through them are in `diff_runner`.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.errors import UserError
from ..core.weight_shards import FIX_DAMAGED, WeightFolder
from .config import DiffKind

if TYPE_CHECKING:
    import torch

MANIFEST_FILE = "alpaca_forge_diff.json"
MANIFEST_FORMAT = "alpaca-forge weight diff"
MANIFEST_VERSION = 1
FIX_WRONG_BASE = "pass the exact base model the diff was made from"


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
# Which base a tuned model, and each of its tensors, is made from


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
