"""`data decontaminate`: training records that overlap an evaluation set (a shared n-gram, or a
ROUGE-L F1 above the threshold) are dropped and listed with what they matched; the pruned search
decides exactly as comparing every pair would."""

from __future__ import annotations

import json
import random

import pytest

from alpaca_forge.core.rouge import rouge_l, rouge_tokens
from alpaca_forge.data.decontaminate import decontaminate

from conftest import assert_user_error, run_cli

PASSAGE = (
    "The mitochondria is the powerhouse of the cell and it produces most of the chemical energy needed "
    "to power the biochemical reactions of the cell"
)


def brute_force(train, against, ngram, threshold):
    """Every pair compared: {train index: (n-gram hit?, best F1 if above the threshold, its item)}."""
    grams = set()
    for e in against:
        t = rouge_tokens(e)
        grams |= {tuple(t[p : p + ngram]) for p in range(len(t) - ngram + 1)} if ngram else set()
    found = {}
    for i, text in enumerate(train):
        t = rouge_tokens(text)
        ng = bool(ngram) and any(tuple(t[p : p + ngram]) in grams for p in range(len(t) - ngram + 1))
        scores = [rouge_l(text, e) for e in against]
        best = max(scores)
        rl = threshold is not None and best > threshold
        if ng or rl:
            found[i] = (ng, best if rl else None, scores.index(best))
    return found


@pytest.mark.unit
@pytest.mark.parametrize("ngram, threshold", [(13, 0.7), (4, 0.5), (3, 0.9), (0, 0.7), (5, None)])
def test_the_pruned_search_decides_as_every_pair_compared(ngram, threshold):
    rng = random.Random(ngram)
    words = ["the", "a", "of", "cat", "dog", "runs", "fast", "blue", "red", "Green", "x1", "Y2", "unbelievably", "internationalization-ready", "naïve"]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    against = [text(rng.randint(0, 16)) for _ in range(15)] + ["", "Ünïcode café, naïve résumé!"]
    train = []
    for _ in range(300):
        if rng.random() < 0.4:  # an evaluation item with a few words changed, maybe more after it
            t = rng.choice(against).split()
            for _ in range(rng.randint(0, 3)):
                if t:
                    t[rng.randrange(len(t))] = rng.choice(words)
            train.append(" ".join(t) + " " + text(rng.randint(0, 4)))
        else:
            train.append(text(rng.randint(0, 24)))
    hits = {h.index: h for h in decontaminate(train, against, ngram=ngram, threshold=threshold)}
    expected = brute_force(train, against, ngram, threshold)
    assert hits.keys() == expected.keys() and len(hits) > 10
    for i, (ng, best, item) in expected.items():
        assert ("ngram" in hits[i].methods) == ng and ("rouge_l" in hits[i].methods) == (best is not None)
        if best is not None and not ng:
            assert hits[i].rouge_l == best and hits[i].against == item


@pytest.mark.unit
def test_hand_made_overlaps_an_ngram_a_rouge_hit_and_near_misses():
    against = [f"Summarize this passage. {PASSAGE}", "Write a short poem about the sea", "What is the capital of France?"]
    train = [
        # 13 shared words inside a long, different text: ROUGE-L is low, the n-gram catches it
        "Here is a quiz about biology with many questions. " + " ".join(PASSAGE.upper().split()[3:17]) + ". " + "word " * 80,
        "write a SHORT poem, about the sea!",  # the same words: ROUGE-L 1.0
        "Write a poem about the ocean waves at night",  # near miss: F1 0.57, kept
        "What is the largest city of Spain and France?",  # near miss: F1 0.67 < 0.7, kept
        " ".join(PASSAGE.split()[:12]),  # 12 shared words: no 13-gram; ROUGE-L too low (long item)
    ]
    hits = {h.index: h for h in decontaminate(train, against)}
    assert sorted(hits) == [0, 1]
    assert hits[0].methods == ("ngram",) and hits[0].against == 0 and len(hits[0].ngram.split()) == 13
    assert hits[0].ngram == " ".join(rouge_tokens(" ".join(PASSAGE.split()[3:16])))
    assert hits[1].methods == ("rouge_l",) and hits[1].against == 1 and hits[1].rouge_l == 1.0
    assert rouge_l(train[3], against[2]) == pytest.approx(0.6667, abs=1e-4)


@pytest.mark.integration
def test_the_tool_writes_kept_rows_as_read_and_lists_each_drop_with_its_match(tmp_path):
    data, ev1, ev2 = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "more.json"
    rows = [
        {"instruction": "Write a short poem about the sea", "input": "", "output": "waves", "score": {"overall": 5}},
        {"instruction": "Translate to French", "input": "Good morning, my friend", "output": "Bonjour"},
        {"instruction": "Translate to French", "input": "The cat sleeps on the warm mat all day", "output": "..."},
        {"instruction": "Tell me a joke", "input": "", "output": "no"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev1.write_text(json.dumps({"id": "sea", "instruction": "write a short poem about the sea.", "instances": [{"input": "", "output": ""}]}) + "\n")
    ev2.write_text(json.dumps([{"id": "fr", "instruction": "Translate to French", "input": "The cat sleeps on the warm mat", "output": ""}]))
    out = tmp_path / "kept.jsonl"
    r = run_cli("data", "decontaminate", str(data), "--against", str(ev1), "--against", str(ev2), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [rows[1], rows[3]]
    dropped = [json.loads(line) for line in (tmp_path / "kept.dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["where"], d["against"]["id"], d["against"]["file"], d["method"]) for d in dropped] == [
        (0, f"{data}:1", "sea", str(ev1), "rouge_l"),
        (2, f"{data}:3", "fr", str(ev2), "rouge_l"),
    ]
    assert dropped[0]["rouge_l"] == 1.0 and dropped[0]["record"] == rows[0]
    assert "kept 2 of 4 records; 2 dropped" in r.stderr
    # Instructions alone: both translations match the French item now.
    alone = run_cli(
        "data", "decontaminate", str(data), "--against", str(ev2), "--output", str(out), "--key", "instruction"
    )
    assert alone.returncode == 0 and "kept 2 of 4" in alone.stderr
    # The n-gram test alone misses a near copy shorter than 13 words.
    ngram = run_cli("data", "decontaminate", str(data), "--against", str(ev1), "--output", str(out), "--no-rouge")
    assert ngram.returncode == 0 and "kept 4 of 4" in ngram.stderr


@pytest.mark.integration
def test_a_bad_evaluation_set_is_named_with_its_line_before_anything_is_written(tmp_path):
    data, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    ev.write_text(json.dumps({"instruction": "fine"}) + "\n" + json.dumps({"instruction": 3}) + "\n")
    out = tmp_path / "kept.jsonl"
    r = run_cli("data", "decontaminate", str(data), "--against", str(ev), "--output", str(out))
    assert_user_error(r, f"{ev}:2", "instruction")
    assert not out.exists()
    missing = run_cli("data", "decontaminate", str(data), "--output", str(out))
    assert missing.returncode == 2 and "--against" in missing.stderr


@pytest.mark.unit
def test_a_conversation_goes_when_any_of_its_user_turns_overlaps():
    from alpaca_forge.core.prompts import Message
    from alpaca_forge.core.records import Record
    from alpaca_forge.data.decontaminate import check_records
    from alpaca_forge.judging.items import Item

    turns = [("system", "Be brief."), ("user", "Write a short poem about the sea"), ("assistant", "Waves."),
             ("user", "Now make it rhyme, please"), ("assistant", "Waves, caves.")]
    conversation = Record.from_messages([Message(role, text) for role, text in turns])
    records = [Record("Tell me a joke", "", "no"), conversation]
    items = [Item("sea", "write a short poem about the sea", "", None, "eval.jsonl:1")]
    hits = check_records(records, items)
    assert [(h.index, h.against, h.methods, h.rouge_l) for h in hits] == [(1, 0, ("rouge_l",), 1.0)]
