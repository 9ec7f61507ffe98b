"""ROUGE-L: parity with the rouge-score package, and the pruned greedy dedupe against brute force."""

import json
import random

import pytest

from alpaca_forge import read_records
from alpaca_forge.rouge import f1_from_lcs, greedy_dedupe, rouge_l, rouge_tokens

rouge_scorer = pytest.importorskip(
    "rouge_score.rouge_scorer", reason="rouge-score is a dev dependency (make test installs it)"
)
from rouge_score import tokenize as rs_tokenize  # noqa: E402

TRICKY = [
    "",
    "   ",
    "Hello, World! It's 2023-03-13.",
    "Ünïcödé wörds and naïve café — dashes…",
    "Kelvin sign: 5\u212a and dotted \u0130stanbul",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "ΣΟΦΙΑ Σοφία! 日本語のテキスト 123abc ABC123",
    "emoji 🙂 inside👍words",
]


def _short_texts(shared_data):
    """The 175 seed and 252 evaluation instructions: real, short, Alpaca-like."""
    paths = [shared_data / "seed_tasks.jsonl", shared_data / "eval" / "user_oriented_instructions.jsonl"]
    return [r.instruction for p in paths for r in read_records(p)]


def test_tokens_match_rouge_score(shared_data):
    import gzip

    with gzip.open(shared_data / "corpus" / "t0_55k.alpaca.jsonl.gz", "rt") as f:
        corpus = [json.loads(next(f))["instruction"] for _ in range(2000)]
    for text in TRICKY + _short_texts(shared_data) + corpus:
        assert rouge_tokens(text) == rs_tokenize.tokenize(text, None), text


def test_f1_matches_rouge_score_bit_for_bit(shared_data):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = _short_texts(shared_data) + TRICKY
    rnd = random.Random(0)
    pairs = [(rnd.choice(texts), rnd.choice(texts)) for _ in range(3000)] + [(t, t) for t in texts[:50]]
    for a, b in pairs:
        assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


def _lcs(a, b):
    """Textbook dynamic programme, independent of rapidfuzz."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for k, y in enumerate(b):
            cur.append(prev[k] + 1 if x == y else max(prev[k + 1], cur[k]))
        prev = cur
    return prev[-1]


def _brute_force_greedy(texts, threshold, score):
    kept = []
    for i, t in enumerate(texts):
        if all(score(t, texts[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9])
def test_greedy_dedupe_is_exact_on_near_duplicates(threshold):
    """Random texts over six words: many near-duplicates, every filter exercised at its edge."""
    rnd = random.Random(threshold)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randint(0, 24))) for _ in range(500)]
    texts += texts[:20]  # exact duplicates too

    def score(a, b):
        ta, tb = rouge_tokens(a), rouge_tokens(b)
        return f1_from_lcs(_lcs(ta, tb), len(ta), len(tb))

    kept, dropped = greedy_dedupe(texts, threshold)
    assert kept == _brute_force_greedy(texts, threshold, score)
    assert sorted(kept + [d.index for d in dropped]) == list(range(len(texts)))
    for d in dropped:
        assert d.kept_index in kept and d.kept_index < d.index
        assert d.score == score(texts[d.index], texts[d.kept_index]) > threshold


def test_greedy_dedupe_matches_the_rouge_score_reference(shared_data):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = _short_texts(shared_data)[:260]
    for threshold in (0.35, 0.7):
        expected = _brute_force_greedy(texts, threshold, lambda a, b: scorer.score(a, b)["rougeL"].fmeasure)
        assert greedy_dedupe(texts, threshold)[0] == expected


def test_empty_texts_are_kept_and_match_nothing():
    kept, dropped = greedy_dedupe(["", "a b c", "", "...", "a b c"], 0.7)
    assert kept == [0, 1, 2, 3] and [(d.index, d.kept_index, d.score) for d in dropped] == [(4, 1, 1.0)]
