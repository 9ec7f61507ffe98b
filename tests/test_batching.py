"""The micro-batching engine: concurrent requests share one generate() and each still gets the
answer it would get alone, stops on its own, and can be cancelled without holding up the rest.

Run on the tiny random Llama (its greedy answers run to max_new_tokens, no early EOS), against the
in-process engine each request would otherwise use alone; the engine conformance suite is run on
it too (imported from test_engines, with this module's `engine` fixture).
"""

import dataclasses
import threading
import time

import pytest
import torch

from alpaca_forge import FinishReason, GenerationSettings, Message
from alpaca_forge.engines.batch_rows import TextPieces
from alpaca_forge.engines.batching import BatchingEngine, EngineClosedError, batch_key
from alpaca_forge.engines.transformers_engine import TransformersEngine
from test_engines import (  # noqa: F401  (collected here, run with this module's `engine`)
    test_a_batch_answers_as_one_at_a_time,
    test_a_conversation_must_end_with_the_user,
    test_complete_continues_a_raw_prompt,
    test_concurrent_callers_get_what_they_would_alone,
    test_every_declared_member_answers,
    test_length_limit_is_reported,
    test_sampling_is_seeded,
    test_stop_string_cuts_generation,
    test_stream_cancel_stops_generation_early,
    test_stream_yields_the_same_answer_as_chat,
)

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0)
LONG = GenerationSettings(max_new_tokens=3000, temperature=0.0)  # ~10 s if it ran to the end
QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "the cat sat on the mat",
    "Translate to French.",
    "Paris is the capital.",
    "Describe a task.",
]


@pytest.fixture(scope="module")
def inner(tiny_lm):
    return TransformersEngine(tiny_lm)


@pytest.fixture
def batcher(inner):
    """A fresh engine per test, so its stats count that test's batches alone. A wait of 50 ms
    lets requests that threads send together land in one batch on a loaded machine."""
    engine = BatchingEngine(inner, max_batch_size=8, wait_s=0.05)
    yield engine
    engine.close()


# One param, for its mark: the conformance tests imported above are unit tests here (a tiny
# model in this process), whatever tier their engines give them in test_engines.
@pytest.fixture(params=[pytest.param("batching", marks=pytest.mark.unit)])
def engine(batcher):
    return batcher


def _conv(question: str) -> list[Message]:
    return [Message.from_record(question)]


def _together(calls):
    """Run each zero-argument call in its own thread, all started together; their results."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# ---------------------------------------------------------------------------------------------
# Pure parts


def _byte_tokenizer():
    """Byte-level BPE over all 256 bytes (the shared tiny one knows printable ASCII only), merges
    learnt from ASCII: a CJK character is three tokens, an accented letter two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.unit
def test_text_pieces_join_to_the_full_decode():
    tok = _byte_tokenizer()
    ids = tok("the cat sat on the mat. Le chat é ü, 猫が座った")["input_ids"]
    pieces = TextPieces(tok)
    out = [pieces.push(t) for t in ids] + [pieces.flush()]
    assert "".join(out) == tok.decode(ids)
    assert not any("\ufffd" in p for p in out)


@pytest.mark.unit
def test_an_incomplete_character_is_held_back():
    tok = _byte_tokenizer()
    ids = tok("猫")["input_ids"]
    assert len(ids) == 3  # its three UTF-8 bytes
    pieces = TextPieces(tok)
    assert [pieces.push(t) for t in ids] == ["", "", "猫"]
    cut = TextPieces(tok)
    assert [cut.push(t) for t in ids[:2]] == ["", ""]
    assert cut.flush() == "\ufffd"  # an answer cut mid-character ends as the full decode does


@pytest.mark.unit
def test_only_the_encoding_and_the_repetition_penalty_split_batches():
    a = GenerationSettings(temperature=0.0, seed=1, top_p=0.5)
    b = GenerationSettings(temperature=0.9, seed=2, top_p=0.9)  # sampled, another seed: same batch
    assert batch_key(a, True) == batch_key(b, True)
    assert batch_key(a, True) != batch_key(a, False)  # encode takes one add_special_tokens
    assert batch_key(a, True) != batch_key(dataclasses.replace(a, repetition_penalty=1.1), True)


# ---------------------------------------------------------------------------------------------
# Batching


@pytest.mark.unit
def test_concurrent_requests_share_a_batch_and_answer_as_alone(batcher, inner):
    convs = [_conv(q) for q in QUESTIONS]
    alone = [inner.chat([c], GREEDY)[0] for c in convs]
    together = _together([lambda c=c: batcher.chat([c], GREEDY)[0] for c in convs])
    assert together == alone
    assert batcher.stats.largest_batch > 1 and batcher.stats.batches < len(convs), batcher.stats
    assert batcher.stats.rows == len(convs)
    assert _wait_until(lambda: batcher.running == 0, 1.0) and batcher.waiting == 0


@pytest.mark.unit
def test_each_row_keeps_its_own_length_limit(batcher, inner):
    limits = [3, 9, 17]
    settings = [dataclasses.replace(GREEDY, max_new_tokens=n) for n in limits]
    streams = [batcher.stream(_conv(q), s) for q, s in zip(QUESTIONS, settings, strict=False)]
    for stream, q, s, n in zip(streams, QUESTIONS, settings, limits, strict=False):
        pieces = list(stream)
        assert "".join(pieces) == stream.completion.text
        assert stream.completion == inner.chat([_conv(q)], s)[0]
        assert stream.completion.finish_reason == FinishReason.LENGTH
        assert stream.completion.completion_tokens == n
        assert stream.queue_s is not None and stream.first_token_s is not None
        assert 0 <= stream.queue_s <= stream.first_token_s <= stream.elapsed_s
    assert batcher.stats.batches == 1 and batcher.stats.largest_batch == 3


@pytest.mark.unit
def test_each_row_stops_at_its_own_stop_string(batcher, inner):
    convs = [_conv(q) for q in QUESTIONS[:3]]
    full = [inner.chat([c], GREEDY)[0] for c in convs]
    stops = [(f.text[4:7],) for f in full[:2]] + [()]  # the third row has none
    settings = [dataclasses.replace(GREEDY, stop=s) for s in stops]
    streams = [batcher.stream(c, s) for c, s in zip(convs, settings, strict=True)]
    got = [(s, "".join(s)) for s in streams]
    for (stream, joined), c, s, f in zip(got, convs, settings, full, strict=True):
        assert stream.completion == inner.chat([c], s)[0]
        assert joined == stream.completion.text
        if s.stop:
            assert stream.completion.text == f.text[: f.text.index(s.stop[0])].strip()
            assert stream.completion.finish_reason == FinishReason.STOP
            assert stream.completion.completion_tokens < GREEDY.max_new_tokens
    assert got[2][0].completion == full[2]
    assert batcher.stats.batches == 1


@pytest.mark.unit
def test_greedy_and_sampled_rows_share_a_batch_and_each_answers_as_alone(batcher):
    """Each row samples with its own temperature, top_p and seed, so a sampled answer is the same
    for its seed batched or alone, and differs for another seed."""
    conv = _conv(QUESTIONS[0])
    hot = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    warm = GenerationSettings(max_new_tokens=12, temperature=0.7, top_p=0.8, seed=4)
    alone = [batcher.chat([conv], s)[0] for s in (GREEDY, hot, warm)]
    before = batcher.stats.batches
    streams = [batcher.stream(conv, s) for s in (GREEDY, hot, warm, GREEDY)]
    together = [s.wait() for s in streams]
    assert batcher.stats.batches == before + 1 and batcher.stats.largest_batch >= 4  # one batch
    assert together == [*alone, alone[0]]
    other_seed = batcher.chat([conv], dataclasses.replace(hot, seed=99))[0]
    assert other_seed.text != alone[1].text


@pytest.mark.unit
def test_a_different_repetition_penalty_runs_in_its_own_batch(batcher):
    conv = _conv(QUESTIONS[0])
    penalised = dataclasses.replace(GREEDY, repetition_penalty=1.3)
    before = batcher.stats.batches
    streams = [batcher.stream(conv, GREEDY), batcher.stream(conv, penalised), batcher.stream(conv, GREEDY)]
    assert all(s.wait().completion_tokens > 0 for s in streams)
    assert batcher.stats.batches == before + 2  # the greedy pair, then the other


# ---------------------------------------------------------------------------------------------
# Cancelling


@pytest.mark.unit
def test_a_cancelled_stream_stops_its_generation(batcher):
    stream = batcher.stream(_conv(QUESTIONS[0]), LONG)
    for _ in stream:
        stream.cancel()
        break
    assert stream.completion.finish_reason == FinishReason.CANCELLED
    assert 0 < stream.completion.completion_tokens < 100
    assert _wait_until(lambda: batcher.running == 0, 1.0)  # generate() has returned
    nxt = batcher.stream(_conv(QUESTIONS[1]), GREEDY)  # the worker is free: this starts at once
    nxt.wait()
    assert nxt.queue_s < 1.0


@pytest.mark.unit
def test_cancelling_one_row_lets_the_other_finish(batcher, inner):
    long, short = batcher.stream(_conv(QUESTIONS[0]), LONG), batcher.stream(_conv(QUESTIONS[1]), GREEDY)
    pieces = iter(long)  # held: a loop that is dropped cancels its stream
    next(pieces)
    started = time.monotonic()
    long.cancel()
    assert time.monotonic() - started < 1.0  # not held until the batch ends
    assert long.completion.finish_reason == FinishReason.CANCELLED
    assert short.wait() == inner.chat([_conv(QUESTIONS[1])], GREEDY)[0]
    assert batcher.stats.batches == 1 and batcher.stats.largest_batch == 2
    assert _wait_until(lambda: batcher.running == 0, 1.0)


@pytest.mark.unit
def test_a_stream_left_unread_frees_its_row(batcher):
    stream = batcher.stream(_conv(QUESTIONS[0]), LONG)
    for _ in stream:
        break  # no cancel(): closing the loop cancels
    assert stream.completion.finish_reason == FinishReason.CANCELLED
    assert _wait_until(lambda: batcher.running == 0, 1.0)


@pytest.mark.unit
def test_cancel_from_another_thread_ends_the_readers_loop(batcher):
    """A server cancels from the thread that saw the client go, while another reads the stream."""
    stream = batcher.stream(_conv(QUESTIONS[0]), LONG)
    read = []
    reader = threading.Thread(target=lambda: read.extend(stream))
    reader.start()
    assert _wait_until(lambda: read, 5.0)
    stream.cancel()
    reader.join(timeout=2.0)
    assert not reader.is_alive()
    assert stream.completion.finish_reason == FinishReason.CANCELLED
    assert _wait_until(lambda: batcher.running == 0, 1.0)


@pytest.mark.unit
def test_cancelling_a_waiting_request_returns_at_once(batcher):
    running = batcher.stream(_conv(QUESTIONS[0]), LONG)
    pieces = iter(running)  # held: a loop that is dropped cancels its stream
    next(pieces)
    waiting = batcher.stream(_conv(QUESTIONS[1]), dataclasses.replace(GREEDY, temperature=1.0))
    assert batcher.waiting == 1 and batcher.running == 1
    started = time.monotonic()
    waiting.cancel()
    assert time.monotonic() - started < 0.5
    assert waiting.completion.finish_reason == FinishReason.CANCELLED
    assert waiting.completion.completion_tokens == 0 and waiting.completion.prompt_tokens > 0
    assert waiting.queue_s is None and batcher.waiting == 0
    running.cancel()


# ---------------------------------------------------------------------------------------------
# Failures


@pytest.mark.unit
def test_a_failed_generate_reaches_every_row_and_the_engine_serves_on(batcher, inner):
    # An empty raw prompt tokenizes to no ids (the tiny tokenizer adds no BOS): generate raises.
    with pytest.raises(Exception) as direct:
        inner.complete(["", ""], GREEDY)
    streams = [batcher.stream_prompt("", GREEDY), batcher.stream_prompt("", GREEDY)]
    for stream in streams:
        with pytest.raises(type(direct.value)):
            stream.wait()
        with pytest.raises(type(direct.value)):  # and again, not a hang, if asked twice
            stream.wait()
    assert batcher.stats.batches == 1
    assert batcher.chat([_conv(QUESTIONS[0])], GREEDY) == inner.chat([_conv(QUESTIONS[0])], GREEDY)


@pytest.mark.unit
def test_close_fails_running_and_waiting_requests(inner):
    engine = BatchingEngine(inner, wait_s=0.0)
    running = engine.stream(_conv(QUESTIONS[0]), LONG)
    pieces = iter(running)  # held: a loop that is dropped cancels its stream
    next(pieces)
    waiting = engine.stream(_conv(QUESTIONS[1]), dataclasses.replace(GREEDY, temperature=1.0))
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 1.0
    for stream in (running, waiting):
        with pytest.raises(EngineClosedError):
            stream.wait()
    engine.close()  # idempotent
    with pytest.raises(EngineClosedError):
        engine.chat([_conv(QUESTIONS[0])], GREEDY)


@pytest.mark.unit
def test_the_global_rng_is_left_alone(batcher):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    batcher.chat([_conv(QUESTIONS[0])], GenerationSettings(max_new_tokens=8, temperature=1.0, seed=5))
    assert _wait_until(lambda: batcher.running == 0, 1.0)  # the worker's fork of the RNG is over
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real_model
def test_the_real_model_answers_concurrent_streams_as_alone():
    """SmolLM2 (a real byte-level tokenizer, a chat template, EOS): streams sent together share a
    batch, their pieces join to their answers, and each answer is what it gets alone."""
    from alpaca_forge import load_model

    inner = TransformersEngine(load_model("smollm2-135m-instruct", device="cpu"))
    engine = BatchingEngine(inner, wait_s=0.05)
    try:
        settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
        convs = [_conv(q) for q in ("What is the capital of France?", "Say hi in French.", "Name a color.")]
        streams = _together([lambda c=c: engine.stream(c, settings) for c in convs])
        joined = [(s, "".join(s)) for s in streams]
        assert engine.stats.batches == 1 and engine.stats.largest_batch == 3
        for (stream, text), c in zip(joined, convs, strict=True):
            assert text == stream.completion.text
            assert stream.completion == inner.chat([c], settings)[0]
    finally:
        engine.close()
