"""Gemma 2 and Gemma 3 (text) in GGUF: entries of `gguf_arch`'s registry, made when `to_gguf`
imports this module.

What sets Gemma apart, and how the file carries it (each fact as llama.cpp's `gemma2`/`gemma3`
read it; a setting llama.cpp would run otherwise than transformers is refused, never guessed):

- RMSNorm multiplies by (1 + weight) in transformers, by the weight in llama.cpp: every norm
  weight (attention, the post-attention/pre- and post-feed-forward norms, Gemma 3's per-head
  q/k norms, the final one) is stored plus one.
- The embedding is scaled by sqrt(hidden_size) inside llama.cpp, as transformers does; the MLP's
  activation is llama.cpp's GELU, the tanh approximation (`gelu_pytorch_tanh`).
- Sliding-window layers: the window, and which layers use it as a period (a layer is global when
  (i + 1) is a multiple of it: Gemma 2's 2, Gemma 3's 6), from the config's `layer_types`.
  Gemma 3's local layers have their own RoPE base (`rope.freq_base_swa`); its global layers may
  have linear RoPE scaling (the 4B and larger).
- Soft-capping: Gemma 2 caps attention scores and final logits (llama.cpp always does, so both
  must be set); Gemma 3 may cap final logits, and llama.cpp cannot cap its attention scores.
- Attention scale: llama.cpp scales queries by 1/sqrt(head_dim), except for the model sizes it
  recognises as 27B (by layer count) where it uses 1/sqrt(hidden_size / heads); transformers uses
  `query_pre_attn_scalar`, so the two must agree.
- Gemma 2 always ties its output to the embedding in llama.cpp.

Both use RoPE on half-split vectors (NEOX) in llama.cpp, as transformers does: no row permutation.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import numpy as np

from ..core.errors import UserError
from .gguf_arch import Arch, add_sizes, head_dim, register

# Layer counts llama.cpp takes for the 27B models, whose attention scale differs.
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")
_FIX = "export the merged folder with llama.cpp's convert_hf_to_gguf.py, or keep the base model's setting"


def _refuse(config: Any, what: str, fix: str = _FIX) -> NoReturn:
    raise UserError(f"GGUF export of {type(config).__name__.removesuffix('Config')}: {what}", fix)


# ---------------------------------------------------------------------------------------------
# Settings read from the config


def rope_by_layer_type(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global layers' RoPE, sliding layers' RoPE). Gemma 3 keeps one dict per layer type in
    `rope_parameters`; Gemma 2 one dict for all."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        full, sliding = dict(params["full_attention"]), dict(params["sliding_attention"])
    else:
        full = sliding = params or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    for rope in (full, sliding):
        rope.setdefault("rope_type", rope.get("type", "default"))
    return full, sliding


def sliding_period(config: Any) -> int:
    """The period p with layer i global exactly when (i + 1) % p == 0, as llama.cpp lays layers
    out (p = 1: all global; p = layers + 1: all sliding)."""
    types = list(config.layer_types)
    for period in range(1, len(types) + 2):
        laid_out = [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(types))
        ]
        if laid_out == types:
            return period
    _refuse(
        config,
        f"its layer_types ({', '.join(types)}) are not one global layer every N layers, "
        "the only layout llama.cpp runs",
    )


def attention_scale_base(arch: str, config: Any) -> float:
    """What llama.cpp divides queries by the square root of (see the module docstring)."""
    if config.num_hidden_layers == _LAYERS_27B[arch]:
        return config.hidden_size / config.num_attention_heads
    return float(head_dim(config))


# ---------------------------------------------------------------------------------------------
# The registry's hooks


def _check(arch: str, config: Any) -> None:
    scalar = float(config.query_pre_attn_scalar)
    expected = attention_scale_base(arch, config)
    if not math.isclose(scalar, expected):
        _refuse(
            config,
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar} but llama.cpp scales this model's "
            f"queries by 1/sqrt({expected:g}) (head_dim, or hidden_size / heads for the 27B layer count)",
            f"set query_pre_attn_scalar to {expected:g} in config.json before training, or run it in transformers",
        )
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation not in _TANH_GELU:
        _refuse(
            config, f"hidden_activation is {activation!r}; llama.cpp runs Gemma with tanh-approximated GELU"
        )
    if getattr(config, "attention_bias", False):
        _refuse(config, "attention_bias is true; llama.cpp's Gemma has no attention biases")
    full, sliding = rope_by_layer_type(config)
    if full["rope_type"] not in ("default", "linear") or sliding["rope_type"] != "default":
        _refuse(
            config,
            f"RoPE scaling {full['rope_type']!r} (global layers) / {sliding['rope_type']!r} (sliding layers); "
            "llama.cpp reads linear scaling of the global layers only",
        )
    sliding_period(config)
    if arch == "gemma2":
        if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
            _refuse(config, "a soft-cap is null in config.json; llama.cpp's gemma2 always caps both")
        if not getattr(config, "tie_word_embeddings", True):
            _refuse(config, "tie_word_embeddings is false; llama.cpp's gemma2 always ties the output")
    else:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            _refuse(config, "attn_logit_softcapping is set; llama.cpp's gemma3 cannot cap attention scores")
        if getattr(config, "use_bidirectional_attention", False):
            _refuse(config, "use_bidirectional_attention is true; llama.cpp's gemma3 attends causally")


def _hparams(writer: Any, config: Any) -> None:
    import gguf

    full, sliding = rope_by_layer_type(config)
    add_sizes(writer, config)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(full["rope_theta"]))
    writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    if full["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    # No window (null) is a window as long as the context: the layers' RoPE bases still differ.
    writer.add_sliding_window(int(config.sliding_window or config.max_position_embeddings))
    writer.add_sliding_window_pattern(sliding_period(config))
    if getattr(config, "attn_logit_softcapping", None) is not None:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_vocab_size(config.vocab_size)


def _norm_plus_one(hf_name: str, data: np.ndarray, config: Any) -> np.ndarray:
    """transformers' Gemma RMSNorm scales by (1 + weight); llama.cpp's by the weight."""
    return data + 1.0 if hf_name.endswith("norm.weight") else data


def _refuse_multimodal(config: Any) -> None:
    raise UserError(
        "GGUF export does not write Gemma 3's vision tower (Gemma3ForConditionalGeneration)",
        "export the text model alone (Gemma3ForCausalLM, e.g. google/gemma-3-1b-it), "
        "or convert the merged folder with llama.cpp's convert_hf_to_gguf.py (and its --mmproj)",
    )


def _arch(name: str) -> Arch:
    return Arch(name, check=lambda config: _check(name, config), hparams=_hparams, tensor=_norm_plus_one)


register("Gemma2ForCausalLM", _arch("gemma2"))
register("Gemma3ForCausalLM", _arch("gemma3"))
register("Gemma3ForConditionalGeneration", Arch("gemma3", check=_refuse_multimodal))
