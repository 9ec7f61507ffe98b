"""`alpaca-forge export diff | recover`: a fine-tune shared as a weight diff against its base model,
and rebuilt from the diff and the base (the formats are in `diff`).

Both commands stream: one tensor of each model in memory at a time, plus the output shard being
filled (at most `--shard-size-mb`), each shard written as soon as it is full.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.chat_template import retemplate_folder
from ..core.errors import UserError
from ..core.files import staged_output
from ..core.hardware import BYTES_PER_MB, peak_rss_mb
from ..core.model_folder import weights_folder
from ..core.prompts import FORMAT_FILE
from ..core.weight_shards import ShardWriter, WeightFolder, open_weights
from .config import DiffConfig, DiffKind, RecoverConfig
from .diff import (
    FIX_WRONG_BASE,
    MANIFEST_FILE,
    Change,
    Embeddings,
    TensorRecord,
    add_base,
    add_diff,
    add_recover,
    check_inputs,
    counterpart,
    dtype_from_name,
    dtype_name,
    explained_change,
    raw_bytes,
    read_manifest,
    stored_layout,
    tensor_sha256,
    tied_embeddings,
    write_manifest,
    xor_base,
    xor_bytes,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
# The output folder


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
    base = open_weights(weights_folder(config.base, "--base"), "--base")
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
    base = open_weights(weights_folder(config.base, "--base"), "--base")
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
        retemplate_folder(tmp)  # the chat template renders the saved prompt format
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
