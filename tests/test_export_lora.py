"""export gguf --adapter: a peft LoRA adapter as a GGUF LoRA file that llama.cpp applies at load.

Each file is checked where it is used: llama.cpp loads the base's GGUF with the adapter applied
(`lora_path`) and its next-token choices are compared with transformers running the merged model
(the command's own parity check, whose figures these tests read).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from alpaca_forge import get_format, save_model
from alpaca_forge.core.models import ADAPTER_BASE_FILE, weights_fingerprint
from alpaca_forge.core.prompts import Message, save_format
from llama_server import NEEDS_SERVER, llama_server

from conftest import TINY_SHAPE, assert_user_error, build_tiny_model, build_tiny_tokenizer, run_cli

pytestmark = pytest.mark.llamacpp  # every file is loaded in llama.cpp

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, *, seed: int = 1, **lora) -> Path:
    """A peft LoRA adapter for the model in `base_dir`, with random A *and* B (a fresh adapter's B
    is zero and would change nothing), recorded as `train` records its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_forge.core.library_noise import peft_call

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    fingerprint = weights_fingerprint(base)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR, **lora}
    with peft_call():
        model = get_peft_model(base, LoraConfig(**settings))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p) * 0.15
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)  # as `train` saves it
    save_format(out, get_format("alpaca"))
    facts = {"base_model": str(base_dir), "base_fingerprint": fingerprint}
    (out / ADAPTER_BASE_FILE).write_text(json.dumps(facts))
    return out


def export_lora(base: Path, adapter: Path, out: Path, *flags: str):
    return run_cli(
        "-q", "export", "gguf", "--model", str(base), "--adapter", str(adapter), "--output", str(out), *flags
    )


def parity_of(out: Path) -> dict:
    return json.loads(out.with_name(out.name.removesuffix(".gguf") + ".parity.json").read_text())


def fields_of(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "adapter."))}
    found["tensors"] = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    return found


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")


# ---------------------------------------------------------------------------------------------
# The file applied in llama.cpp


def llama_picks(path: Path, prompts: list[list[int]], lora: Path | None = None) -> list:
    """llama.cpp's next-token choice at every position of each prompt (token ids)."""
    import numpy as np
    from llama_cpp import Llama

    width = max(map(len, prompts)) + 1
    settings = {"lora_path": str(lora)} if lora else {}
    llm = Llama(str(path), n_ctx=width, n_batch=width, logits_all=True, verbose=False, **settings)
    try:
        picks = []
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            picks.append(np.asarray(llm.scores[: len(ids)]).argmax(-1))
        return picks
    finally:
        llm.close()


def agreement(ours: list, theirs: list) -> float:
    return sum(int((a == b).sum()) for a, b in zip(ours, theirs, strict=True)) / sum(map(len, ours))


@pytest.mark.integration
def test_the_adapter_applied_in_llama_cpp_answers_as_the_merged_model(tmp_path, tiny_model_dir, adapter):
    from transformers import AutoTokenizer

    from alpaca_forge.export.parity import parity_prompts

    out = tmp_path / "tiny.lora.gguf"
    r = export_lora(tiny_model_dir, adapter, out, "--quant", "f16")
    assert r.returncode == 0, r.stderr
    parity = parity_of(out)  # llama.cpp, base + adapter, against transformers' merged model
    assert parity["top1_all"] >= 0.99 and parity["top1_last"] >= 0.99, parity
    meta = fields_of(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 16.0
    # peft's A (r, in) and B (out, r) as they are: ggml lists (in, r) and (r, out).
    hidden, kv = TINY_SHAPE["hidden_size"], TINY_SHAPE["hidden_size"] // 2  # 2 of 4 heads for K/V
    assert meta["tensors"]["blk.0.attn_q.weight.lora_a"] == (hidden, 8)
    assert meta["tensors"]["blk.0.attn_k.weight.lora_b"] == (8, kv)
    assert meta["tensors"]["blk.1.ffn_down.weight.lora_a"] == (TINY_SHAPE["intermediate_size"], 8)
    assert len(meta["tensors"]) == 2 * len(ALL_LINEAR) * TINY_SHAPE["num_hidden_layers"]

    # Against the merged model's own f16 GGUF, both in llama.cpp: the same answers, far fewer bytes.
    f16 = ("--quant", "f16", "--no-verify")  # the model files' own checks are test_export's
    base, merged, merged_gguf = tmp_path / "base.f16.gguf", tmp_path / "merged", tmp_path / "merged.f16.gguf"
    assert (
        run_cli("-q", "export", "merge", "--adapter", str(adapter), "--output", str(merged)).returncode == 0
    )
    for model, path in ((tiny_model_dir, base), (merged, merged_gguf)):
        r = run_cli("-q", "export", "gguf", "--model", str(model), "--output", str(path), *f16)
        assert r.returncode == 0, r.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = parity_prompts(get_format("alpaca"), tokenizer, 100)
    prompts = [tokenizer(p, add_special_tokens=special)["input_ids"] for p, special in pairs]
    expected = llama_picks(merged_gguf, prompts)
    applied = agreement(llama_picks(base, prompts, lora=out), expected)
    without = agreement(llama_picks(base, prompts), expected)
    sizes = {"adapter": out.stat().st_size, "merged": merged_gguf.stat().st_size}
    print(f"\nf16: {sizes}; top-1 vs the merged GGUF: {applied:.2%} with the adapter, {without:.2%} without")
    assert applied >= 0.99 and without < 0.9  # the adapter is applied, and it matters
    assert sizes["adapter"] < sizes["merged"] / 2


@pytest.mark.integration
@NEEDS_SERVER
def test_llama_cpps_server_applies_the_file_with_lora_path(tmp_path, tiny_model_dir, adapter):
    """`python -m llama_cpp.server --lora_path` (llama-server --lora), asked to chat: the same greedy
    text as the library with the adapter on the Alpaca prompt, and another text than the base alone."""
    import httpx
    from llama_cpp import Llama

    base, lora = tmp_path / "base.f16.gguf", tmp_path / "tiny.lora.gguf"
    flags = ("--quant", "f16", "--no-verify")
    assert (
        run_cli(
            "-q", "export", "gguf", "--model", str(tiny_model_dir), "--output", str(base), *flags
        ).returncode
        == 0
    )
    assert export_lora(tiny_model_dir, adapter, lora, *flags).returncode == 0
    prompt = get_format("alpaca").render([Message("user", "What is 2 plus 3?")])
    greedy = {"max_tokens": 16, "temperature": 0.0, "repeat_penalty": 1.0}  # the server's default is 1.1

    def library(**settings) -> str:
        llm = Llama(str(base), n_ctx=512, verbose=False, **settings)
        try:
            return llm.create_completion(prompt, **greedy)["choices"][0]["text"]
        finally:
            llm.close()

    with llama_server(base, "tiny-lora", "--lora_path", str(lora)) as url:
        # a chat request: the server prompts through the base file's template, the adapter's format
        body = {
            "model": "tiny-lora",
            "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
            **greedy,
        }
        reply = httpx.post(url + "/chat/completions", json=body, timeout=60).json()
        served = reply["choices"][0]["message"]["content"]
    assert served.strip() == library(lora_path=str(lora)).strip() != library().strip()


@pytest.mark.integration
def test_rslora_and_a_module_of_its_own_rank_and_alpha_scale_as_peft_does(tmp_path, tiny_model_dir):
    adapter = make_adapter(
        tiny_model_dir,
        tmp_path / "rs",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    out = tmp_path / "rs.lora.gguf"
    r = export_lora(tiny_model_dir, adapter, out, "--quant", "f32", "--verify-prompts", "40")
    assert r.returncode == 0, r.stderr
    assert parity_of(out)["top1_all"] >= 0.99
    assert fields_of(out)["adapter.lora.alpha"] == pytest.approx(8 * 2)  # alpha * sqrt(r)


@pytest.mark.integration
def test_a_qwen2_adapter_keeps_its_rows(tmp_path):
    """Qwen2's base GGUF keeps transformers' Q/K row order, so its lora_b does too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    shape = {**TINY_SHAPE, "max_position_embeddings": 2048}
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **shape, **ids, tie_word_embeddings=True))
    base = save_model(model, tokenizer, tmp_path / "qwen2", get_format("alpaca"))
    adapter = make_adapter(base, tmp_path / "qwen2-lora")
    out = tmp_path / "qwen2.lora.gguf"
    r = export_lora(base, adapter, out, "--quant", "f16", "--verify-prompts", "40")
    assert r.returncode == 0, r.stderr
    assert parity_of(out)["top1_all"] >= 0.99
    assert fields_of(out)["general.architecture"] == "qwen2"


@pytest.mark.integration
def test_ollama_modelfile_names_the_base_and_the_adapter(tmp_path, tiny_model_dir, adapter):
    base = tmp_path / "base" / "tiny.f16.gguf"
    base.parent.mkdir()
    flags = ("--quant", "f16", "--no-verify")  # the base's own export is test_export's
    r = run_cli("-q", "export", "gguf", "--model", str(tiny_model_dir), "--output", str(base), *flags)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "tiny.lora.gguf"
    r = export_lora(tiny_model_dir, adapter, out, "--base-gguf", str(base), "--ollama", "--no-verify")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "tiny.lora.Modelfile").read_text()
    assert text.startswith("FROM ./base/tiny.f16.gguf\nADAPTER ./tiny.lora.gguf\n"), text
    assert "### Instruction:" in text  # the adapter's prompt format
    assert fields_of(out)["tensors"]["blk.0.attn_q.weight.lora_a"]  # q8_0 by default: it loads too


@pytest.mark.real_model
def test_a_smollm2_adapter_is_a_few_percent_of_the_model_and_answers_as_merged(tmp_path):
    """SmolLM2-135M (the built-in model's dense copy) with an r=16 LoRA on every linear layer: the
    adapter file is 9.8 MB at f16, the merged model's f16 GGUF 271 MB."""
    from safetensors.torch import load_file, save_file

    from alpaca_forge.core.gguf_cache import dense_gguf
    from alpaca_forge.core.models import resolve_model

    dense = dense_gguf(Path(resolve_model("smollm2-135m-instruct").location)).folder  # what --model loads
    adapter = make_adapter(dense, tmp_path / "lora", r=16, lora_alpha=32)
    weights = adapter / "adapter_model.safetensors"
    torch.manual_seed(2)  # a trained adapter's magnitudes: B small, A about 1/sqrt(in)
    state = {
        k: torch.randn_like(v) * 0.02 if "lora_B" in k else torch.randn_like(v) / v.shape[1] ** 0.5
        for k, v in load_file(str(weights)).items()
    }
    save_file(state, str(weights))
    out = tmp_path / "smol.lora.f16.gguf"
    r = export_lora(Path("smollm2-135m-instruct"), adapter, out, "--quant", "f16")
    assert r.returncode == 0, r.stderr
    parity = parity_of(out)
    assert parity["top1_all"] >= 0.99 and parity["tokenization_agree"] == 1.0, parity
    assert out.stat().st_size < 12e6


# ---------------------------------------------------------------------------------------------
# Mistakes, refused before any work


@pytest.mark.integration
def test_an_adapter_is_refused_on_another_base(tmp_path, adapter):
    tokenizer = build_tiny_tokenizer()
    out = tmp_path / "x.lora.gguf"
    same_shape = save_model(
        build_tiny_model(tokenizer, seed=1), tokenizer, tmp_path / "other", get_format("alpaca")
    )
    r = export_lora(same_shape, adapter, out)
    assert_user_error(
        r, "does not fit the base model", str(same_shape), "it records", "other base weights", "--model"
    )
    smaller = save_model(
        build_tiny_model(tokenizer, hidden_size=32, intermediate_size=64),
        tokenizer,
        tmp_path / "small",
        get_format("alpaca"),
    )
    old = tmp_path / "old-adapter"  # no fingerprint recorded: the shapes give it away
    import shutil

    shutil.copytree(adapter, old)
    (old / ADAPTER_BASE_FILE).unlink()
    r = export_lora(smaller, old, out)
    assert_user_error(r, "does not fit the base model", str(smaller), "in the adapter", "in the base")
    assert not list(tmp_path.glob("x.lora*")) and not list(tmp_path.glob(".x.lora*"))


@pytest.mark.integration
def test_what_a_gguf_lora_cannot_carry_is_refused(tmp_path, tiny_model_dir, adapter):
    out = tmp_path / "x.lora.gguf"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(export_lora(tiny_model_dir, empty, out), "no adapter_config.json", "--adapter")
    for key, value, needle in (
        ("use_dora", True, "DoRA"),
        ("modules_to_save", ["lm_head"], "saves whole modules"),
        ("bias", "all", "bias terms"),
    ):
        bad = tmp_path / key
        bad.mkdir()
        for f in adapter.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        assert_user_error(export_lora(tiny_model_dir, bad, out), needle, "export merge")
    with warnings.catch_warnings():  # peft warns about the very adapter this test wants refused
        warnings.simplefilter("ignore", UserWarning)
        embedding = make_adapter(
            tiny_model_dir, tmp_path / "embedding", target_modules=["embed_tokens", "q_proj"]
        )
    assert_user_error(export_lora(tiny_model_dir, embedding, out), "LoRA on the embedding", "--lora-targets")
    assert_user_error(export_lora(tiny_model_dir, adapter, out, "--quant", "q4_k_m"), "--quant", "f16")
    assert_user_error(export_lora(tiny_model_dir, adapter, out, "--ollama"), "--base-gguf")
    missing = tmp_path / "none.gguf"
    assert_user_error(export_lora(tiny_model_dir, adapter, out, "--base-gguf", str(missing)), "no such file")
    tokenizer = build_tiny_tokenizer()
    smaller = save_model(
        build_tiny_model(tokenizer, hidden_size=32, intermediate_size=64),
        tokenizer,
        tmp_path / "s",
        get_format("alpaca"),
    )
    other = tmp_path / "small.gguf"
    assert (
        run_cli(
            "-q", "export", "gguf", "--model", str(smaller), "--output", str(other), "--no-verify"
        ).returncode
        == 0
    )
    cut = tmp_path / "cut.gguf"  # a real base file, cut off in its header
    cut.write_bytes(other.read_bytes()[:3000])
    r = export_lora(tiny_model_dir, adapter, out, "--base-gguf", str(cut))
    assert_user_error(r, "cut off", "--model BASE")
    r = export_lora(tiny_model_dir, adapter, out, "--base-gguf", str(other))
    assert_user_error(r, f"--base-gguf {other}", "is (64, 32) there", "down_proj needs (128, 64)")
    # a base written for another prompt format: llama.cpp would prompt the adapted model in that one
    chat_base = tmp_path / "chat.gguf"
    r = run_cli("-q", "export", "gguf", "--model", str(tiny_model_dir), "--format", "user-assistant",
                "--output", str(chat_base), "--no-verify")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = export_lora(tiny_model_dir, adapter, out, "--base-gguf", str(chat_base))
    assert_user_error(
        r, f"--base-gguf {chat_base}", "not the adapter's prompt format (alpaca)", "--format alpaca"
    )
    unformatted = tmp_path / "unformatted"
    unformatted.mkdir()
    for f in adapter.iterdir():
        if f.name != "prompt_format.json":
            (unformatted / f.name).write_bytes(f.read_bytes())
    r = export_lora(tiny_model_dir, unformatted, out)
    assert_user_error(r, "no prompt_format.json", "--format alpaca")
    assert not out.exists()
    assert not list(tmp_path.glob("x.lora*"))
