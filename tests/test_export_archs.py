"""GGUF export of the newer families: Llama 3.x with its scaled RoPE, Qwen3, Phi-3.

Each tiny random model goes through the real `export gguf` command, whose parity check loads the
file in llama.cpp and compares its next-token picks with transformers' on the 100 prompts. The
RoPE settings are chosen so that scaling changes the rotation within the prompts' length: a
file whose frequencies were wrong would fail the check (see the rope_freqs test).
"""

from __future__ import annotations

import json

import pytest
import torch

from test_export import byte_level, export, metadata, parity_of, saved, sentencepiece_style, tiny

from conftest import TINY_SHAPE, assert_user_error

pytestmark = pytest.mark.llamacpp  # every test here loads its file in llama.cpp

# Llama 3.1's scaling, squeezed so that it matters for short prompts: wavelengths over 64
# positions are slowed 8 times, those under 16 kept, those between blended.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# Phi-4-mini style (tied output): 3/4 of each head rotated, LongRoPE with per-frequency divisors. The
# parity prompts are shorter than the original 4096 positions, so both sides use the short ones
# (made far from 1 here), and the attention factor sqrt(1 + ln 4 / ln 4096) scales them all.
LONGROPE = {
    "rope_type": "longrope",
    "partial_rotary_factor": 0.75,
    "short_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
    "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
    "original_max_position_embeddings": 4096,
}


def _settings(tokenizer, **shape):
    return {
        "vocab_size": len(tokenizer),
        **TINY_SHAPE,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **shape,
    }


def qwen3(tokenizer, **shape):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    # head_dim 32 with 4 heads of a 64-wide model: Qwen3 sets head_dim apart from hidden/heads
    return Qwen3ForCausalLM(
        Qwen3Config(**_settings(tokenizer, head_dim=32, tie_word_embeddings=True, **shape))
    )


def phi3(tokenizer, **shape):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**_settings(tokenizer, sliding_window=2047, **shape)))


ARCHS = {
    # name: (make tokenizer, make model, llama.cpp architecture, tensors the file must hold)
    "llama3-rope": (
        lambda: byte_level("llama-bpe"),
        # seed 1: at seed 0, rounding the random weights to f16 flips 1.1% of the top-1 picks of
        # transformers itself (near-tied logits), so no f16 file could reach 99% there
        lambda tok: tiny("llama", tok, seed=1, rope_scaling=LLAMA3_ROPE),
        "llama",
        {"rope_freqs.weight"},
    ),
    "qwen3": (
        lambda: byte_level("qwen2"),
        qwen3,
        "qwen3",
        {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"},
    ),
    "qwen3-yarn": (
        lambda: byte_level("qwen2"),
        lambda tok: qwen3(tok, rope_scaling=YARN_ROPE),
        "qwen3",
        {"blk.0.attn_q_norm.weight"},
    ),
    "phi3": (
        sentencepiece_style,
        phi3,
        "phi3",
        {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"},
    ),
    "phi3-longrope": (
        sentencepiece_style,
        lambda tok: phi3(tok, rope_scaling=LONGROPE, max_position_embeddings=16384, tie_word_embeddings=True),
        "phi3",
        {"rope_factors_long.weight", "rope_factors_short.weight"},
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(ARCHS))
def test_each_architecture_exports_and_agrees_with_transformers(tmp_path, name):
    make_tokenizer, make_model, arch, tensors = ARCHS[name]
    tokenizer = make_tokenizer()
    # Not named after the family: llama.cpp gives the special tokens of a model whose name has
    # "phi3" in it Phi-3's attributes, and fails on a vocabulary without <|endoftext|>.
    folder = saved(tmp_path, "model", make_model(tokenizer), tokenizer)
    out = tmp_path / f"{name}.f16.gguf"
    r = export(folder, out, "--quant", "f16")
    assert r.returncode == 0, r.stderr
    meta = metadata(out)
    assert meta["general.architecture"] == arch
    assert tensors <= meta["names"], sorted(meta["names"])
    assert json.loads(meta["alpaca_forge.prompt_format"])["format"] == "alpaca"
    p = parity_of(out)
    print(name, {k: p[k] for k in ("top1_all", "top1_last", "max_logit_diff", "tokenization_agree")})
    # llama.cpp's Qwen2 pre-tokenizer splits a decomposed accent unlike the regex: 1 prompt
    assert p["prompts"] == 100 and p["tokenization_agree"] >= 0.99, p
    assert p["top1_all"] >= 0.99 and p["top1_last"] >= 0.97, p
    assert p["max_logit_diff"] < 0.1, p


# ---------------------------------------------------------------------------------------------
# What cannot be written is refused before anything is


@pytest.mark.integration
def test_an_unknown_architecture_names_the_supported_ones_and_llama_cpps_converter(tmp_path):
    from transformers import FalconConfig, FalconForCausalLM

    tokenizer = byte_level()
    config = FalconConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    folder = saved(tmp_path, "falcon", FalconForCausalLM(config), tokenizer)
    out = tmp_path / "falcon.gguf"
    r = export(folder, out)
    assert_user_error(r, "FalconForCausalLM", "convert_hf_to_gguf.py")
    for supported in ("LlamaForCausalLM (llama)", "Qwen3ForCausalLM (qwen3)", "Phi3ForCausalLM (phi3)"):
        assert supported in r.stderr
    assert not out.exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tok: tiny("llama", tok, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (lambda tok: qwen3(tok, use_sliding_window=True, sliding_window=32), "sliding window"),
    ],
    ids=["llama-dynamic-rope", "qwen3-sliding-window"],
)
def test_a_setting_llama_cpp_would_run_otherwise_is_refused(tmp_path, make, expected):
    tokenizer = byte_level("qwen2")
    folder = saved(tmp_path, "m", make(tokenizer), tokenizer)
    out = tmp_path / "m.gguf"
    assert_user_error(export(folder, out), expected, "config.json")
    assert not out.exists()
