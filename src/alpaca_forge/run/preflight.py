"""Before training: a few examples shown as the trainer sees them, and a hard check that every
example's EOS carries loss.

A model that never sees a loss on its EOS never learns to stop: the most common fine-tuning
failure people report (often a collator that masks padding by id when the pad token is the EOS).
So the check runs the real path, records -> `core.examples` -> the train stage's batches ->
the collator, and counts the EOS labels that reach the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.records import Record
from ..train.config import TrainConfig

SHOWN = 3  # examples printed and kept


@dataclass(frozen=True)
class Preflight:
    format: str
    examples: int
    eos_token: str
    eos_trained: int  # examples whose EOS carries loss after batching
    trained_tokens: int
    tokens: int
    shown: list[str] = field(default_factory=list)  # masked prompt in ⟦brackets⟧, trained answer plain
    left_out: int = 0  # records whose prompt alone fills max_seq_len: no loss, not trained on

    @property
    def ok(self) -> bool:
        return self.examples > 0 and self.eos_trained == self.examples

    def text(self) -> str:
        head = (
            f"preflight: {self.examples} examples in the {self.format} format, {self.tokens} tokens, "
            f"{self.trained_tokens} trained; EOS ({self.eos_token!r}) carries loss in "
            f"{self.eos_trained} of {self.examples}"
            + (
                f"; {self.left_out} records left out (the prompt alone fills max_seq_len)"
                if self.left_out
                else ""
            )
        )
        body = "\n".join(self.shown)
        return f"{head}\n{body}\n(⟦masked: the prompt, no loss⟧ then the trained answer, ending in EOS)\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "examples": self.examples,
            "eos_token": self.eos_token,
            "eos_trained": self.eos_trained,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "ok": self.ok,
            "left_out": self.left_out,
            "shown": self.shown,
        }


def eos_labels_after_batching(examples: Sequence[Any], config: TrainConfig, eos: int, pad: int) -> int:
    """How many examples' EOS reach the loss once batched and collated as the trainer does it."""
    from ..train.batching import Collator, SFTDataset

    ds = SFTDataset(examples, config.batching, config.max_seq_len)
    collate = Collator(pad, packed=config.batching == "packed")
    ends = 0
    for i in range(len(ds)):
        batch = collate([ds[i]])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        ends += int(((ids == eos) & (labels == eos)).sum())  # an EOS input that is also a target
    return min(ends, len(examples))


def check(
    config: TrainConfig, records: Sequence[Record], where: str, shown: int = SHOWN, tokenizer: Any = None
) -> Preflight:
    """Tokenises the records exactly as `train` will (with `tokenizer`, else the model's, loaded);
    `require_eos` then refuses a run in which any EOS carries no loss."""
    from ..core.examples import describe_example, eos_id, tokenize_records
    from ..core.models import load_tokenizer, model_format

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    fmt = model_format(config.model, config.format, config.system, tokenizer, for_training=True)
    eos = eos_id(tokenizer)
    examples, report = tokenize_records(
        records, tokenizer, fmt, config.max_seq_len, config.train_on_inputs, assistant_turns=config.assistant_turns
    )
    if not examples:
        raise UserError(
            f"{where}: none of the {len(records)} records fits --max-seq-len {config.max_seq_len} with room for an answer",
            "raise train.max_seq_len in the recipe",
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    trained = sum(1 for e in examples if e.labels[-1] == eos and e.input_ids[-1] == eos)
    after_batching = (
        eos_labels_after_batching(examples, config, eos, pad) if trained == len(examples) else trained
    )
    lines = [
        f"--- example {i + 1} (record {e.record + 1}): {len(e.input_ids)} tokens, {e.trained_tokens} trained\n"
        + describe_example(e, tokenizer, color=False)
        for i, e in enumerate(examples[:shown])
    ]
    result = Preflight(
        fmt.name,
        len(examples),
        tokenizer.convert_ids_to_tokens(eos),
        after_batching,
        report.trained_tokens,
        report.tokens,
        lines,
        len(report.no_room),
    )
    return result


def require_eos(pre: Preflight, where: str, kept: Path | None = None) -> None:
    if pre.ok:
        return
    missing = pre.examples - pre.eos_trained
    raise UserError(
        f"{where}: the EOS token carries no loss in {missing} of {pre.examples} training examples, so the "
        "model would never learn to stop" + (f" (the examples are in {kept})" if kept else ""),
        "use a tokenizer whose EOS differs from its padding token, or the packed batching "
        "(train.batching: packed), and check train.max_seq_len leaves room for the answer",
    )
