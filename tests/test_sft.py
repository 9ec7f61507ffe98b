"""Training data: exact masks, truncation that keeps the EOS (core.examples), packing without
cross-talk (train.batching)."""

import random

import pytest
import torch

from alpaca_forge import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, Record, get_format, split_records
from alpaca_forge.core.examples import IGNORE_INDEX, describe_example, encode_record, tokenize_records
from alpaca_forge.train.batching import COUNTS, Collator, SFTDataset, pack

from conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_masks_match_a_hand_computed_example(tok):
    record = Record("What is the capital of France?", "", "Paris.")
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=record.instruction)
    p = tok(prompt)["input_ids"]
    o = tok("Paris.", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert eos == 2 and len(o) >= 3

    ex = encode_record(record, 0, tok, get_format("alpaca"), 512)
    assert ex.input_ids == p + o + [eos]
    assert ex.labels == [IGNORE_INDEX] * len(p) + o + [eos]
    assert ex.trained_tokens == len(o) + 1 and not ex.truncated

    # Cut to the window: the response loses tokens from its end, never the EOS.
    cut = encode_record(record, 0, tok, get_format("alpaca"), len(p) + 3)
    assert cut.input_ids == p + o[:2] + [eos] and cut.truncated
    assert cut.labels == [IGNORE_INDEX] * len(p) + o[:2] + [eos]

    # No room for one response token and the EOS: no example at all.
    assert encode_record(record, 0, tok, get_format("alpaca"), len(p) + 1) is None

    # Training on inputs: every token but the first (which nothing predicts) is a target.
    full = encode_record(record, 0, tok, get_format("alpaca"), 512, train_on_inputs=True)
    assert full.labels == [IGNORE_INDEX, *(p + o + [eos])[1:]]


def test_input_and_chat_prompts_are_masked_exactly(tok):
    record = Record("Summarise.", "the cat sat on the mat", "A cat sat.")
    ex = encode_record(record, 0, tok, get_format("alpaca"), 512)
    p = tok(ALPACA_PROMPT_WITH_INPUT.format(instruction="Summarise.", input="the cat sat on the mat"))[
        "input_ids"
    ]
    assert ex.labels[: len(p)] == [IGNORE_INDEX] * len(p) and ex.input_ids[: len(p)] == p
    chat = encode_record(record, 0, tok, get_format("chat"), 512)
    text = "<|user|>\nSummarise.\n\nthe cat sat on the mat\n<|assistant|>\n"
    cp = tok(text, add_special_tokens=False)["input_ids"]
    assert chat.input_ids[: len(cp)] == cp
    assert chat.labels == [IGNORE_INDEX] * len(cp) + chat.input_ids[len(cp) :]
    assert chat.input_ids[-1] == tok.eos_token_id


def test_report_counts_records_whose_prompt_fills_the_window(tok):
    records = [
        Record("short", "", "ok"),
        Record("a much longer instruction " * 20, "", "ok"),
        Record("x", "", "y" * 400),
    ]
    examples, report = tokenize_records(records, tok, get_format("alpaca"), 80)
    assert [e.record for e in examples] == [0, 2]
    assert report.no_room == [1] and report.truncated == 1 and report.examples == 2
    assert "1 records left out" in report.summary() and "records 2" in report.summary()


def test_describe_marks_masked_text(tok):
    ex = encode_record(
        Record("What is the capital of France?", "", "Paris."), 0, tok, get_format("alpaca"), 512
    )
    text = describe_example(ex, tok, color=False)
    assert text.startswith("⟦Below is an instruction") and text.endswith("### Response:⟧Paris.</s>")


def test_pack_places_every_example_once_within_capacity():
    rnd = random.Random(0)
    lengths = [rnd.randint(1, 100) for _ in range(500)]
    rows = pack(lengths, 128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # Best fit, longest first, gets close to the bound.
    assert len(rows) <= -(-sum(lengths) // 128) * 1.05 + 1
    assert pack(lengths, 128) == rows  # deterministic


def test_packed_rows_do_not_attend_across_examples(tok):
    """A packed row gives every example the logits and loss it gets alone."""
    model = build_tiny_model(tok).train()  # as in training (dropout is 0 in this config)
    records = [
        Record("What is 2 plus 2?", "", "4."),
        Record("Name a colour.", "", "Red."),
        Record("Hi", "", "Hello there."),
    ]
    examples, _ = tokenize_records(records, tok, get_format("alpaca"), 512)
    data = SFTDataset(examples, "packed", 512)
    assert len(data) == 1
    batch = Collator(tok.pad_token_id, packed=True)([data[0]])
    assert "attention_mask" not in batch
    batch.pop(COUNTS)  # the trainer takes the counts out before the model sees the batch
    with torch.no_grad():
        packed = model(**batch).logits[0]  # exactly what the trainer passes, labels aside
        at = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            assert torch.allclose(packed[at : at + len(e.input_ids)], alone, atol=1e-5)
            at += len(e.input_ids)


def test_collator_pads_and_counts(tok):
    examples, _ = tokenize_records(
        [Record("a", "", "b"), Record("a longer instruction here", "", "and a longer answer")],
        tok,
        get_format("alpaca"),
        512,
    )
    data = SFTDataset(examples, "padded", 512)
    c = Collator(tok.pad_token_id, packed=False)
    batch = c([data[0], data[1]])
    n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
    width = max(n0, n1)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum().item() == n0 + n1
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    trained = examples[0].trained_tokens + examples[1].trained_tokens
    assert batch[COUNTS] == (n0 + n1, 2 * width - n0 - n1, trained)


def test_validation_split_is_seeded_and_checked():
    """The split `train --val-size` holds out (the one in core.records, shared with `data split`)."""
    records = [Record(f"task {i}", "", "x") for i in range(10)]
    train, val = split_records(records, 3, seed=1)
    assert len(train) == 7 and len(val) == 3 and split_records(records, 3, seed=1) == (train, val)
    assert split_records(records, 0.3, seed=1) == (train, val)  # a share of 10 records: the same 3
    from alpaca_forge import UserError

    with pytest.raises(UserError, match="nothing to train on"):
        split_records(records, 10, seed=1)
