"""Shared fixtures: a tiny random Llama built in-process, the real CLI, the shared data.

Everything runs offline. The cache of converted GGUF models goes to a temporary folder for the
whole session, so the real embedded model's first load (GGUF -> dense) is exercised on every run.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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


def _share_the_cores_between_workers() -> None:
    """`make test` runs pytest-xdist workers side by side. Left alone, each worker's torch and
    llama.cpp start a thread per core, and spinning threads that outnumber the cores wait on each
    other (a test of 44 s alone took 344 s beside another). So each worker, and every process it
    starts, computes on its share of the cores; set before torch loads, which reads it once."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


_share_the_cores_between_workers()


# The tiers (pyproject.toml's markers): `make test-fast` runs the unit one, `make test` all three.
TIERS = ("unit", "integration", "real_model")


# The files that take longest (the README walk, the proofs of effect on SmolLM2), first: `make
# test`'s workers take whole files in this order, so the long ones start at once, side by side,
# and the short ones fill in around them instead of one long file finishing alone at the end.
LONGEST_FIRST = ("test_readme.py", "test_align_effect.py", "test_engines.py", "test_export.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
    _refuse_tests_outside_one_tier(items)
    _skip_llamacpp_without_it(items)
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


def _refuse_tests_outside_one_tier(items) -> None:
    """A test in no tier would never run in `make test-fast` and nobody would notice; one in two
    would run twice as fast as it is. So each names exactly one."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            "each test needs exactly one of the markers " + ", ".join(TIERS) + " (see pyproject.toml): "
            "mark the module (pytestmark = pytest.mark.unit) or the test (@pytest.mark.integration)\n  "
            + "\n  ".join(wrong)
        )


def _skip_llamacpp_without_it(items) -> None:
    """Without llama-cpp-python (a C++ build, `make llamacpp`), its tests skip, saying why; in CI
    they run, so a failed build cannot pass for a green suite."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="llama-cpp-python is not installed: `make llamacpp` builds it")
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)


_current_test: list[pytest.Item] = []


@pytest.fixture(autouse=True)
def _note_the_running_test(request):
    _current_test[:] = [request.node]
    yield
    _current_test.clear()


def not_in_the_unit_tier(what: str) -> None:
    """The unit tier stays fast only while nothing in it runs the CLI, a process or a browser."""
    if _current_test and _current_test[0].get_closest_marker("unit") is not None:
        pytest.fail(f"{what} makes this an integration test: mark it @pytest.mark.integration", pytrace=False)


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


# The tiny models' shape, for every architecture the tests build.
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,
}


def build_tiny_model(tokenizer, seed: int = 0, **shape):
    """A 2-layer Llama with ~0.1M parameters: random, but with peaked logits so greedy is stable.
    `shape` overrides any LlamaConfig setting (benchmarks build larger ones the same way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = {"vocab_size": len(tokenizer), **TINY_SHAPE, "tie_word_embeddings": True, **shape}
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
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as an f32 GGUF file (so llama.cpp's greedy choices are transformers')."""
    from alpaca_forge.core.models import load_pretrained
    from alpaca_forge.core.prompts import read_saved_format
    from alpaca_forge.export.to_gguf import write_gguf

    model, tokenizer, _ = load_pretrained(str(tiny_model_dir))
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.f32.gguf"
    write_gguf(model, tokenizer, read_saved_format(tiny_model_dir), path, "f32", name="tiny")
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from alpaca_forge import load_model

    return load_model(str(tiny_model_dir), device="cpu")


VENDORED_DATA = Path(__file__).resolve().parent / "fixtures" / "data"


@dataclass(frozen=True)
class DataSet:
    """A data folder laid out like ../shared/data: the real one, or our small vendored one (our
    own text, tests/fixtures/data), so a property checked on real data is checked everywhere."""

    root: Path
    seeds: int  # seed tasks in seed_tasks.jsonl
    evals: int  # evaluation tasks, and how many of them have an input
    evals_with_input: int
    corpus: Path
    corpus_records: int
    predictions: Path  # one model's answers to the evaluation tasks
    first_seed_starts: str

    @property
    def seed_file(self) -> Path:
        return self.root / "seed_tasks.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval" / "user_oriented_instructions.jsonl"


def _vendored() -> DataSet:
    d = VENDORED_DATA
    return DataSet(
        d,
        24,
        16,
        8,
        d / "corpus" / "small.alpaca.jsonl.gz",
        400,
        d / "eval" / "predictions" / "model-a.jsonl",
        "Suggest",
    )


def _shared() -> DataSet:
    d = SHARED_DATA
    return DataSet(
        d, 175, 252, 208, d / "corpus" / "t0_55k.alpaca.jsonl.gz", 55_185,
        d / "eval" / "predictions" / "text-davinci-003.jsonl", "Is there anything I can eat",
    )  # fmt: skip


@pytest.fixture(params=["vendored", "shared"])
def dataset(request) -> DataSet:
    """Each test that takes it runs on the vendored data, and again on the real data where present."""
    if request.param == "shared":
        request.getfixturevalue("shared_data")  # skips, saying why, without the real data
        return _shared()
    return _vendored()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"the shared data folder {SHARED_DATA} is absent (it lies beside the repository on dev and CI machines)"
        )
    return SHARED_DATA


@dataclass
class CliResult:
    """What a command left: its exit status and what it printed (as `subprocess` would give)."""

    returncode: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = b""


def run_cli(
    *args: str, input: str | None = None, timeout: float | None = None, env: dict | None = None
) -> CliResult:
    """Run `alpaca-forge ARGS` in this process through `cli.main`, as a user would on the
    command line, with stdin, stdout, stderr and the environment swapped for the call. (No
    start-up cost per call; `run_cli_process` is for tests where the process itself is the point.)"""
    from alpaca_forge.cli import main

    not_in_the_unit_tier("the real CLI")

    out_bytes = io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", write_through=True)
    err = io.StringIO()
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(input or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help, or a flag it cannot parse
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.stdin = saved_stdin
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out.flush()
    data = out_bytes.getvalue()
    return CliResult(code, data.decode("utf-8", errors="replace"), err.getvalue(), data)


def run_cli_process(
    *args: str, input: str | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `alpaca-forge` console script in its own process."""
    not_in_the_unit_tier("a process of its own")
    return subprocess.run(
        [str(CLI), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_user_error(result: CliResult | subprocess.CompletedProcess, *needles: str) -> None:
    """A user mistake: exit status 2, a message with a fix, and never a traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "fix:" in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def sigint_default() -> None:
    """`preexec_fn` for a child that is sent SIGINT: Ctrl-C as a user's terminal has it. A suite
    started in the background passes SIGINT on ignored, and Python then keeps ignoring it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
