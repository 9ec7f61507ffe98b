"""Setup of the reward and preference methods, in the order it can fail, cheapest first.

output folder and resume -> precision -> gradient accumulation -> pair file (and the held-out
split) -> --reference against the policy's base -> tokenizer, prompt format, pair ids -> model
(a causal LM, or a sequence-classification model with one output for `reward`) -> LoRA settings
(TRL wraps the model) -> disk space. Every mistake in the input shows before a model loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.examples import eos_id
from ..core.models import (
    load_pretrained,
    load_tokenizer,
    model_format,
    resolve_model,
    sequence_classifier,
    weights_fingerprint,
)
from ..core.pairs import Pair, pairs_fingerprint, read_pairs
from ..core.records import split_records
from .checkpoints import check_resumable
from .config import TrainConfig
from .distributed import world_size
from .pair_data import dataset_of, encode_pairs, rows_for
from .setup import (
    Prepared,
    _base_model_name,
    add_pad_embedding,
    check_disk,
    estimate_checkpoint_bytes,
    load_model,
    lora_config,
    start,
)

log = logging.getLogger(__name__)


def read_pair_data(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Training and held-out pairs; --val-size holds pairs out by the one seeded split."""
    pairs = read_pairs(config.data)
    if config.val:
        return pairs, read_pairs(config.val)
    if config.val_size:
        train, val = split_records(pairs, config.val_size, config.seed)  # type: ignore[arg-type]
        return list(train), list(val)  # type: ignore[arg-type]
    return pairs, []


def check_reference(config: TrainConfig) -> str | None:
    """--reference, checked without loading weights: with LoRA it may only be the policy's base."""
    if config.reference is None:
        return None
    resolve_model(config.reference)  # a missing folder or unknown name: an error now
    if config.weights == "full":
        return config.reference
    if _same_model(config.reference, config.model):
        return None  # the base itself: the adapter-disabled policy is it
    raise UserError(
        f"--reference {config.reference}: a reference model that is not the policy's base "
        f"({config.model}); with --tune {config.weights} the reference is the base with the adapter "
        "disabled, so no other model can be it",
        "drop --reference (the base is the reference), or use --tune full to train against another reference",
    )


def _same_model(a: str, b: str) -> bool:
    if _base_model_name(a) == _base_model_name(b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_dir() and pb.is_dir()):
        return False

    def facts(p: Path) -> tuple[Any, ...]:
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return (None,)
        config.pop("_name_or_path", None)
        weights = sorted((f.name, _sample_digest(f)) for f in p.glob("*.safetensors"))
        tok = (p / "tokenizer.json").read_bytes() if (p / "tokenizer.json").is_file() else b""
        return (config, weights, tok)

    return facts(pa) == facts(pb) and facts(pa) != (None,)


def _sample_digest(path: Path, span: int = 1 << 20) -> str:
    """Size and a hash of the first and last MiB of a weights file: a copy matches, another model's
    weights (even of the same shapes) do not, and no multi-GB file is read whole."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(span))
        f.seek(max(0, size - span))
        h.update(f.read(span))
    return h.hexdigest()


def load_reward_model(config: TrainConfig, autocast: Any) -> Any:
    """A sequence-classification model with one output on the base's weights; its score head
    starts random (seeded)."""
    model = sequence_classifier(
        config.model,
        "use a causal LM transformers also has a ...ForSequenceClassification class for (Llama, Qwen, ...)",
        seed=config.seed,
    )
    if config.weights == "lora" and autocast is not None:
        model = model.to(autocast)
    return model


def prepare_pairs(config: TrainConfig, *, resume: bool) -> Prepared:
    output, done, device, autocast, accumulation = start(config, resume)

    train_pairs, val_pairs = read_pair_data(config)
    reference = check_reference(config)
    facts: dict[str, Any] = {
        "base_model": _base_model_name(config.model),
        "objective": config.objective,
        "weights": config.weights,
        "data_fingerprint": pairs_fingerprint(train_pairs),
        "val_fingerprint": pairs_fingerprint(val_pairs) if val_pairs else None,
    }
    resume_from = done[-1] if resume and done else None
    if resume_from:
        check_resumable(config, facts, resume_from)

    tokenizer = load_tokenizer(config.model)
    if reference is not None and load_tokenizer(reference).get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"--reference {reference}: its tokenizer is not the policy's ({config.model}), so their "
            "log-probabilities of the same answer cannot be compared",
            "use a reference model of the same family and tokenizer (the SFT model the policy starts from)",
        )
    fmt = model_format(config.model, config.format, config.system, tokenizer, for_training=True)
    added_pad = tokenizer.pad_token_id is None
    if added_pad:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    eos_id(tokenizer)
    encoded, report = encode_pairs(train_pairs, tokenizer, fmt, config.max_seq_len)
    if not encoded:
        raise UserError(
            f"{config.data}: no pair fits the window of {config.max_seq_len} tokens ({report.summary()})",
            "raise --max-seq-len, or shorten the prompts",
        )
    log.info("pairs: %s", report.summary())
    val_encoded, val_report = encode_pairs(val_pairs, tokenizer, fmt, config.max_seq_len)
    if val_pairs and not val_encoded:
        raise UserError(
            f"no held-out pair fits the window of {config.max_seq_len} tokens", "raise --max-seq-len"
        )

    if config.objective == "reward":
        model = load_reward_model(config, autocast) if config.weights != "qlora" else _qlora_reward(config)
    else:
        model = load_model(config, autocast)
        if config.weights == "lora":
            facts["base_fingerprint"] = weights_fingerprint(model)
            if autocast is not None:
                model = model.to(autocast)
    if added_pad:
        add_pad_embedding(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft = None
    if config.weights in ("lora", "qlora"):
        peft = lora_config(model, config, "SEQ_CLS" if config.objective == "reward" else "CAUSAL_LM")
    ref_model = None
    own_reference = reference is not None or config.precompute_reference is False
    if config.objective in ("dpo", "kto") and config.weights == "full" and own_reference:
        # TRL would otherwise load a copy by the model's name, which may be a GGUF or built-in
        ref_model = load_pretrained(reference or config.model)[0].float()
        if added_pad:
            add_pad_embedding(ref_model, tokenizer)
    if config.gradient_checkpointing and peft is None:
        model.gradient_checkpointing_enable()
    check_disk(output, _checkpoint_bytes(model, peft), config.save_total_limit)

    train_rows = rows_for(config.objective, encoded)
    if config.objective == "kto":  # KTO reads its rows in order (see preference._Ours): mix them, seeded
        random.Random(config.seed).shuffle(train_rows)
    val_rows = rows_for(config.objective, val_encoded) if val_encoded else None
    facts.update(
        {
            "prompt_format": fmt.to_dict(),
            "added_pad_token": added_pad,
            "pairs_tokenized": report.to_dict(),
            "validation_pairs_tokenized": val_report.to_dict() if val_pairs else None,
            "items": len(train_rows),
            "gradient_accumulation": accumulation,
            "processes": world_size(),
            "learning_rate": config.resolved_learning_rate(),
            "reference": reference or ("adapter-disabled base" if peft is not None else config.model),
            "max_seq_len": config.max_seq_len,  # the window judging.reward cuts scored answers to
        }
    )
    return Prepared(
        output=output,
        resume_from=resume_from,
        device=device,
        autocast=autocast,
        tokenizer=tokenizer,
        fmt=fmt,
        model=model,
        train_set=dataset_of(train_rows),
        val_set=dataset_of(val_rows) if val_rows else None,
        collator=None,
        accumulation=accumulation,
        description={"config": config.to_dict(), **facts},
        peft_config=peft,
        ref_model=ref_model,
        val_rows=val_rows,
    )


def _checkpoint_bytes(model: Any, peft: Any) -> int:
    """What one checkpoint takes: the whole model's, or (TRL wraps the model later) the adapter's
    fp32 weights and AdamW's two moments, counted from the layers it targets."""
    import torch

    if peft is None:
        return estimate_checkpoint_bytes(model)
    targets = peft.target_modules
    every = targets == "all-linear"
    params = 0
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit"
        if linear and short not in ("lm_head", "score") and (every or short in targets):
            params += (module.in_features + module.out_features) * peft.r
    if peft.modules_to_save:
        params += sum(
            p.numel() for n, p in model.named_parameters() if n.split(".")[0] in peft.modules_to_save
        )
    return params * 12


def _qlora_reward(config: TrainConfig) -> Any:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    source = resolve_model(config.model)
    if source.kind not in ("dir", "hub"):
        raise UserError(
            f"--method reward --tune qlora loads {config.model} in 4 bits from a model folder",
            "convert the model to a folder first (alpaca-forge train --method full saves one), or use --tune lora",
        )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        source.location, num_labels=1, quantization_config=quant, dtype=torch.bfloat16
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
