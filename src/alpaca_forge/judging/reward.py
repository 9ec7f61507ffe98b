"""A reward model: a sequence-classification model (one output) that scores an answer to an
instruction, as `train --method reward` writes it (the whole model, or a LoRA adapter of one
over its base).

It reads each (instruction, input, answer) as the very token ids training fed it: the folder's
prompt format renders the prompt, tokenised alone, then the answer's ids and the EOS, cut as SFT
cuts an example (`core.examples.encode_record`: answer tokens go from the end, the EOS stays).
The score is the head's output at the last token that is not padding, as in training.

`check_tokenizer` compares the reward model's tokenizer with a policy's from their tokenizer
files alone, so a reward model that reads other tokens than the policy writes is refused before
any weights load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import UserError
from ..core.examples import encode_record, eos_id
from ..core.library_noise import peft_call
from ..core.models import (
    ADAPTER_BASE_FILE,
    ERROR_EXCERPT_CHARS,
    adapter_facts,
    hub_offline,
    sequence_classifier,
)
from ..core.prompts import FORMAT_FILE, PromptFormat, read_saved_format
from ..core.records import Record

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_MAX_SEQ_LEN = 1024  # when the folder records none: the length `train` cuts at by default


class Prompted(Protocol):
    """What a scored item needs: an Alpaca record's instruction and input (`id` names it to a judge)."""

    id: str | None
    instruction: str
    input: str


def reward_ids(
    tokenizer: Any, fmt: PromptFormat, instruction: str, input: str, answer: str, max_seq_len: int
) -> list[int]:
    """The token ids a reward model reads for one answer: prompt ids + answer ids + EOS, exactly
    an SFT example's `input_ids` (so `train --method reward` and scoring agree by construction).
    A prompt that alone fills the window keeps its last tokens, then the EOS."""
    example = encode_record(Record(instruction, input, answer), 0, tokenizer, fmt, max_seq_len)
    if example is not None:
        return example.input_ids
    prompt = fmt.prompt(instruction, input, tokenizer)
    ids = tokenizer(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    return [*ids[-(max_seq_len - 1) :], eos_id(tokenizer)]


# ---------------------------------------------------------------------------------------------
# The folder, read without weights


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def adapter_base_spec(folder: Path) -> str:
    """The base an adapter folder was trained on: what `train` recorded, else peft's record."""
    recorded = adapter_facts(folder).get("base_model")
    if recorded:
        return str(recorded)
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"{folder / ADAPTER_CONFIG}: names no base model (base_model_name_or_path) ({e})",
            "train the reward model with `alpaca-forge train --method reward`, which records its base",
        ) from e
    if not base:
        raise UserError(
            f"{folder / ADAPTER_CONFIG}: base_model_name_or_path is empty",
            "set it to the base model's folder or name",
        )
    return str(base)


def check_folder(folder: str | Path) -> Path:
    """A reward-model folder that looks complete (no weights read): `--reward-model` is checked
    with this before anything loads."""
    path = Path(folder).expanduser()
    fix = "name the output folder of `alpaca-forge train --method reward`"
    if not path.is_dir():
        raise UserError(f"--reward-model {folder}: no such folder", fix)
    if not is_adapter(path) and not (path / "config.json").is_file():
        raise UserError(
            f"{path}: not a reward model (no config.json, no {ADAPTER_CONFIG}) (--reward-model)", fix
        )
    if not is_adapter(path):
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path / 'config.json'}: unreadable ({e})", fix) from e
        archs = config.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise UserError(
                f"{path / 'config.json'}: architectures is {archs}, a language model, not a reward model "
                "(a sequence-classification model) (--reward-model)",
                fix,
            )
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}: no tokenizer files beside the reward model (--reward-model)", fix)
    if read_saved_format(path) is None:
        raise UserError(
            f"{path}: no {FORMAT_FILE}, so how it read prompts in training is unknown (--reward-model)",
            'write {"format": "alpaca", "system": null} there if it was trained on Alpaca prompts',
        )
    return path


def _tokenizer(location: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(location), local_files_only=hub_offline())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{location}: no tokenizer can be loaded from it ({' '.join(str(e).split())[:ERROR_EXCERPT_CHARS]})",
            "a model folder holds its tokenizer files (tokenizer.json, tokenizer_config.json) beside the weights",
        ) from e


def check_tokenizer(folder: str | Path, policy_tokenizer: Any, policy: str, flag: str = "--reward-model") -> None:
    """Refuse a reward model whose tokenizer is not the policy's (another vocabulary: it would
    read the policy's answers as other tokens than it was trained on). Reads tokenizer files only."""
    path = check_folder(folder)
    mine = _tokenizer(path).get_vocab()
    theirs = policy_tokenizer.get_vocab()
    if mine == theirs:
        return
    only_mine = sorted(set(mine) - set(theirs))[:3]
    moved = sorted(t for t in set(mine) & set(theirs) if mine[t] != theirs[t])[:3]
    example = (
        f"e.g. {only_mine} are not in the policy's"
        if only_mine
        else f"e.g. {moved} have other ids"
        if moved
        else "the policy has tokens it lacks"
    )
    where = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path
    raise UserError(
        f"{where}: the reward model's tokenizer is not the policy's ({flag} {folder}: {len(mine)} tokens; "
        f"policy {policy}: {len(theirs)} tokens; {example})",
        f"train the reward model from the policy's base (`alpaca-forge train --method reward --model BASE`), "
        f"or pass a {flag} trained with the tokenizer of {policy}",
    )


def saved_max_seq_len(folder: Path) -> int | None:
    """The window `train` cut examples to, when it recorded one."""
    value = adapter_facts(folder).get("max_seq_len") if (folder / ADAPTER_BASE_FILE).is_file() else None
    return int(value) if isinstance(value, int) and value >= 2 else None


# ---------------------------------------------------------------------------------------------
# Loading


def _seq_cls_from(location: str) -> Any:
    """A whole reward model saved in a folder: a sequence-classification model with one output."""
    from transformers import AutoModelForSequenceClassification

    from ..core.gguf_cache import no_hf_progress_bars

    try:
        with no_hf_progress_bars():
            return AutoModelForSequenceClassification.from_pretrained(location, local_files_only=hub_offline())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{location}: cannot load it as a reward model ({' '.join(str(e).split())[:ERROR_EXCERPT_CHARS]})",
            "check that the folder holds a complete model (config.json, weights, tokenizer files)",
        ) from e


def _base_seq_cls(spec: str) -> Any:
    """The base of a reward adapter as `train --method reward` built it (its head to be filled
    by the adapter)."""
    return sequence_classifier(spec, "use the base the reward model was trained on (its adapter_config.json names it)")


@dataclass
class RewardModel:
    """A loaded reward model, ready to score answers."""

    model: Any  # a transformers *ForSequenceClassification, num_labels=1, in eval mode
    tokenizer: Any
    prompt_format: PromptFormat
    folder: Path
    max_seq_len: int
    batch_size: int = 8

    @property
    def name(self) -> str:
        return str(self.folder)

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_seq_len: int | None = None,
    ) -> RewardModel:
        """Load the reward model in `folder` (a whole model, or an adapter merged into its base)."""
        from ..core.devices import pick_device, pick_dtype

        path = check_folder(folder)
        fmt = read_saved_format(path)
        assert fmt is not None  # check_folder refuses a folder without one
        tokenizer = _tokenizer(path)
        if is_adapter(path):
            from peft import PeftModel

            base_spec = adapter_base_spec(path)
            model = _base_seq_cls(base_spec)
            if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer))
            try:
                with peft_call():
                    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
            except (RuntimeError, ValueError, KeyError) as e:
                first = " ".join(str(e).split())[:ERROR_EXCERPT_CHARS]
                raise UserError(
                    f"{path}: this reward adapter does not fit its base {base_spec} ({first})",
                    "pass the folder `train --method reward` wrote, with its base where it was",
                ) from e
        else:
            model = _seq_cls_from(str(path))
        if model.config.num_labels != 1:
            raise UserError(
                f"{path / 'config.json'}: num_labels is {model.config.num_labels}; a reward model has one output",
                "name the output folder of `alpaca-forge train --method reward`",
            )
        if model.config.pad_token_id is None:
            # Right-padded batches: the score is read at the last token that is not padding.
            model.config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
            )
        dev = pick_device(device)
        model = model.to(device=dev, dtype=pick_dtype(dtype, dev)).eval()
        window = max_seq_len or saved_max_seq_len(path) or DEFAULT_MAX_SEQ_LEN
        return cls(model, tokenizer, fmt, path, window, batch_size)

    @staticmethod
    def check(folder: str | Path, policy_model: str) -> None:
        """Refuse `folder` as a reward model for the policy `policy_model` (a built-in name, a
        folder, a .gguf) when their tokenizers differ; reads tokenizer files, no weights."""
        from ..core.models import load_tokenizer

        check_tokenizer(folder, load_tokenizer(policy_model), policy_model)

    def ids(self, item: Prompted, answer: str) -> list[int]:
        return reward_ids(self.tokenizer, self.prompt_format, item.instruction, item.input, answer, self.max_seq_len)

    def score(self, items: Sequence[Prompted], answers: Sequence[str]) -> list[float]:
        """One score per (item, answer) pair, in order; higher is better."""
        import torch

        if len(items) != len(answers):
            raise ValueError(f"{len(items)} items but {len(answers)} answers")
        encoded = [self.ids(item, answer) for item, answer in zip(items, answers, strict=True)]
        # Longest first, so a batch holds sequences of like length and pads little.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        scores = [0.0] * len(encoded)
        pad = int(self.model.config.pad_token_id)
        device = self.model.device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, : len(encoded[i])] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, 1)
                for row, i in enumerate(batch):
                    scores[i] = float(logits[row, 0])
        return scores

    def close(self) -> None:
        self.model = None
