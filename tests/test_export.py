"""export merge and export gguf: real files, loaded back by transformers and by llama.cpp.

Every GGUF test ends in the parity check the command itself runs (llama.cpp fed the same token
ids as transformers), so each asserts on what llama.cpp actually computes from the file.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from alpaca_forge import get_format, save_model
from alpaca_forge.core.models import ADAPTER_BASE_FILE
from alpaca_forge.export.gguf_tokenizer import classify_pre_tokenizer
from alpaca_forge.export.to_gguf import permute_rows

from conftest import (
    _CORPUS,
    REPO,
    TINY_SHAPE,
    assert_user_error,
    build_tiny_model,
    build_tiny_tokenizer,
    run_cli,
)

pytestmark = pytest.mark.llamacpp  # the parity check loads every exported file in llama.cpp

# ---------------------------------------------------------------------------------------------
# Tokenizers and tiny models of each family


def _bpe(pre_tokenizer, decoder=None, *, byte_fallback: bool = False, normalizer=None, alphabet=None):
    """A small BPE tokenizer trained here; every byte is in its alphabet (or falls back to byte
    pieces), so any text tokenizes without an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=byte_fallback, fuse_unk=byte_fallback))
    tok.pre_tokenizer = pre_tokenizer
    tok.normalizer = normalizer
    tok.decoder = decoder or decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"] + ([f"<0x{b:02X}>" for b in range(256)] if byte_fallback else [])
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet is None else alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(
        _CORPUS * 4 + ["1234567890 it's we've", "x = [i ** 2 for i in range(10)]"], trainer
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.pad_token = hf.eos_token
    return hf


def byte_level(kind: str = "gpt-2"):
    from tokenizers import Regex, pre_tokenizers

    from alpaca_forge.export import gguf_tokenizer

    if kind == "gpt-2":
        return _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
    if kind == "smollm":
        return _bpe(
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False),
                ]
            )
        )
    regex = {"llama-bpe": gguf_tokenizer._LLAMA3_REGEX, "qwen2": gguf_tokenizer._QWEN2_REGEX}[kind]
    return _bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )


def sentencepiece_style():
    """Llama 2 / Mistral style: BPE over '▁'-joined text with byte fallback, no regex split."""
    from tokenizers import decoders, normalizers

    return _bpe(
        None,
        decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        ),
        byte_fallback=True,
        normalizer=normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
        alphabet=[],
    )


def tiny(family: str, tokenizer, seed: int = 0, **shape):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if family == "llama":
        return build_tiny_model(tokenizer, seed, **shape)
    torch.manual_seed(seed)
    settings = {
        "vocab_size": len(tokenizer),
        **TINY_SHAPE,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **shape,
    }
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**settings, sliding_window=None))
    return Qwen2ForCausalLM(Qwen2Config(**settings, tie_word_embeddings=True))


def saved(tmp_path: Path, name: str, model, tokenizer, fmt: str = "alpaca") -> Path:
    return save_model(model, tokenizer, tmp_path / name, get_format(fmt))


def export(model_dir: Path, out: Path, *flags: str):
    return run_cli("-q", "export", "gguf", "--model", str(model_dir), "--output", str(out), *flags)


def parity_of(out: Path) -> dict:
    return json.loads(out.with_name(out.name.removesuffix(".gguf") + ".parity.json").read_text())


def metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    keys = (
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "alpaca_forge.prompt_format",
    )
    found = {k: reader.fields[k].contents() for k in keys if k in reader.fields}
    found["types"] = {t.tensor_type.name for t in reader.tensors}
    found["names"] = {t.name for t in reader.tensors}
    return found


# ---------------------------------------------------------------------------------------------
# Pure steps


@pytest.mark.integration
def test_permute_rows_interleaves_each_heads_halves():
    w = torch.arange(8).reshape(8, 1)  # 2 heads of 4 rows: (0 1 | 2 3), (4 5 | 6 7)
    assert permute_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("tokenizer", "expected"),
    [("gpt-2", "gpt-2"), ("smollm", "smollm"), ("llama-bpe", "llama-bpe"), ("qwen2", "qwen2")],
)
def test_the_pre_tokenizer_is_named_from_what_it_does(tmp_path, tokenizer, expected):
    tok = byte_level(tokenizer)
    tok.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert classify_pre_tokenizer(data)[0] == expected


@pytest.mark.integration
def test_an_unknown_pre_tokenizer_is_not_guessed(tmp_path):
    from tokenizers import pre_tokenizers

    tok = _bpe(pre_tokenizers.Whitespace())
    tok.save_pretrained(tmp_path)
    name, described = classify_pre_tokenizer(json.loads((tmp_path / "tokenizer.json").read_text()))
    assert name is None and "Whitespace" in described


# ---------------------------------------------------------------------------------------------
# GGUF of each family: the file loads in llama.cpp and agrees with transformers

FAMILIES = {
    # name: (family, tokenizer, shape overrides, llama.cpp tokenizer model, pre-tokenizer)
    "llama-gpt2": ("llama", lambda: byte_level("gpt-2"), {}, "gpt2", "gpt-2"),
    "llama-untied": ("llama", lambda: byte_level("smollm"), {"tie_word_embeddings": False}, "gpt2", "smollm"),
    "llama3-style": ("llama", lambda: byte_level("llama-bpe"), {}, "gpt2", "llama-bpe"),
    "llama2-style": ("llama", sentencepiece_style, {"tie_word_embeddings": False}, "llama", "default"),
    "mistral": ("mistral", sentencepiece_style, {}, "llama", "default"),
    "qwen2": ("qwen2", lambda: byte_level("qwen2"), {}, "gpt2", "qwen2"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_exports_and_agrees_with_transformers(tmp_path, name):
    family, make_tokenizer, shape, tok_model, pre = FAMILIES[name]
    tokenizer = make_tokenizer()
    model = tiny(family, tokenizer, **shape)
    folder = saved(tmp_path, name, model, tokenizer)
    out = tmp_path / f"{name}.f16.gguf"
    r = export(folder, out, "--quant", "f16")
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement" in r.stdout
    meta = metadata(out)
    arch = "qwen2" if family == "qwen2" else "llama"
    assert meta["general.architecture"] == arch
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == (tok_model, pre)
    assert json.loads(meta["alpaca_forge.prompt_format"])["format"] == "alpaca"
    assert ("output.weight" in meta["names"]) == (not model.config.tie_word_embeddings)
    p = parity_of(out)
    # llama.cpp's Qwen2 rule splits a decomposed accent ("e" + U+0301) unlike the regex: 1 prompt
    assert p["prompts"] == 100 and p["tokenization_agree"] >= (0.99 if family == "qwen2" else 1.0), p
    assert p["top1_all"] >= 0.99 and p["top1_last"] >= 0.97, p
    assert p["max_logit_diff"] < 0.1, p


@pytest.mark.integration
@pytest.mark.parametrize(
    ("quant", "floor", "types"), [("q8_0", 0.9, {"Q8_0"}), ("q4_0", 0.3, {"Q4_0", "Q8_0"})]
)
def test_quantised_files_load_and_mostly_agree(tmp_path, quant, floor, types):
    tokenizer = byte_level()
    folder = saved(tmp_path, "m", tiny("llama", tokenizer), tokenizer)
    out = tmp_path / f"m.{quant}.gguf"
    r = export(folder, out, "--quant", quant)
    assert r.returncode == 0, r.stderr
    assert types <= metadata(out)["types"] <= types | {"F32", "F16"}
    p = parity_of(out)
    assert p["top1_all"] >= floor and p["tokenization_agree"] == 1.0, p
    assert out.stat().st_size < (tmp_path / "m" / "model.safetensors").stat().st_size / 2


@pytest.mark.integration
def test_k_quants_go_through_llama_cpps_quantizer(tmp_path):
    tokenizer = byte_level()
    # K-quant blocks hold 256 values: rows this wide quantise without falling back
    model = tiny("llama", tokenizer, hidden_size=256, intermediate_size=512)
    folder = saved(tmp_path, "k", model, tokenizer)
    out = tmp_path / "k.q4_k_m.gguf"
    r = export(folder, out, "--quant", "q4_k_m")
    assert r.returncode == 0, r.stderr
    assert "Q4_K" in metadata(out)["types"]
    assert parity_of(out)["top1_all"] >= 0.3  # a random model: its logits are close together
    assert not list(tmp_path.glob(".k.q4_k_m.gguf*"))  # the f16 step file is gone


@pytest.mark.integration
def test_ollama_modelfile_carries_the_template_and_stops(tmp_path, tiny_model_dir):
    out = tmp_path / "tiny.gguf"
    r = export(tiny_model_dir, out, "--quant", "f16", "--ollama", "--no-verify")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "tiny.Modelfile").read_text()
    assert text.startswith("FROM ./tiny.gguf\n")
    assert "### Instruction:\n{{ .Prompt }}\n\n### Response:" in text
    assert 'PARAMETER stop "### Instruction:"' in text
    assert not (tmp_path / "tiny.parity.json").exists()  # --no-verify: no check, no figures
    # no sampling of its own: the file has no general.sampling.* keys, the Modelfile has ours
    assert not any(k.startswith("general.sampling.") for k in gguf.GGUFReader(str(out)).fields)
    assert "PARAMETER temperature 0.7\n" in text and "PARAMETER repeat_penalty 1.1\n" in text


@pytest.mark.integration
def test_the_models_own_sampling_goes_into_the_file_and_the_modelfile(tmp_path):
    """generation_config.json's sampling becomes the GGUF's general.sampling.* keys (llama.cpp's
    tools and our llama.cpp engine take them as defaults, as serve and vLLM take the folder's) and
    the Modelfile's parameters."""
    from transformers import GenerationConfig

    from alpaca_forge.engines import EngineConfig, SamplingDefaults, open_engine

    tokenizer = byte_level()
    model = tiny("llama", tokenizer)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.8, repetition_penalty=1.2
    )
    folder = saved(tmp_path, "m", model, tokenizer)
    out = tmp_path / "m.f16.gguf"
    r = export(folder, out, "--quant", "f16", "--ollama", "--no-verify")
    assert r.returncode == 0, r.stderr
    fields = gguf.GGUFReader(str(out)).fields
    found = {k: round(float(fields[k].contents()), 4) for k in fields if k.startswith("general.sampling.")}
    assert found == {
        "general.sampling.temp": 0.6,
        "general.sampling.top_p": 0.8,
        "general.sampling.penalty_repeat": 1.2,
    }
    engine = open_engine(EngineConfig(engine="llamacpp", model=str(out)))
    try:
        got = engine.generation_defaults()
    finally:
        engine.close()
    assert {k: round(v, 4) for k, v in got.as_dict().items()} == SamplingDefaults(0.6, 0.8, 1.2).as_dict()
    text = (tmp_path / "m.f16.Modelfile").read_text()
    assert "PARAMETER temperature 0.6\nPARAMETER top_p 0.8\nPARAMETER repeat_penalty 1.2\n" in text


# ---------------------------------------------------------------------------------------------
# Careless input


@pytest.mark.integration
def test_an_unknown_pre_tokenizer_is_an_error_and_a_wrong_one_is_caught(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = _bpe(pre_tokenizers.Whitespace())
    folder = saved(tmp_path, "ws", tiny("llama", tokenizer), tokenizer)
    out = tmp_path / "ws.gguf"
    assert_user_error(export(folder, out, "--quant", "f16"), "--pre-tokenizer", "Whitespace")
    assert not out.exists()
    # Named by hand but wrongly: llama.cpp splits "it's" otherwise, and the check says so.
    wrong = export(folder, out, "--quant", "f16", "--pre-tokenizer", "gpt-2")
    assert_user_error(wrong, "tokenizes", "differently", "--pre-tokenizer")
    assert not out.exists() and not list(tmp_path.glob(".ws.gguf*"))


@pytest.mark.integration
def test_an_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_level()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    folder = saved(tmp_path, "gpt2", model, tokenizer)
    out = tmp_path / "gpt2.gguf"
    assert_user_error(export(folder, out), "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")
    assert not out.exists()


@pytest.mark.integration
def test_an_existing_file_is_kept_without_force(tmp_path, tiny_model_dir):
    out = tmp_path / "t.gguf"
    out.write_bytes(b"precious")
    assert_user_error(export(tiny_model_dir, out, "--no-verify"), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert export(tiny_model_dir, out, "--no-verify", "--force").returncode == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.integration
def test_a_cut_off_safetensors_model_is_named(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "b.gguf"
    assert_user_error(export(broken, out), str(broken))
    assert not out.exists()


@pytest.mark.integration
def test_a_disk_that_fills_up_leaves_nothing_behind(tmp_path, tiny_model_dir):
    """The file-size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC)."""
    out = tmp_path / "full.gguf"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))\n"
        "from alpaca_forge.cli import main\n"
        f"sys.exit(main(['export', 'gguf', '--model', {str(tiny_model_dir)!r}, '--output', {str(out)!r},"
        " '--quant', 'f32', '--no-verify']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO, env=os.environ
    )
    assert_user_error(r, "writing failed", "disk space")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# merge


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter trained for real by `train`, on the tiny model."""
    from alpaca_forge.core.records import write_records

    rnd = random.Random(0)
    data = write_records(
        tmp_path_factory.mktemp("data") / "d.jsonl",
        [
            {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}."}
            for a, b in ((rnd.randint(1, 9), rnd.randint(1, 9)) for _ in range(16))
        ],
    )
    out = tmp_path_factory.mktemp("lora") / "adapter"
    r = run_cli(
        "-q", "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
        "--method", "lora", "--lora-targets", "q_proj,v_proj", "--epochs", "3", "--learning-rate", "5e-2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits


@pytest.mark.integration
def test_the_merged_model_answers_as_the_adapter_does(tmp_path, tiny_model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_forge.core.library_noise import peft_call

    out = tmp_path / "merged"
    r = run_cli("export", "merge", "--adapter", str(adapter), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "prompt_format.json").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = AutoTokenizer.from_pretrained(out)("What is 2 plus 3?")["input_ids"]
    before = _logits(base, ids)
    with peft_call():  # peft's own FutureWarning, as the product silences it
        with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()  # wraps `base` in place
    expected = _logits(with_adapter, ids)
    assert torch.allclose(_logits(merged, ids), expected, atol=1e-5)
    assert not torch.allclose(before, expected, atol=1e-3)  # the adapter does something


@pytest.mark.integration
def test_an_adapter_is_refused_on_another_base(tmp_path, adapter):
    tokenizer = build_tiny_tokenizer()
    same_shape = saved(tmp_path, "other", build_tiny_model(tokenizer, seed=1), tokenizer)
    out = tmp_path / "m"
    r = run_cli(
        "export", "merge", "--adapter", str(adapter), "--model", str(same_shape), "--output", str(out)
    )
    assert_user_error(r, "other base weights", "--model")
    smaller = saved(
        tmp_path, "small", build_tiny_model(tokenizer, hidden_size=32, intermediate_size=64), tokenizer
    )
    r = run_cli("export", "merge", "--adapter", str(adapter), "--model", str(smaller), "--output", str(out))
    assert_user_error(r, "other base weights", "--model")
    # An adapter from before fingerprints were recorded: the shapes still give it away.
    import shutil

    old = tmp_path / "old-adapter"
    shutil.copytree(adapter, old)
    facts = json.loads((old / ADAPTER_BASE_FILE).read_text())
    del facts["base_fingerprint"]
    (old / ADAPTER_BASE_FILE).write_text(json.dumps(facts))
    r = run_cli("export", "merge", "--adapter", str(old), "--model", str(smaller), "--output", str(out))
    assert_user_error(r, "does not fit", "--model")
    assert not out.exists() and not list(tmp_path.glob(".m.*"))


@pytest.mark.integration
def test_merge_checks_its_paths(tmp_path, tiny_model_dir, adapter):
    out = tmp_path / "m"
    not_adapter = run_cli("export", "merge", "--adapter", str(tiny_model_dir), "--output", str(out))
    assert_user_error(not_adapter, "not a LoRA adapter folder")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(
        run_cli("export", "merge", "--adapter", str(adapter), "--output", str(out)),
        "already exists",
        "--force",
    )
    assert (out / "keep.txt").read_text() == "mine"
    assert (
        run_cli("export", "merge", "--adapter", str(adapter), "--output", str(out), "--force").returncode == 0
    )
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# The embedded model


@pytest.mark.real_model
def test_smollm2_exports_at_f16_and_q8_0_and_answers_through_infer(tmp_path):
    figures = {}
    for quant in ("f16", "q8_0"):
        out = tmp_path / f"smol.{quant}.gguf"
        r = export(Path("smollm2-135m-instruct"), out, "--quant", quant)
        assert r.returncode == 0, r.stderr
        figures[quant] = parity_of(out)
    assert figures["f16"]["tokenization_agree"] == 1.0 and figures["q8_0"]["tokenization_agree"] == 1.0
    assert figures["f16"]["template_agree"] == 1.0  # the file's chat template writes transformers' prompts
    assert figures["f16"]["top1_last"] >= 0.99 and figures["f16"]["top1_all"] >= 0.99, figures
    assert figures["q8_0"]["top1_last"] >= 0.95 and figures["q8_0"]["top1_all"] >= 0.95, figures
    (tmp_path / "in.jsonl").write_text('{"instruction": "What is the capital of France?"}\n')
    r = run_cli(
        "infer", "--engine", "llamacpp", "--model", str(tmp_path / "smol.q8_0.gguf"),
        "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "p.jsonl"), "--max-new-tokens", "24",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert "Paris" in row["output"] and row["prompt_format"] == "chat"


@pytest.mark.integration
def test_force_replaces_an_output_never_a_different_kind_of_thing(tmp_path, tiny_model_dir, adapter):
    folder = tmp_path / "mine.gguf"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    r = export(tiny_model_dir, folder, "--no-verify", "--force")
    assert_user_error(r, "is a folder, not a file")
    assert (folder / "notes.txt").read_text() == "keep"
    file = tmp_path / "merged"
    file.write_text("a file, not a folder")
    r = run_cli("export", "merge", "--adapter", str(adapter), "--output", str(file), "--force")
    assert_user_error(r, "is a file, not a folder")
    assert file.read_text() == "a file, not a folder"


@pytest.mark.integration
def test_an_output_in_a_missing_folder_is_made(tmp_path, tiny_model_dir):
    out = tmp_path / "not" / "yet" / "there.gguf"
    assert export(tiny_model_dir, out, "--no-verify").returncode == 0
    assert out.read_bytes()[:4] == b"GGUF"
