"""ROUGE-L: parity with the rouge-score package, and the pruned greedy dedupe against brute force."""

import json
import random

import numpy as np
import pytest
from rapidfuzz.distance import LCSseq

from alpaca_forge import read_records
from alpaca_forge.core.rouge import (
    Vocabulary,
    _code_point,
    f1_from_lcs,
    f1_from_lcs_array,
    f1_from_lcs_matrix,
    rouge_l,
    rouge_tokens,
)
from alpaca_forge.core.rouge_dedupe import _GreedyDeduper, greedy_dedupe, greedy_dedupe_stream
from alpaca_forge.core.rouge_index import _as_strings, tokenize_corpus

rouge_scorer = pytest.importorskip(
    "rouge_score.rouge_scorer", reason="rouge-score is a dev dependency (make test installs it)"
)
from rouge_score import tokenize as rs_tokenize  # noqa: E402

pytestmark = pytest.mark.unit

TRICKY = [
    "",
    "   ",
    "Hello, World! It's 2023-03-13.",
    "Ünïcödé wörds and naïve café — dashes…",
    "Kelvin sign: 5\u212a and dotted \u0130stanbul",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "ΣΟΦΙΑ Σοφία! 日本語のテキスト 123abc ABC123",
    "emoji 🙂 inside👍words",
    "nul\x00inside and \x00\x00 at ends\x00",
    "eightchr eightchr ninechars ninechars sixteen_chars_xx averyveryverylongtokenindeedindeed 12345678 123456789",
]


def _short_texts(dataset):
    """The seed and evaluation instructions (175 and 252 of them in the real data): short, Alpaca-like."""
    return [r.instruction for p in (dataset.seed_file, dataset.eval_file) for r in read_records(p)]


def _corpus_head(dataset, n=2000):
    import gzip

    with gzip.open(dataset.corpus, "rt") as f:
        return [json.loads(line)["instruction"] for line, _ in zip(f, range(n), strict=False)]


def test_tokens_match_rouge_score(dataset):
    for text in TRICKY + _short_texts(dataset) + _corpus_head(dataset):
        assert rouge_tokens(text) == rs_tokenize.tokenize(text, None), text


def test_corpus_tokenizer_names_the_same_tokens(dataset):
    """The vectorised tokenizer gives each text rouge-score's tokens: equal ids <=> equal tokens."""
    texts = TRICKY + _short_texts(dataset) + _corpus_head(dataset) + TRICKY
    ids, ptr = tokenize_corpus(texts)
    names: dict[int, str] = {}
    for k, text in enumerate(texts):
        expected = rs_tokenize.tokenize(text, None)
        got = ids[ptr[k] : ptr[k + 1]].tolist()
        assert len(got) == len(expected), text
        for i, t in zip(got, expected, strict=True):
            assert names.setdefault(i, t) == t, (text, t, names[i])
    assert len(set(names.values())) == len(names)  # and distinct tokens get distinct ids


def test_corpus_tokenizer_edges():
    assert [a.tolist() for a in tokenize_corpus([])] == [[], [0]]
    ids, ptr = tokenize_corpus(["", "...", "a"])
    assert ptr.tolist() == [0, 0, 0, 1] and len(ids) == 1


def test_token_strings_skip_the_surrogates():
    """Token ids become code points; those from the surrogate range up are moved past it, and the
    LCS of the strings is the LCS of the id lists."""
    rnd = random.Random(0)
    seqs = [
        [rnd.choice([1, 0xD7FF, 0xD800, 0xDFFF, 0xE000, 70000]) for _ in range(rnd.randint(0, 12))]
        for _ in range(60)
    ]
    ptr = np.cumsum([0] + [len(x) for x in seqs])
    strings = _as_strings(np.array([t for x in seqs for t in x], dtype=np.int64), ptr)
    for k in range(len(seqs) - 1):
        a, b, sa, sb = seqs[k], seqs[k + 1], strings[k], strings[k + 1]
        assert len(sa) == len(a) and len(set(sa)) == len(set(a))
        assert LCSseq.similarity(sa, sb) == LCSseq.similarity(a, b)


def test_vocabulary_strings_score_as_token_lists(dataset):
    """A Vocabulary encodes a text as one code point per token: equal tokens, equal code points,
    and the LCS of two encodings is that of their token lists; ids skip the surrogates."""
    vocab = Vocabulary()
    texts = TRICKY + _short_texts(dataset)[:120]
    encoded = [vocab.encode(t) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        assert len(ids) == len(rouge_tokens(text))
    for a, b, ea, eb in zip(texts, texts[1:], encoded, encoded[1:], strict=False):
        assert LCSseq.similarity(ea, eb) == LCSseq.similarity(rouge_tokens(a), rouge_tokens(b)), (a, b)
    assert vocab.encode("Hello, hello WORLD") == vocab.encode("hello hello world")
    assert [ord(_code_point(k)) for k in (0, 0xD7FF, 0xD800, 0xF7FF)] == [0, 0xD7FF, 0xE000, 0xFFFF]
    with pytest.raises(ValueError):
        _code_point(0x110000)


def test_f1_matches_rouge_score_bit_for_bit(dataset):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = _short_texts(dataset) + TRICKY
    rnd = random.Random(0)
    pairs = [(rnd.choice(texts), rnd.choice(texts)) for _ in range(3000)] + [(t, t) for t in texts[:50]]
    for a, b in pairs:
        assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


def test_f1_array_is_the_scalar_formula_bit_for_bit():
    """The vectorised F1 (in place, few passes) gives `f1_from_lcs`'s bits, zeros included."""
    m, n, lcs = np.meshgrid(np.arange(0, 41), np.arange(0, 41), np.arange(0, 41), indexing="ij")
    valid = lcs <= np.minimum(m, n)
    m, n, lcs = m[valid], n[valid], lcs[valid]
    expected = np.array(
        [f1_from_lcs(a, b, c) for a, b, c in zip(lcs.tolist(), m.tolist(), n.tolist(), strict=True)]
    )
    got = f1_from_lcs_array(lcs, m, n)
    assert got.dtype == np.float64 and np.array_equal(got.view(np.int64), expected.view(np.int64))
    matrix = f1_from_lcs_matrix(
        np.array([[0, 2], [3, 1]], dtype=np.int32), np.array([3, 4]), np.array([5, 0])
    )
    assert matrix.tolist() == [[0.0, 0.0], [f1_from_lcs(3, 4, 5), 0.0]]
    assert float(f1_from_lcs_array(3, 4, 5)) == f1_from_lcs(3, 4, 5)


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

    expected = _brute_force_greedy(texts, threshold, score)
    # Blocks and groups of several sizes, so that every path (joins with earlier blocks, with
    # earlier groups of one block, and inside a group) decides some of the drops.
    # A sample shorter than the input leaves elements out of the learnt order (ranked as rarest).
    for block, group, sample in [(2048, 64, 65536), (50, 7, 65536), (7, 3, 30), (1, 1, 0), (64, 64, 200)]:
        kept, dropped = _GreedyDeduper(texts, threshold, block=block, group=group, sample=sample).run()
        assert kept == expected, (block, group, sample)
        assert sorted(kept + [d.index for d in dropped]) == list(range(len(texts)))
        for d in dropped:
            assert d.kept_index in kept and d.kept_index < d.index
            assert d.score == score(texts[d.index], texts[d.kept_index]) > threshold
    assert greedy_dedupe(texts, threshold)[0] == expected
    fates = list(greedy_dedupe_stream((t for t in texts), threshold))  # a stream, read once
    assert [k for k, fate in fates if fate is None] == expected


def test_greedy_dedupe_matches_the_rouge_score_reference(dataset):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = (_short_texts(dataset) + _corpus_head(dataset, 400))[:260]
    for threshold in (0.35, 0.7):
        expected = _brute_force_greedy(texts, threshold, lambda a, b: scorer.score(a, b)["rougeL"].fmeasure)
        assert greedy_dedupe(texts, threshold)[0] == expected


def test_empty_texts_are_kept_and_match_nothing():
    kept, dropped = greedy_dedupe(["", "a b c", "", "...", "a b c"], 0.7)
    assert kept == [0, 1, 2, 3] and [(d.index, d.kept_index, d.score) for d in dropped] == [(4, 1, 1.0)]
