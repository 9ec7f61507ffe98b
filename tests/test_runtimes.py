"""A model fine-tuned here answers as it was trained in runtimes nobody here wrote.

The tiny model is LoRA-trained in the Alpaca format (its tokenizer ships another chat template, as
SmolLM2's ships ChatML) and merged; the merged folder is exported to GGUF. Then:

- llama.cpp's own server (`python -m llama_cpp.server`), left to find the prompt format in the
  file as any user's server would, answers `/v1/chat/completions` greedily with the same text as
  `alpaca-forge infer --engine llamacpp` on the same file;
- transformers' chat pipeline on the merged folder (how vLLM and TGI prompt a model: the folder's
  chat template) answers as `alpaca-forge infer --engine transformers` does.

Either would answer otherwise if the folder or the file still carried the base's template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest

from alpaca_forge.core.records import write_records
from llama_server import NEEDS_SERVER, llama_server

from conftest import run_cli

pytestmark = [pytest.mark.llamacpp, NEEDS_SERVER]  # tiers per test: the last one loads SmolLM2

INSTRUCTIONS = [
    "What is 3 plus 4?",
    "Name three colours.",
    "the cat sat on the mat. What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me a word that rhymes with cat.",
    "Translate 'good morning' into French: bonjour?",
]
TOKENS = 24


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the merged folder, its f32 GGUF): trained in the Alpaca format, so prompts differ from the
    base's own template, and in f32, so llama.cpp's greedy choices are transformers'. (The parity
    check is left out: the tiny tokenizer knows ASCII only, and its prompts are not; the prompts
    here are ASCII.)"""
    root = tmp_path_factory.mktemp("runtimes")
    rnd = random.Random(1)
    records = []
    for _ in range(32):
        a, b = rnd.randint(1, 9), rnd.randint(1, 9)
        records.append(
            {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}. the cat sat."}
        )
    data = write_records(root / "train.jsonl", records)
    out = root / "alpaca-lora"
    flags = "--method lora --format alpaca --max-steps 12 --learning-rate 1e-2 --batch-size 4 --merge"
    r = run_cli("-q", "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                *flags.split())  # fmt: skip
    assert r.returncode == 0, r.stderr
    gguf = root / "alpaca.f32.gguf"
    r = run_cli(
        "-q",
        "export",
        "gguf",
        "--model",
        str(out / "merged"),
        "--output",
        str(gguf),
        "--quant",
        "f32",
        "--no-verify",
    )
    assert r.returncode == 0, r.stderr
    return out / "merged", gguf


def _ours(engine: str, model: Path, tmp_path: Path, instructions=INSTRUCTIONS, tokens=TOKENS) -> list[str]:
    """`alpaca-forge infer`'s greedy answers, in the order of `instructions`."""
    questions = write_records(tmp_path / "q.jsonl", [{"instruction": i, "input": ""} for i in instructions])
    out = tmp_path / f"{engine}.jsonl"
    r = run_cli("-q", "infer", "--engine", engine, "--model", str(model), "--input", str(questions),
                "--output", str(out), "--temperature", "0", "--repetition-penalty", "1",
                "--max-new-tokens", str(tokens))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["instruction"] for row in rows] == list(instructions)
    return [row["output"] for row in rows]


def _served(base: str, instructions, tokens: int = TOKENS, **extra) -> list[str]:
    """llama.cpp's server's greedy chat answers (its default repeat penalty is 1.1: set to none)."""
    answers = []
    for instruction in instructions:
        body = {
            "model": "my-alpaca",
            "messages": [{"role": "user", "content": instruction}],
            "temperature": 0,
            "max_tokens": tokens,
            "repeat_penalty": 1.0,
            **extra,
        }
        reply = httpx.post(base + "/chat/completions", json=body, timeout=120).json()
        answers.append(reply["choices"][0]["message"]["content"].strip())
    return answers


@pytest.mark.integration
def test_llama_cpps_own_server_answers_as_our_engine_does(trained, tmp_path):
    _, gguf = trained
    ours = _ours("llamacpp", gguf, tmp_path)
    with llama_server(gguf, "my-alpaca") as base:
        theirs = _served(base, INSTRUCTIONS)
    assert all(ours), ours  # the model says something, so agreeing means something
    assert theirs == ours


@pytest.mark.integration
def test_transformers_chat_pipeline_answers_as_our_engine_does(trained, tmp_path):
    from transformers import pipeline

    merged, _ = trained
    ours = _ours("transformers", merged, tmp_path)
    pipe = pipeline("text-generation", model=str(merged), device="cpu")
    theirs = []
    for instruction in INSTRUCTIONS:
        (answer,) = pipe(
            [{"role": "user", "content": instruction}],
            max_new_tokens=TOKENS,
            do_sample=False,
            return_full_text=False,
        )
        theirs.append(answer["generated_text"].strip())
    assert all(ours), ours
    assert theirs == ours


@pytest.mark.real_model
def test_smollm2_in_the_alpaca_format_answers_alike_through_llama_cpps_server(tmp_path):
    """The embedded SmolLM2 (which ships ChatML), written for the Alpaca format: llama.cpp's server
    prompts it through the file's template as our engine does. A base model never learnt to end an
    Alpaca answer with EOS, so the format's stop strings go with the request, as the README says."""
    from alpaca_forge import get_format

    gguf = tmp_path / "smollm2-alpaca.f16.gguf"
    r = run_cli("-q", "export", "gguf", "--model", "smollm2-135m-instruct", "--format", "alpaca",
                "--quant", "f16", "--output", str(gguf), "--no-verify")  # fmt: skip
    assert r.returncode == 0, r.stderr
    asked = ["Name three colours.", "Give three tips for staying healthy.", "What is the capital of France?",
             "Write a haiku about autumn.", "Explain what a neural network is in one sentence."]  # fmt: skip
    ours = _ours("llamacpp", gguf, tmp_path, asked, 48)
    with llama_server(gguf, "my-alpaca") as base:
        theirs = _served(base, asked, 48, stop=list(get_format("alpaca").stop_strings))
    assert sum(bool(a) for a in ours) >= 4, ours
    assert theirs == ours
