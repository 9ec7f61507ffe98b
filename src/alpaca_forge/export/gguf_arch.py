"""What each transformers architecture becomes in a GGUF file: the registry `to_gguf` consults.

An `Arch` says everything a family needs beyond the shared writing loop: llama.cpp's name for it,
whether Q/K rows are permuted, which configurations it cannot write (`check`), its
hyper-parameter keys (`hparams`), how a tensor changes on the way (`tensor`), tensors transformers
does not store but llama.cpp reads (`extra_tensors`), and tensors to leave out (`skip`).
`ARCHITECTURES` maps a transformers class name (config.architectures) to its `Arch`.

Families with enough of their own live in their own module (`gguf_gemma` for Gemma 2 and 3) that
imports `Arch`, `register` and the shared helpers from here and calls `register` at import.
`to_gguf` imports those modules (this one cannot: the import would be a cycle), so wherever the
writer is, the registry is whole. A family module reuses `llama_hparams` in its own `hparams`
(call it, then add its keys) and `rope_check(...)` for its `check`.
Tensor names come from the `gguf` package's name map for the `gguf` architecture; a tensor it
cannot name is an error, never silently dropped.

RoPE. transformers' Llama rotates the two halves of each head's vector (`rotate_half`); llama.cpp's
`llama` arch rotates interleaved pairs, so q_proj/k_proj rows are permuted (`permute_qk`). Qwen2,
Qwen3 and Phi-3 run NEOX rope in llama.cpp (the half-split layout) and keep their rows. Scaled
RoPE is written as llama.cpp reads it: `linear` and `yarn` as keys, Llama 3's `llama3` as a
`rope_freqs.weight` tensor of per-frequency divisors, Phi-3's `longrope` as the
`rope_factors_long/short.weight` tensors plus an attention factor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import UserError

log = logging.getLogger("alpaca_forge")

# ---------------------------------------------------------------------------------------------
# What every llama-like family shares


def rope_parameters(config: Any) -> dict[str, Any]:
    """The model's RoPE settings as one dict (transformers 5 keeps them in `rope_parameters`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_dims(config: Any) -> int:
    """How many of a head's dimensions are rotated (Phi-3's `partial_rotary_factor`)."""
    return int(head_dim(config) * float(rope_parameters(config).get("partial_rotary_factor", 1.0)))


def rope_check(*supported: str) -> Callable[[Any], None]:
    """A `check` that accepts the RoPE types named (plus unscaled rope) and refuses any other."""

    def check(config: Any) -> None:
        kind = rope_parameters(config)["rope_type"]
        if kind != "default" and kind not in supported:
            allowed = ", ".join(("default", *supported))
            raise UserError(
                f"GGUF export does not support RoPE scaling of type {kind!r} for "
                f"{type(config).__name__.removesuffix('Config')} yet (rope_parameters in config.json)",
                f"supported here: {allowed}; or convert the merged folder with llama.cpp's convert_hf_to_gguf.py",
            )

    return check


def add_sizes(writer: Any, config: Any) -> None:
    """The keys every family writes alike: context, widths, blocks, heads and the norm epsilon."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def llama_hparams(writer: Any, config: Any) -> None:
    """The keys every llama-like family writes: sizes, heads, norm epsilon, RoPE base and dims,
    and linear/yarn scaling when the config has it."""
    import gguf

    rope = rope_parameters(config)
    add_sizes(writer, config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(rope_dims(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_vocab_size(config.vocab_size)


def _same(hf_name: str, data: np.ndarray, config: Any) -> np.ndarray:
    return data


def _nothing_extra(config: Any) -> dict[str, np.ndarray]:
    return {}


def _skip_inv_freq(hf_name: str) -> bool:
    return hf_name.endswith("rotary_emb.inv_freq")  # llama.cpp computes the frequencies itself


_LINEAR_ONLY = rope_check("linear")


@dataclass(frozen=True)
class Arch:
    """One transformers architecture as llama.cpp runs it (see the module docstring)."""

    gguf: str  # llama.cpp's architecture: a gguf.MODEL_ARCH member's name, lower-case
    permute_qk: bool = False  # q_proj/k_proj rows from half-split to interleaved pairs
    check: Callable[[Any], None] = _LINEAR_ONLY  # raise UserError for what cannot be written
    hparams: Callable[[Any, Any], None] = llama_hparams  # (writer, config): every hyper-parameter key
    tensor: Callable[[str, np.ndarray, Any], np.ndarray] = _same  # (hf name, float32 data, config)
    extra_tensors: Callable[[Any], dict[str, np.ndarray]] = _nothing_extra  # gguf name -> float32
    skip: Callable[[str], bool] = _skip_inv_freq  # hf names that do not go into the file


ARCHITECTURES: dict[str, Arch] = {}


def register(hf_class: str, arch: Arch) -> None:
    """Make `hf_class` (a transformers class name, as in config.architectures) exportable."""
    ARCHITECTURES[hf_class] = arch


# ---------------------------------------------------------------------------------------------
# Llama (1, 2, 3.x) and Mistral


def llama3_rope_freqs(config: Any) -> dict[str, np.ndarray]:
    """Llama 3.x's `rope_type: llama3`: per frequency, the divisor transformers applies
    (`_compute_llama3_parameters`), which llama.cpp reads from `rope_freqs.weight`. Wavelengths
    shorter than original/high_freq_factor keep their frequency, longer than
    original/low_freq_factor are slowed by `factor`, and those between blend the two."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return {}
    dims = rope_dims(config)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    inv_freq = 1.0 / float(rope["rope_theta"]) ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    divisor = np.where(
        wavelen < original / high,
        1.0,
        np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    return {"rope_freqs.weight": divisor.astype(np.float32)}


LLAMA = Arch("llama", permute_qk=True, check=rope_check("linear", "llama3"), extra_tensors=llama3_rope_freqs)
register("LlamaForCausalLM", LLAMA)
register("MistralForCausalLM", LLAMA)  # a Llama with other defaults; llama.cpp runs it as one

# ---------------------------------------------------------------------------------------------
# Qwen2 and Qwen3 (q_norm/k_norm per head, explicit head_dim: both handled by the shared code)

_qwen_rope = rope_check("linear", "yarn")


def qwen_check(config: Any) -> None:
    """llama.cpp's qwen2/qwen3 attend in full: a sliding window transformers applies is refused."""
    _qwen_rope(config)
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise UserError(
            f"GGUF export: llama.cpp runs {type(config).__name__.removesuffix('Config')} without its "
            f"sliding window (use_sliding_window: true, sliding_window: {config.sliding_window} in config.json)",
            "export a model trained without the sliding window (use_sliding_window: false)",
        )


register("Qwen2ForCausalLM", Arch("qwen2", check=qwen_check))
register("Qwen3ForCausalLM", Arch("qwen3", check=qwen_check))

# ---------------------------------------------------------------------------------------------
# Phi-3: fused qkv_proj (-> attn_qkv) and gate_up_proj (-> ffn_up, gate half first), both split
# by llama.cpp as transformers splits them, so the tensors go in as they are.


def _longrope(config: Any) -> tuple[dict[str, Any], int, float] | None:
    """Phi-3's LongRoPE settings, its original context and attention factor, or None."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "longrope":
        return None
    original = int(rope.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    factor = rope.get("factor") or config.max_position_embeddings / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return rope, original, float(attention)


def phi3_hparams(writer: Any, config: Any) -> None:
    """Phi-3's keys: the shared ones, its sliding window (which llama.cpp reads but, in the
    versions we run, does not apply: prompts longer than the window are attended in full), and
    LongRoPE's original context and attention factor."""
    llama_hparams(writer, config)
    window = getattr(config, "sliding_window", None)
    writer.add_sliding_window(int(window or 0))
    if window and window < config.max_position_embeddings:
        log.warning(
            "Phi-3's sliding window (%d positions) is in the GGUF, but llama.cpp runs Phi-3 with full "
            "attention: prompts longer than the window are answered differently there",
            window,
        )
    longrope = _longrope(config)
    if longrope:
        _, original, attention = longrope
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(attention)


def phi3_rope_factors(config: Any) -> dict[str, np.ndarray]:
    """LongRoPE's per-frequency divisors: llama.cpp takes the long ones when its context is longer
    than the original one, as transformers does past that length."""
    longrope = _longrope(config)
    if not longrope:
        return {}
    rope = longrope[0]
    return {
        "rope_factors_long.weight": np.asarray(rope["long_factor"], dtype=np.float32),
        "rope_factors_short.weight": np.asarray(rope["short_factor"], dtype=np.float32),
    }


register(
    "Phi3ForCausalLM",
    Arch("phi3", check=rope_check("longrope"), hparams=phi3_hparams, extra_tensors=phi3_rope_factors),
)
