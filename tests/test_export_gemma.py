"""export gguf for Gemma 2 and Gemma 3: tiny random models, exported through the CLI, loaded by
llama.cpp and checked against transformers by the command's own parity check.

The tiny models are built to make every Gemma setting show in the logits, so a key llama.cpp
does not read, or reads otherwise, fails the test (each was checked by writing it wrong: top-1
agreement falls to 1-97% or the largest logit difference rises to 5-12):
- norm weights drawn at random, not Gemma's zeros, so the stored (1 + weight) matters;
- a sliding window of 8 tokens, shorter than most parity prompts (10-100 tokens), so the
  windowed layers see less than the global ones;
- Gemma 3: 4 layers with a global layer every 3rd (S S G S), its sliding layers' RoPE base 500
  (llama.cpp's default is 10000), linear RoPE scaling x8 on the global layers;
- soft-caps small enough to bite on a random model's small scores (attention 1, logits 3).
"""

from __future__ import annotations

import json

import pytest
import torch

from test_export import byte_level, export, metadata, parity_of, saved, sentencepiece_style

from conftest import assert_user_error

pytestmark = pytest.mark.llamacpp  # the parity check and the CLI's checks load llama.cpp

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,  # = head_dim: what llama.cpp scales by below the 27B sizes
    "max_position_embeddings": 2048,
    "initializer_range": 0.2,
    "sliding_window": 8,
}


def _ids(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
    }


def _random_norms(model):
    """Gemma initialises its norm weights to zero (a scale of 1 + 0); random ones make the +1
    the export adds visible in every layer."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def gemma2(tokenizer, **overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    settings = {
        **SHAPE,
        "num_hidden_layers": 2,
        "attn_logit_softcapping": 1.0,
        "final_logit_softcapping": 3.0,
    }
    return _random_norms(Gemma2ForCausalLM(Gemma2Config(**_ids(tokenizer), **{**settings, **overrides})))


def gemma3_config(tokenizer, **overrides):
    from transformers import Gemma3TextConfig

    settings = {
        **SHAPE,
        "num_hidden_layers": 4,
        "sliding_window_pattern": 3,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        },
        "final_logit_softcapping": 3.0,
    }
    return Gemma3TextConfig(**_ids(tokenizer), **{**settings, **overrides})


def gemma3(tokenizer, **overrides):
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    return _random_norms(Gemma3ForCausalLM(gemma3_config(tokenizer, **overrides)))


# name: (build, tokenizer, llama.cpp architecture, tokenizer model)
FAMILIES = {
    "gemma2": (gemma2, sentencepiece_style, "gemma2", "llama"),
    "gemma3": (gemma3, lambda: byte_level("gpt-2"), "gemma3", "gpt2"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(FAMILIES))
def test_gemma_exports_at_f16_and_agrees_with_transformers(tmp_path, name):
    build, make_tokenizer, arch, tok_model = FAMILIES[name]
    tokenizer = make_tokenizer()
    model = build(tokenizer)
    if name == "gemma3":  # the layout the test means to cover: sliding and global layers both
        assert model.config.layer_types == ["sliding_attention"] * 2 + ["full_attention", "sliding_attention"]
    out = tmp_path / f"{name}.f16.gguf"
    r = export(saved(tmp_path, name, model, tokenizer), out, "--quant", "f16")
    assert r.returncode == 0, r.stderr
    meta = metadata(out)
    assert (meta["general.architecture"], meta["tokenizer.ggml.model"]) == (arch, tok_model)
    assert json.loads(meta["alpaca_forge.prompt_format"])["format"] == "alpaca"
    assert "output.weight" not in meta["names"]  # tied, as Gemma is
    if name == "gemma3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= meta["names"]
    p = parity_of(out)
    assert p["prompts"] == 100 and p["tokenization_agree"] == 1.0, p
    assert p["top1_all"] >= 0.99 and p["top1_last"] >= 0.97, p
    assert p["max_logit_diff"] < 0.1, p  # soft-caps keep top-1 but not the logits: this catches them


@pytest.mark.integration
def test_gemma3_sliding_keys_are_written_as_llama_cpp_reads_them(tmp_path):
    import gguf

    tokenizer = byte_level()
    out = tmp_path / "g3.gguf"
    r = export(saved(tmp_path, "g3", gemma3(tokenizer), tokenizer), out, "--quant", "f16", "--no-verify")
    assert r.returncode == 0, r.stderr
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["gemma3.attention.sliding_window"].contents() == 8
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == 3
    assert fields["gemma3.rope.freq_base_swa"].contents() == 500.0
    assert fields["gemma3.rope.freq_base"].contents() == 1_000_000.0
    assert fields["gemma3.rope.scaling.factor"].contents() == 8.0


# ---------------------------------------------------------------------------------------------
# What llama.cpp would run otherwise is refused, naming the setting


@pytest.mark.integration
@pytest.mark.parametrize(
    ("build", "overrides", "needles"),
    [
        (gemma2, {"query_pre_attn_scalar": 256}, ("query_pre_attn_scalar is 256", "1/sqrt(16)")),
        (gemma3, {"attn_logit_softcapping": 50.0}, ("attn_logit_softcapping",)),
        (gemma3, {"hidden_activation": "gelu"}, ("hidden_activation", "tanh")),
        (
            gemma3,
            {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]},
            ("layer_types", "one global layer every N"),
        ),
    ],
    ids=["attention-scale", "attention-softcap", "activation", "irregular-layers"],
)
def test_a_gemma_llama_cpp_would_run_otherwise_is_refused(tmp_path, build, overrides, needles):
    tokenizer = sentencepiece_style()
    folder = saved(tmp_path, "g", build(tokenizer, **overrides), tokenizer)
    out = tmp_path / "g.gguf"
    assert_user_error(export(folder, out, "--quant", "f16"), *needles)
    assert not out.exists()


@pytest.mark.integration
def test_multimodal_gemma3_says_to_export_the_text_model(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    tokenizer = sentencepiece_style()
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=gemma3_config(tokenizer),
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=3,
        boi_token_index=1,
        eoi_token_index=2,
    )
    folder = saved(tmp_path, "mm", Gemma3ForConditionalGeneration(config), tokenizer)
    out = tmp_path / "mm.gguf"
    assert_user_error(
        export(folder, out, "--quant", "f16"),
        "Gemma3ForConditionalGeneration",
        "Gemma3ForCausalLM",
        "convert_hf_to_gguf",
    )
    assert not out.exists()
