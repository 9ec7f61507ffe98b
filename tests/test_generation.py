import dataclasses
import threading

import pytest

from alpaca_forge import GenerationSettings, TokenStream, UserError, generate_batch, generate_text
from alpaca_forge.generation import StopStringFilter, cut_at_stop

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0)


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("Paris.\n### Instruction:\nmore", ["### Instruction:", "\n"]) == ("Paris.", True)
    assert cut_at_stop("no stop here", ["###"]) == ("no stop here", False)


@pytest.mark.parametrize("split", [1, 2, 3, 5, 100])
def test_stop_filter_holds_back_partial_stop_strings(split):
    text = "The answer is 4.\n### Instruction:\nWhat is 2+3?"
    f = StopStringFilter(["### Instruction:"])
    out = "".join(f.push(text[i : i + split]) for i in range(0, len(text), split)) + f.flush()
    assert out == "The answer is 4.\n"
    assert f.stopped


def test_stop_filter_releases_a_false_alarm():
    f = StopStringFilter(["### Instruction:"])
    assert f.push("Use ##") == "Use "  # could be the start of the stop string: held
    assert f.push("# headings") == "### headings"
    assert f.flush() == ""
    assert not f.stopped


def test_settings_are_validated_together():
    with pytest.raises(UserError) as e:
        GenerationSettings(max_new_tokens=0, temperature=-1, top_p=1.5)
    assert (
        "--max-new-tokens" in str(e.value) and "--temperature" in str(e.value) and "--top-p" in str(e.value)
    )


def _prompts(lm):
    return [
        lm.prompt_format.prompt("What is the capital of France?"),
        lm.prompt_format.prompt("Translate to French.", "the cat sat on the mat, and then the cat sat again"),
        lm.prompt_format.prompt("Hi"),
    ]


def test_batched_generation_matches_one_at_a_time(tiny_lm):
    """Left padding must not change what each prompt gets (greedy, so it is deterministic)."""
    prompts = _prompts(tiny_lm)
    batched = generate_batch(tiny_lm, prompts, GREEDY)
    alone = [generate_text(tiny_lm, p, GREEDY) for p in prompts]
    assert batched == alone
    assert all(c.num_tokens > 0 for c in batched)


def test_length_limit_is_reported(tiny_lm):
    settings = GenerationSettings(max_new_tokens=3, temperature=0.0, repetition_penalty=1.0)
    c = generate_text(tiny_lm, _prompts(tiny_lm)[0], settings)
    if c.finish_reason != "length":  # the random model happened to emit EOS within 3 tokens
        pytest.skip("tiny model stopped early for this seed")
    assert c.num_tokens == 3


def test_stop_string_cuts_generation(tiny_lm):
    prompt = _prompts(tiny_lm)[0]
    full = generate_text(tiny_lm, prompt, GREEDY)
    assert len(full.text) > 6, full
    stop = full.text[3:6]
    cut = generate_text(tiny_lm, prompt, dataclasses.replace(GREEDY, stop=(stop,)))
    assert cut.text == full.text[: full.text.index(stop)].strip()
    assert cut.finish_reason == "stop"
    assert cut.num_tokens < full.num_tokens


def test_sampling_is_seeded(tiny_lm):
    prompt = _prompts(tiny_lm)[0]
    s = GenerationSettings(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    assert generate_text(tiny_lm, prompt, s) == generate_text(tiny_lm, prompt, s)
    others = {generate_text(tiny_lm, prompt, dataclasses.replace(s, seed=k)).text for k in range(5)}
    assert len(others) > 1


def test_stream_yields_the_same_answer_as_batch(tiny_lm):
    prompt = _prompts(tiny_lm)[1]
    stream = TokenStream(tiny_lm, prompt, GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces).strip() == stream.completion.text == generate_text(tiny_lm, prompt, GREEDY).text
    assert stream.tokens_per_s > 0


def test_stream_cancel_stops_generation_early(tiny_lm):
    settings = GenerationSettings(max_new_tokens=3000, temperature=1.0, repetition_penalty=1.0)
    stream = TokenStream(tiny_lm, _prompts(tiny_lm)[0], settings)
    got = threading.Event()
    for _ in stream:
        got.set()
        stream.cancel()
        break
    assert got.is_set()
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.num_tokens < 3000


def test_tokenizers_without_a_pad_token_still_batch(tiny_model_dir):
    """Llama-2 and GPT-2 style tokenizers have no pad token: padding falls back to EOS."""
    from alpaca_forge import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    lm.tokenizer.pad_token = None
    assert lm.tokenizer.pad_token_id is None
    prompts = _prompts(lm)
    assert generate_batch(lm, prompts, GREEDY) == [generate_text(lm, p, GREEDY) for p in prompts]
