"""The pool's ROUGE-L acceptance check without --similarity-details (only the pairs a shared-token
bound cannot rule out are scored) accepts and drops exactly what scoring the whole pool does."""

import gzip
import json
import random

import numpy as np
import pytest

from alpaca_forge import Record, read_records
from alpaca_forge.generate.steps import Pool, accept_into


def _perturbed(text: str, rng: random.Random) -> str:
    """A near-copy: up to 3 words dropped, added or swapped."""
    words = text.split()
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        if op < 0.3 and len(words) > 1:
            words.pop(rng.randrange(len(words)))
        elif op < 0.6:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["very", "the", "a", "briefly", "new"]))
        elif len(words) > 1:
            k = rng.randrange(len(words) - 1)
            words[k], words[k + 1] = words[k + 1], words[k]
    return " ".join(words)


def _realistic(dataset, count: int) -> tuple[list[str], list[str]]:
    """The seed tasks, and `count` candidates: windows of 5-30 words of the corpus's instructions
    (T0 prompts share whole templates), the evaluation instructions, and near-copies of all of these."""
    rng = random.Random(0)
    seeds = [r.instruction for r in read_records(dataset.seed_file)]
    step = max(1, dataset.corpus_records // count)
    with gzip.open(dataset.corpus, "rt", encoding="utf-8") as f:
        corpus = [json.loads(line)["instruction"].split() for k, line in enumerate(f) if k % step == 0]
    windows = []
    for _ in range(count * 3 // 4):
        words = rng.choice(corpus)
        start = rng.randrange(max(1, len(words) - 10))
        windows.append(" ".join(words[start : start + rng.randint(5, 30)]))
    evals = [json.loads(line)["instruction"] for line in dataset.eval_file.read_text().splitlines()]
    texts = windows + evals
    texts += [_perturbed(rng.choice(seeds + texts), rng) for _ in range(count - len(texts))]
    rng.shuffle(texts)
    return seeds, texts


def _decisions(seeds, texts, threshold, details, room=10**9):
    pool = Pool(seeds)
    accepted, similar, over = [], 0, 0
    for k in range(0, len(texts), 16):  # one reply's candidates at a time, as generate takes them
        kept, s, o = accept_into(pool, [Record(t, "", "x") for t in texts[k : k + 16]], threshold, room, details)
        accepted += [record.instruction for record, neighbours in kept]
        assert all(bool(neighbours) == details for record, neighbours in kept)
        similar, over = similar + s, over + o
    return accepted, similar, over


@pytest.mark.integration
@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_the_bounded_check_decides_as_scoring_the_whole_pool_on_real_instructions(dataset, threshold):
    seeds, texts = _realistic(dataset, 2000)
    fast = _decisions(seeds, texts, threshold, details=False)
    assert fast == _decisions(seeds, texts, threshold, details=True)
    accepted, similar, _ = fast
    assert similar > 100 and len(accepted) > 100, "both fates are common: the check is really put to work"


@pytest.mark.unit
def test_too_similar_is_any_score_above_the_threshold_at_every_threshold():
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "the", "a", "of", "to", "émigré", "x1", "Beta!"]
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(700)]  # > 2 index merges
    pool = Pool(texts[:600])
    queries = [*texts[600:], "", "!!!", texts[3], "alpha alpha alpha alpha"]
    scores = pool.scores_many(queries)
    for threshold in (0.05, 0.3, 0.5, 0.7, 0.9, 1.0, *np.unique(scores)[-5:].tolist()):
        threshold = min(max(threshold, 1e-6), 1.0)
        assert pool.too_similar(queries, threshold).tolist() == (scores > threshold).any(axis=1).tolist()


@pytest.mark.unit
def test_the_pool_index_follows_what_is_added_and_room_limits_alike():
    pool = Pool(["Name three primary colours."])
    assert pool.too_similar(["Name the three primary colours."], 0.7).tolist() == [True]
    for k in range(300):  # past the tail's size: its postings join the head
        pool.add(f"Tell a story number {k} about zyx{k} and qwe{k}.")
    assert pool.too_similar(["Tell a story number 299 about zyx299 and qwe299 please."], 0.7).tolist() == [True]
    assert pool.too_similar(["Tell a story about frogs."], 0.7).tolist() == [False]
    seeds, texts = ["Name three primary colours."], [f"Write a haiku about thing{k} in spring." for k in range(40)]
    assert _decisions(seeds, texts, 0.7, False, room=5) == _decisions(seeds, texts, 0.7, True, room=5)
