"""Shared fixtures: a tiny random Llama built in-process, the real CLI, the shared data.

Everything runs offline. The cache of converted GGUF models goes to a temporary folder for the
whole session, so the real embedded model's first load (GGUF -> dense) is exercised on every run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CLI = Path(sys.executable).parent / "alpaca-forge"

_SESSION_CACHE = tempfile.mkdtemp(prefix="alpaca-forge-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ALPACA_FORGE_CACHE"] = _SESSION_CACHE
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# Words the tiny tokenizer learns merges from; any text still encodes (byte-level BPE).
_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:",
    "<|user|>\n<|assistant|>\n",
    "the cat sat on the mat. What is the capital of France? Paris is the capital.",
]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Printable ASCII only (byte-level BPE writes space as 'Ġ' and newline as 'Ċ'), so that
    # whatever the random model emits decodes to readable text rather than broken UTF-8.
    ascii_alphabet = [chr(b) for b in range(33, 127)] + ["Ġ", "Ċ"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=ascii_alphabet,
        limit_alphabet=len(ascii_alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = TINY_CHAT_TEMPLATE
    return hf


def build_tiny_model(tokenizer, seed: int = 0, **shape):
    """A 2-layer Llama with ~0.1M parameters: random, but with peaked logits so greedy is stable.
    `shape` overrides any LlamaConfig setting (benchmarks build larger ones the same way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "initializer_range": 0.2,
        "tie_word_embeddings": True,
        **shape,
    }
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return LlamaForCausalLM(LlamaConfig(**settings, **ids, pad_token_id=tokenizer.pad_token_id))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model folder (weights, tokenizer, prompt_format.json = alpaca)."""
    from alpaca_forge import get_format, save_model

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-llama"), get_format("alpaca"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from alpaca_forge import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"the shared data folder {SHARED_DATA} is absent (it lies beside the repository on dev and CI machines)"
        )
    return SHARED_DATA


def run_cli(
    *args: str, input: str | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `alpaca-forge` console script, as a user would."""
    return subprocess.run(
        [str(CLI), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user mistake: exit status 2, a message with a fix, and never a traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "fix:" in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
