"""`alpaca-forge eval pairwise` and `eval leaderboard`: a scripted judge on loopback whose every
verdict is known, the statistics against direct computations, bad input, resume after kill -9,
and the embedded model judging real text-davinci-003 vs -001 answers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from alpaca_forge.core.config import build_config
from alpaca_forge.eval import stats
from alpaca_forge.eval.config import LeaderboardConfig, PairwiseConfig
from alpaca_forge.eval.runner import run_leaderboard, run_pairwise
from alpaca_forge.judging.judge import parse_verdict
from fake_judge import Ask, FakeJudge

from conftest import CLI, assert_user_error, run_cli

# ---------------------------------------------------------------------------------------------
# A tiny set and systems, written per test


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_number(ask: Ask) -> int:
    return int(re.match(r"Task (\d+)", ask.instruction).group(1))


def make_set(tmp: Path, n: int, *, categories: int = 0) -> Path:
    rows = []
    for k in range(n):
        row = {
            "id": f"t{k}",
            "instruction": f"Task {k}: describe item {k}.",
            "instances": [{"input": "", "output": ""}],
        }
        if categories:
            row["motivation_app"] = f"app{k % categories}"
        rows.append(row)
    return write_jsonl(tmp / "set.jsonl", rows)


def make_system(tmp: Path, name: str, answers: list[str], *, by_id: bool = True) -> Path:
    rows = []
    for k, text in enumerate(answers):
        row = {"instruction": f"Task {k}: describe item {k}.\n", "input": "", "response": text}
        if by_id:
            row = {"id": f"t{k}", **row}
        rows.append(row)
    return write_jsonl(tmp / f"{name}.jsonl", rows)


def pairwise(tmp: Path, url: str, a: Path | str, b: Path | str, **more) -> object:
    flags = {
        "set": str(tmp / "set.jsonl"),
        "a": str(a),
        "b": str(b),
        "output": str(tmp / "out"),
        "judge_engine": "openai",
        "judge_base_url": url,
        "judge_model": "fake-judge",
        "judge_max_retries": 0,
        "batch_size": 8,
        "bootstrap_samples": 400,
        **more,
    }
    return run_pairwise(build_config(PairwiseConfig, flags), progress=False)


def pairwise_cli(tmp: Path, a: Path, b: Path):
    """`eval pairwise` on the command line, for the mistakes it must refuse before any judging."""
    return run_cli(
        "eval",
        "pairwise",
        "--set",
        str(tmp / "set.jsonl"),
        "--a",
        str(a),
        "--b",
        str(b),
        "--output",
        str(tmp / "o"),
    )


# Item k's truth: X better, Y better, or equally good (two texts the judge calls a tie).
def truth(k: int) -> str:
    return ("x", "x", "y", "same")[k % 4]


def biased(k: int) -> bool:  # on these the judge answers "A" whatever it is shown
    return k % 5 == 0


def known_judge(ask: Ask) -> str:
    if biased(task_number(ask)):
        return "A\nThe first one is better."
    if "good" in ask.a:
        return "A\nIt answers the task."
    if "good" in ask.b:
        return "**Verdict: B** - it answers the task."
    return "tie\nThey are the same."


def known_systems(tmp: Path, n: int) -> tuple[Path, Path]:
    x = [
        {"x": f"good answer {k}", "y": f"bad answer {k}", "same": f"plain answer {k}"}[truth(k)]
        for k in range(n)
    ]
    y = [
        {"x": f"bad answer {k}", "y": f"good answer {k}", "same": f"plain reply {k}"}[truth(k)]
        for k in range(n)
    ]
    return make_system(tmp, "x", x), make_system(tmp, "y", y, by_id=False)


# ---------------------------------------------------------------------------------------------
# The swap logic and the counts


@pytest.mark.integration
def test_both_orders_cancel_a_known_position_bias_and_the_counts_are_exact(tmp_path):
    n = 40
    make_set(tmp_path, n, categories=4)
    x, y = known_systems(tmp_path, n)
    with FakeJudge(known_judge) as url:
        run = pairwise(tmp_path, url, x, y)
    r = run.result
    expect_win = sum(1 for k in range(n) if not biased(k) and truth(k) == "x")
    expect_loss = sum(1 for k in range(n) if not biased(k) and truth(k) == "y")
    assert (r.wins, r.ties, r.losses, r.unjudged) == (
        expect_win,
        n - expect_win - expect_loss,
        expect_loss,
        0,
    )
    assert r.judgements == 2 * n and run.asked == 2 * n and r.unreadable == 0 and r.identical == 0
    assert r.consistent == sum(1 for k in range(n) if not biased(k)) and r.both_orders == n
    assert set(r.disagreements) == {f"t{k}" for k in range(n) if biased(k)}
    decisive_unbiased = 2 * sum(1 for k in range(n) if not biased(k) and truth(k) != "same")
    biased_verdicts = 2 * sum(1 for k in range(n) if biased(k))
    assert r.decisive == decisive_unbiased + biased_verdicts
    assert r.first_slot == decisive_unbiased // 2 + biased_verdicts  # every biased verdict picked slot A
    assert r.win_rate.value == pytest.approx((r.wins + r.ties / 2) / n)
    assert r.win_rate.low < r.win_rate.value < r.win_rate.high
    assert len(r.categories) == 4 and sum(c.judged for c in r.categories) == n

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["wins"], report["ties"], report["losses"]) == (r.wins, r.ties, r.losses)
    assert report["position_consistency"] == pytest.approx(0.8)
    assert {row["id"]: row["outcome"] for row in report["per_item"]}["t0"] == "tie"  # t0 is biased
    md = (tmp_path / "out" / "report.md").read_text()
    assert "position consistency" in md and "cannot be told apart from a tie" in md
    assert (tmp_path / "out" / "winrate.png").stat().st_size > 1000
    assert (tmp_path / "out" / "categories.png").stat().st_size > 1000


@pytest.mark.integration
def test_one_order_lets_the_bias_through_and_is_seeded(tmp_path):
    n = 40
    make_set(tmp_path, n)
    x, y = known_systems(tmp_path, n)
    with FakeJudge(known_judge) as url:
        one = pairwise(tmp_path, url, x, y, one_order=True, output=str(tmp_path / "one"))
        again = pairwise(tmp_path, url, x, y, one_order=True, output=str(tmp_path / "again"))
    r = one.result
    assert r.judgements == n and r.both_orders == 0 and r.position_consistency is None
    slots = {o.item_id: o.slots[0] for o in r.outcomes}
    assert 10 < sum(s == 1 for s in slots.values()) < 30  # a random order per item, both occur
    assert slots == {o.item_id: o.slots[0] for o in again.result.outcomes}  # ... the same for the same seed
    # every biased item is decided by the slot it landed in: a win or a loss, never the tie it is
    for o in r.outcomes:
        k = int(o.item_id[1:])
        if biased(k):
            assert o.outcome == ("win" if o.slots[0] == 1 else "loss")


@pytest.mark.integration
def test_rerun_is_free_and_a_shared_cache_is_reused(tmp_path):
    n = 12
    make_set(tmp_path, n)
    x, y = known_systems(tmp_path, n)
    with FakeJudge(known_judge) as url:
        first = pairwise(tmp_path, url, x, y)
    fj = FakeJudge(known_judge)  # the judge moved to another port: its verdicts still count
    with fj as url:
        again = pairwise(tmp_path, url, x, y)
        assert again.asked == 0 and len(fj.asks) == 0
        counts = lambda r: (r.wins, r.ties, r.losses)  # noqa: E731
        assert counts(again.result) == counts(first.result)
        # another output folder with the first run's cache: nothing asked either
        cache = str(tmp_path / "out" / "judgements.jsonl")
        elsewhere = pairwise(tmp_path, url, x, y, output=str(tmp_path / "else"), cache=cache)
        assert elsewhere.asked == 0 and len(fj.asks) == 0
        # another judge, or another wording of the settings: asked again
        other = pairwise(tmp_path, url, x, y, judge_model="another-judge")
        assert other.asked == first.asked == len(fj.asks)
        assert pairwise(tmp_path, url, x, y, judge_max_new_tokens=5).asked == first.asked


@pytest.mark.integration
def test_a_killed_run_resumes_and_loses_nothing(tmp_path):
    n = 30
    make_set(tmp_path, n)
    x, y = known_systems(tmp_path, n)

    def slow(ask: Ask) -> str:
        time.sleep(0.05)
        return known_judge(ask)

    fj = FakeJudge(slow)
    cache = tmp_path / "out" / "judgements.jsonl"
    with fj as url:
        args = [
            "eval", "pairwise", "--set", str(tmp_path / "set.jsonl"), "--a", str(x), "--b", str(y),
            "--output", str(tmp_path / "out"), "--judge-engine", "openai", "--judge-base-url", url,
            "--judge-model", "fake-judge", "--batch-size", "2", "--bootstrap-samples", "200",
        ]  # fmt: skip
        proc = subprocess.Popen([str(CLI), "-q", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not cache.exists() or cache.read_text().count("\n") < 10):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = cache.read_text().count("\n")
        assert 10 <= kept < 2 * n - 10, "the run should have been killed midway"
        before = len(fj.asks)
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    unique = 2 * n
    asked_again = len(fj.asks) - before
    assert asked_again == unique - kept  # only what the cache lacked
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == unique and len({r["key"] for r in rows}) == unique
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["judgements"] == 2 * n and report["unjudged"] == 0


# ---------------------------------------------------------------------------------------------
# Length control


def length_system_pair(tmp: Path, n: int, share_x_longer: float, seed: int = 1) -> tuple[Path, Path]:
    """Two systems of equal quality whose answers differ only in length; X is the longer one on
    about `share_x_longer` of the items."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for k in range(n):
        short, long = f"answer {k}", f"answer {k} " + "with more words " * int(rng.integers(1, 12))
        x_long = rng.random() < share_x_longer
        x.append(long if x_long else short)
        y.append(short if x_long else long)
    return make_system(tmp, "x", x), make_system(tmp, "y", y)


def likes_length(ask: Ask) -> str:
    """Prefers the longer answer, more surely the bigger the difference; knows nothing else."""
    p_a = 1 / (1 + math.exp(-2.5 * (math.log1p(len(ask.a)) - math.log1p(len(ask.b)))))
    draw = int(hashlib.sha256((ask.a + "|" + ask.b).encode()).hexdigest()[:8], 16) / 16**8
    return "A" if draw < p_a else "B"


@pytest.mark.integration
def test_a_judge_that_likes_length_moves_the_raw_rate_not_the_length_controlled_one(tmp_path):
    n = 160
    make_set(tmp_path, n)
    xp, yp = length_system_pair(tmp_path, n, 0.75)
    with FakeJudge(likes_length) as url:
        r = pairwise(tmp_path, url, xp, yp).result
    lc = r.length_controlled
    assert r.win_rate.value > 0.6 and r.win_rate.low > 0.5  # the raw rate says X is better
    assert (
        lc.note is None and abs(lc.win_rate.value - 0.5) < 0.07 and lc.win_rate.low < 0.5 < lc.win_rate.high
    )
    assert lc.length_coef > 1  # ... because the judge likes length


@pytest.mark.integration
def test_length_control_is_refused_where_the_data_cannot_show_it(tmp_path):
    n = 30
    make_set(tmp_path, n)
    xp, yp = length_system_pair(tmp_path, n, 1.0)  # X always the longer: equal length never seen

    with FakeJudge(likes_length) as url:
        r = pairwise(tmp_path, url, xp, yp).result
    assert (
        r.length_controlled.win_rate.value is None and "outside the lengths seen" in r.length_controlled.note
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["length_controlled_win_rate"]["value"] is None and report["length_control_note"]
    assert "No length-controlled win rate" in (tmp_path / "out" / "report.md").read_text()
    # a judge decided by length alone: not identified either
    y = [1.0, 0.0] * 20
    d = [0.5, -0.5] * 20
    assert (
        "length alone decides"
        in stats.length_controlled(y, d, [1, -1] * 20, [k // 2 for k in range(40)]).note
    )
    # a judge that picks slot A but for one verdict: the slot, not the answers, decides
    rng = np.random.default_rng(0)
    slots = [1, -1] * 100
    y = [1.0 if s == 1 else 0.0 for s in slots]
    y[1] = 1.0
    lc = stats.length_controlled(y, rng.normal(0, 0.5, 200), slots, [k // 2 for k in range(200)])
    assert lc.win_rate.value is None and "follow the slot" in lc.note and lc.slot_coef > 5


@pytest.mark.unit
def test_length_control_recovers_a_true_preference_under_a_length_bias():
    rng = np.random.default_rng(0)
    items = 600
    dlen = rng.normal(0.3, 0.8, items)  # A tends to be longer
    true_theta, beta = 0.4, 1.5
    rows_y, rows_d, rows_s, rows_g = [], [], [], []
    for k in range(items):
        for slot in (1, -1):
            p = 1 / (1 + math.exp(-(true_theta + beta * dlen[k] + 0.3 * slot)))
            rows_y.append(float(rng.random() < p))
            rows_d.append(dlen[k])
            rows_s.append(slot)
            rows_g.append(k)
    lc = stats.length_controlled(rows_y, rows_d, rows_s, rows_g, samples=200, seed=0)
    want = 1 / (1 + math.exp(-true_theta))
    assert lc.win_rate.low < want < lc.win_rate.high
    assert abs(lc.length_coef - beta) < 0.4 and abs(lc.slot_coef - 0.3) < 0.25
    assert np.mean(rows_y) > want + 0.05  # the raw rate is pulled up by the length bias


@pytest.mark.unit
def test_the_logistic_fit_matches_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(300), rng.normal(size=300), rng.choice([-1.0, 1.0], 300)])
    y = rng.choice([0.0, 0.5, 1.0], 300, p=[0.3, 0.2, 0.5])  # ties are half a win
    ours = stats.fit_logistic(X, y, ridge=1e-9)
    ref = sm.GLM(y, X, family=sm.families.Binomial()).fit().params
    np.testing.assert_allclose(ours, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The statistics against direct computations


@pytest.mark.unit
def test_sign_test_equals_the_binomial_sum():
    for wins, losses in [(90, 89), (30, 10), (0, 7), (5, 5), (0, 0)]:
        n = wins + losses
        k = min(wins, losses)
        direct = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
        assert stats.sign_test(wins, losses) == pytest.approx(direct, rel=1e-9)


@pytest.mark.unit
def test_holm_equals_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    for m in (1, 5, 71):
        p = rng.uniform(0, 0.2, m).tolist()
        ref = multitest.multipletests(p, method="holm")[1]
        np.testing.assert_allclose(stats.holm(p), ref, rtol=1e-12)


@pytest.mark.unit
def test_the_bootstrap_interval_resamples_items():
    rng = np.random.default_rng(5)
    scores = rng.choice([0.0, 0.5, 1.0], 252, p=[0.4, 0.15, 0.45])
    e = stats.bootstrap_mean(scores, samples=4000, seed=7)
    # the same draws, made directly
    draws = np.random.default_rng(7).integers(0, 252, size=(4000, 252))
    direct = np.percentile(scores[draws].mean(axis=1), [2.5, 97.5])
    assert (e.low, e.high) == pytest.approx(tuple(direct))
    # and close to the normal interval for a mean of 252 items
    half = 1.96 * scores.std() / math.sqrt(252)
    assert e.low == pytest.approx(scores.mean() - half, abs=0.01) and e.high == pytest.approx(
        scores.mean() + half, abs=0.01
    )
    # Alpaca's own result: 90 wins, 89 losses, 73 ties of 252 is 50.2% with about 45-55%
    alpaca = np.array([1.0] * 90 + [0.0] * 89 + [0.5] * 73)
    a = stats.bootstrap_mean(alpaca, samples=4000)
    assert a.value == pytest.approx(0.502, abs=0.001) and 0.44 < a.low < 0.46 and 0.54 < a.high < 0.56


@pytest.mark.unit
def test_the_power_line():
    from scipy.stats import binom, binomtest

    # 252 items without ties: about the normal approximation's (z_.975 + z_.8) * 0.5 / sqrt(252)
    assert stats.detectable_points(252) == pytest.approx(100 * 2.8016 * 0.5 / math.sqrt(252), abs=0.5)
    # with 30% ties only 176 items are decided, and the point is checked against the test itself
    d = stats.detectable_points(252, 0.3)
    share = 0.5 + d / 100 / 0.7  # wins among the decided items at that win rate
    k = next(k for k in range(88, 177) if binomtest(k, 176, 0.5).pvalue <= 0.05)
    assert binom.sf(k - 1, 176, share) == pytest.approx(0.8, abs=1e-6)
    assert stats.detectable_points(0) is None and stats.detectable_points(252, 1.0) is None
    assert stats.detectable_points(5) is None  # 5 of 5 wins is p = 0.0625: nothing can show


@pytest.mark.unit
def test_bradley_terry_equals_a_logistic_fit():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(2)
    strength = np.array([0.8, 0.0, -0.5, 0.3])
    wins = np.zeros((4, 4))
    X, y = [], []
    for _ in range(2000):
        i, j = rng.choice(4, 2, replace=False)
        won = rng.random() < 1 / (1 + math.exp(strength[j] - strength[i]))
        wins[i, j] += won
        wins[j, i] += 1 - won
        row = np.zeros(4)
        row[i], row[j] = 1, -1
        X.append(row[1:])  # system 0 is the reference (strength 0 in the logistic fit)
        y.append(float(won))
    ours = stats.bradley_terry(wins, prior=0)
    ref = np.concatenate(
        [[0.0], sm.GLM(np.array(y), np.array(X), family=sm.families.Binomial()).fit().params]
    )
    np.testing.assert_allclose(ours - ours[0], ref, atol=1e-5)


@pytest.mark.unit
def test_cohen_kappa_equals_statsmodels():
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = np.random.default_rng(4)
    a = rng.choice(["a", "b", "tie"], 100).tolist()
    b = [x if rng.random() < 0.6 else rng.choice(["a", "b", "tie"]) for x in a]
    labels = ["a", "b", "tie"]
    table = np.array(
        [[sum(1 for u, v in zip(a, b, strict=True) if u == p and v == q) for q in labels] for p in labels]
    )
    assert stats.cohen_kappa(a, b) == pytest.approx(inter_rater.cohens_kappa(table).kappa, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Verdicts from messy replies


@pytest.mark.unit
@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("A", "A"),
        ("B\nIt is shorter and correct.", "B"),
        ("tie", "tie"),
        ("**B**", "B"),
        ("Verdict: A", "A"),
        ("Response B is better.", "B"),
        ("The better response is A.", "A"),
        ("I prefer response B because it is clearer.", "B"),
        ("Neither", "tie"),
        ("(A)", "A"),
        ("A, since it follows the instruction.", "A"),
        ("Verdict: a tie", "tie"),
        ("", None),
        ("Hmm, both have merits.", None),
        ("A is worse than B", None),
        ("Response A is better. Response B is better.", None),  # two verdicts: none is taken
        ("The more helpful, correct, and clear response follows.", None),
        ("a", None),  # a bare lower-case letter is an article as often as a verdict
        ("Response A: 6/10. Response B: 8/10. B is better.", "B"),  # "Response A:" labels a comment
        ("Response A: the answer is wrong.\nResponse B: correct.\nB", None),
        ("Assistant A - incorrect", None),
        ("A is not better than B", None),
        ("A is definitely not better", None),
        ("Both are good, but A is better.", None),
        ("Neither, B is better", None),
        ("A\nActually B is better", None),  # two verdicts that disagree, on different lines
        ("A is the better choice.", "A"),
        ("The answer is A.", "A"),
    ],
)
def test_verdicts_are_read_from_messy_replies_and_never_guessed(reply, verdict):
    assert parse_verdict(reply) == verdict


# ---------------------------------------------------------------------------------------------
# Several systems


@pytest.mark.integration
def test_leaderboard_ranks_known_strengths_and_reuses_the_pairwise_cache(tmp_path):
    n = 30
    make_set(tmp_path, n)
    quality = {"best": 3, "mid": 2, "worst": 1}
    paths = [
        make_system(tmp_path, name, [f"q{q} answer {k}" for k in range(n)]) for name, q in quality.items()
    ]

    def by_quality(ask: Ask) -> str:
        qa, qb = int(ask.a[1]), int(ask.b[1])
        k = task_number(ask)
        if k % 6 == 0:  # an upset now and then, so no system wins everything
            return "B" if qa > qb else "A"
        return "A" if qa > qb else "B" if qb > qa else "tie"

    fj = FakeJudge(by_quality)
    with fj as url:
        cache = str(tmp_path / "shared-cache.jsonl")
        pairwise(tmp_path, url, paths[0], paths[2], cache=cache)
        asked_by_pairwise = len(fj.asks)
        flags = {
            "set": str(tmp_path / "set.jsonl"),
            "systems": [str(p) for p in paths],
            "output": str(tmp_path / "board"),
            "judge_engine": "openai",
            "judge_base_url": url,
            "judge_model": "fake-judge",
            "bootstrap_samples": 200,
            "cache": cache,
        }
        board = run_leaderboard(build_config(LeaderboardConfig, flags), progress=False)
    assert [r.name for r in board.rows] == ["best", "mid", "worst"]
    assert len(board.pairs) == 3 and asked_by_pairwise == 2 * n
    assert len(fj.asks) - asked_by_pairwise == 2 * 2 * n  # best-vs-worst came from the cache
    assert all(r.low <= r.strength <= r.high for r in board.rows)
    data = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["best", "mid", "worst"]
    assert (tmp_path / "board" / "leaderboard.png").stat().st_size > 1000
    assert "Bradley–Terry" in (tmp_path / "board" / "leaderboard.md").read_text()


@pytest.mark.integration
def test_leaderboard_against_a_baseline_judges_k_minus_1_pairs(tmp_path):
    n = 8
    make_set(tmp_path, n)
    paths = [make_system(tmp_path, name, [f"{name} says {k}" for k in range(n)]) for name in ("p", "q", "r")]
    fj = FakeJudge(lambda ask: "A" if ask.a.startswith("p") else "B" if ask.b.startswith("p") else "tie")
    with fj as url:
        result = run_cli(
            "eval", "leaderboard", "--set", str(tmp_path / "set.jsonl"), *map(str, paths), "--baseline", "q",
            "--output", str(tmp_path / "board"), "--judge-engine", "openai", "--judge-base-url", url,
            "--judge-model", "fake-judge", "--bootstrap-samples", "200",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(fj.asks) == 2 * 2 * n  # p-q and r-q, both orders; never p-r
    assert "1. p" in result.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, or clearly counted outcomes


def cli_pairwise(tmp: Path, url: str, a: Path | str, b: Path | str, *more: str):
    return run_cli(
        "eval", "pairwise", "--set", str(tmp / "set.jsonl"), "--a", str(a), "--b", str(b),
        "--output", str(tmp / "out"), "--judge-engine", "openai", "--judge-base-url", url,
        "--judge-model", "fake-judge", "--judge-max-retries", "0", "--bootstrap-samples", "200", *more,
    )  # fmt: skip


@pytest.mark.integration
def test_a_system_missing_an_instruction_is_named(tmp_path):
    make_set(tmp_path, 6)
    x = make_system(tmp_path, "x", [f"x {k}" for k in range(6)])
    rows = [
        json.loads(line)
        for line in make_system(tmp_path, "y", [f"y {k}" for k in range(6)]).read_text().splitlines()
    ]
    write_jsonl(tmp_path / "y.jsonl", rows[:3] + rows[4:])
    with FakeJudge(known_judge) as url:
        r = cli_pairwise(tmp_path, url, x, tmp_path / "y.jsonl")
    assert_user_error(r, "has no answer for 1 of the set's 6 instructions", "t3", "Task 3")


@pytest.mark.integration
def test_answers_to_instructions_not_in_the_set_and_repeated_answers(tmp_path):
    make_set(tmp_path, 4)
    x = make_system(tmp_path, "x", [f"x {k}" for k in range(4)])
    rows = [{"instruction": "Something else entirely.", "input": "", "response": "?"}]
    rows += [{"id": "t0", "instruction": "Task 0: describe item 0.", "response": "again"}]
    rows += [
        {"id": f"t{k}", "instruction": f"Task {k}: describe item {k}.", "response": "y"} for k in range(4)
    ]
    write_jsonl(tmp_path / "y.jsonl", rows)
    with FakeJudge(known_judge) as url:
        r = cli_pairwise(tmp_path, url, x, tmp_path / "y.jsonl")
    assert_user_error(r, "y.jsonl:1", "not in the set", "y.jsonl:3", "a second answer to item 't0'")


@pytest.mark.integration
def test_duplicate_ids_in_the_set_and_duplicate_system_names(tmp_path):
    write_jsonl(
        tmp_path / "set.jsonl",
        [{"id": "same", "instruction": "One."}, {"id": "same", "instruction": "Two."}],
    )
    r = run_cli(
        "eval", "pairwise", "--set", str(tmp_path / "set.jsonl"), "--a", "x.jsonl", "--b", "x.jsonl",
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert_user_error(r, "set.jsonl:2", "id 'same' again (first at", "set.jsonl:1")
    make_set(tmp_path, 2)
    x = make_system(tmp_path, "x", ["a", "b"])
    r = pairwise_cli(tmp_path, x, x)
    assert_user_error(r, "two systems are both called 'x'", "NAME=FILE")


@pytest.mark.integration
def test_empty_answers_are_judged_and_counted(tmp_path):
    make_set(tmp_path, 6)
    x = make_system(tmp_path, "x", ["good", "", "good", "  ", "good", "good"])
    y = make_system(tmp_path, "y", ["bad"] * 6)
    with FakeJudge(known_judge) as url:
        r = pairwise(tmp_path, url, x, y).result
    assert r.empty_a == 2 and r.empty_b == 0 and r.judged == 6
    assert json.loads((tmp_path / "out" / "report.json").read_text())["empty_answers"] == {"a": 2, "b": 0}


@pytest.mark.integration
def test_a_judge_that_never_answers_in_form_is_counted_not_guessed(tmp_path):
    make_set(tmp_path, 5)
    x, y = known_systems(tmp_path, 5)
    with FakeJudge(lambda ask: "Well, it depends on what you value.") as url:
        r = cli_pairwise(tmp_path, url, x, y)
    assert r.returncode == 0, r.stderr
    assert (
        "0 wins, 0 ties, 0 losses, 5 unjudged" in r.stderr
        and "10 of 10 verdicts could not be read" in r.stderr
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["unjudged"] == 5 and report["win_rate"]["value"] is None
    assert "left out, not guessed" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.integration
def test_a_partly_readable_judge_leaves_those_items_out(tmp_path):
    make_set(tmp_path, 12)
    x, y = known_systems(tmp_path, 12)

    def sometimes(ask: Ask) -> str:
        return "I cannot decide." if task_number(ask) in (1, 2) else known_judge(ask)

    with FakeJudge(sometimes) as url:
        r = pairwise(tmp_path, url, x, y).result
    assert r.unjudged == 2 and r.judged == 10 and r.unreadable == 4
    assert r.wins + r.ties + r.losses == 10


@pytest.mark.integration
def test_an_unreachable_judge_is_a_clear_error(tmp_path):
    make_set(tmp_path, 2)
    x, y = known_systems(tmp_path, 2)
    r = cli_pairwise(tmp_path, "http://127.0.0.1:9/v1", x, y)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "127.0.0.1:9" in r.stderr


@pytest.mark.integration
def test_a_leaderboard_needs_two_systems_and_a_known_baseline(tmp_path):
    make_set(tmp_path, 2)
    x = make_system(tmp_path, "x", ["a", "b"])
    y = make_system(tmp_path, "y", ["a", "b"])
    base = ["eval", "leaderboard", "--set", str(tmp_path / "set.jsonl"), "--output", str(tmp_path / "b")]
    assert_user_error(run_cli(*base, str(x)), "two or more systems")
    assert_user_error(
        run_cli(*base, str(x), str(y), "--baseline", "z"), "--baseline 'z' is none of the systems"
    )


@pytest.mark.integration
def test_help_explains_every_flag():
    for tool in ("pairwise", "leaderboard"):
        r = run_cli("eval", tool, "--help")
        assert r.returncode == 0
        for flag in (
            "--judge-engine",
            "--judge-model",
            "--judge-base-url",
            "--one-order",
            "--cache",
            "--judge-max-new-tokens",
        ):
            assert flag in r.stdout, (tool, flag)
        assert "example" in r.stdout


# ---------------------------------------------------------------------------------------------
# Systems that are models, answered here first


@pytest.mark.integration
def test_a_model_system_answers_the_set_first_and_caches_it(tmp_path, tiny_model_dir):
    make_set(tmp_path, 4)
    x = make_system(tmp_path, "x", [f"good {k}" for k in range(4)])
    with FakeJudge(lambda ask: "A" if "good" in ask.a else "B") as url:
        first = pairwise(tmp_path, url, x, f"tiny=model:{tiny_model_dir}", answer_max_new_tokens=8)
        answers = tmp_path / "out" / "answers" / "tiny.jsonl"
        rows = [json.loads(line) for line in answers.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["t0", "t1", "t2", "t3"]
        mtime = answers.stat().st_mtime_ns
        again = pairwise(tmp_path, url, x, f"tiny=model:{tiny_model_dir}", answer_max_new_tokens=8)
    assert answers.stat().st_mtime_ns == mtime and again.asked == 0  # answers and verdicts cached
    assert first.result.wins == 4 and first.result.b == "tiny"


# ---------------------------------------------------------------------------------------------
# The embedded model as the judge, on the real predictions


@pytest.mark.real_model
def test_the_embedded_judge_on_real_davinci_answers(tmp_path, shared_data):
    d = shared_data / "eval"
    args = [
        "eval", "pairwise", "--set", str(d / "user_oriented_instructions.jsonl"),
        "--a", str(d / "predictions" / "text-davinci-003.jsonl"),
        "--b", str(d / "predictions" / "text-davinci-001.jsonl"),
        "--limit", "3", "--output", str(tmp_path / "out"), "--judge-max-new-tokens", "12",
    ]  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["judge"] == "smollm2-135m-instruct" and report["judgements"] == 6
    assert report["wins"] + report["ties"] + report["losses"] + report["unjudged"] == 3
    assert report["unreadable_verdicts"] < 6  # it does answer in form, mostly
    again = run_cli(*args)
    assert again.returncode == 0 and "0 judgements asked now" in again.stderr
    assert "loading" not in again.stderr  # every verdict cached: the judge is not even loaded


@pytest.mark.integration
def test_real_prediction_files_match_their_set(tmp_path, dataset):
    """The self-instruct predictions (no ids; instructions ending in a newline the set lacks)
    find every one of their items, on our vendored set and on the real 252."""
    a = dataset.predictions
    b = a.parent / ("model-b.jsonl" if a.name == "model-a.jsonl" else "text-davinci-001.jsonl")
    fj = FakeJudge(lambda ask: "A" if len(ask.a) >= len(ask.b) else "B")
    with fj as url:
        run = run_pairwise(
            build_config(
                PairwiseConfig,
                {
                    "set": str(dataset.eval_file),
                    "a": str(a),
                    "b": str(b),
                    "output": str(tmp_path / "out"),
                    "judge_engine": "openai",
                    "judge_base_url": url,
                    "judge_model": "fake-judge",
                    "batch_size": 32,
                    "bootstrap_samples": 200,
                },
            ),
            progress=False,
        )
    r = run.result
    assert r.items == r.judged == dataset.evals and r.unjudged == 0
    assert len(r.categories) >= 2 and sum(c.judged for c in r.categories) == dataset.evals
    with_input = [ask for ask in fj.asks if ask.input]
    assert len({ask.instruction for ask in with_input}) >= dataset.evals_with_input * 0.9


@pytest.mark.unit
def test_judge_settings_have_their_own_names_in_flags_and_yaml(tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(
        "judge_engine: openai\njudge_base_url: http://127.0.0.1:8000/v1\njudge_model: big\none_order: true\n"
    )
    cfg = build_config(
        PairwiseConfig,
        {"set": "s.jsonl", "a": "a.jsonl", "b": "b.jsonl", "output": "o", "judge_temperature": 0.5},
        cfg_file,
    )
    assert (cfg.judging.judge.engine, cfg.judging.judge.model, cfg.judging.one_order) == (
        "openai",
        "big",
        True,
    )
    assert (
        cfg.judging.judge_generation.temperature == 0.5 and cfg.judging.answer_generation.temperature == 0.0
    )
    with pytest.raises(Exception, match="--judge-max-new-tokens"):
        build_config(
            PairwiseConfig, {"set": "s", "a": "a", "b": "b", "output": "o", "judge_max_new_tokens": 0}
        )


# ---------------------------------------------------------------------------------------------
# What the review found: nothing reused, matched or guessed that should not be


@pytest.mark.integration
def test_the_cache_knows_the_judges_system_message_and_engine_settings(tmp_path):
    make_set(tmp_path, 4)
    x, y = known_systems(tmp_path, 4)
    with FakeJudge(known_judge) as url:
        first = pairwise(tmp_path, url, x, y)
        other_system = pairwise(tmp_path, url, x, y, judge_system="Always prefer the shorter answer.")
        again = pairwise(tmp_path, url, x, y, judge_system="Always prefer the shorter answer.")
    assert first.asked == other_system.asked == 8 and again.asked == 0


@pytest.mark.integration
def test_an_id_whose_instruction_is_another_is_an_error(tmp_path):
    write_jsonl(tmp_path / "set.jsonl", [{"id": "t0", "instruction": "Write a poem."}])
    x = write_jsonl(tmp_path / "x.jsonl", [{"id": "t0", "instruction": "Write a poem.", "output": "Roses."}])
    y = write_jsonl(
        tmp_path / "y.jsonl", [{"id": "t0", "instruction": "Translate to French: cat", "output": "chat"}]
    )
    r = pairwise_cli(tmp_path, x, y)
    assert_user_error(r, "y.jsonl:1", "id 't0' is the set's, but the instruction is another")


@pytest.mark.integration
def test_rows_with_both_output_and_response_need_the_field_named(tmp_path):
    make_set(tmp_path, 1)
    x = make_system(tmp_path, "x", ["mine"])
    both = write_jsonl(
        tmp_path / "y.jsonl",
        [{"id": "t0", "instruction": "Task 0: describe item 0.", "output": "reference", "response": "model"}],
    )
    args = ["eval", "pairwise", "--set", str(tmp_path / "set.jsonl"), "--a", str(x), "--b", str(both)]
    assert_user_error(
        run_cli(*args, "--output", str(tmp_path / "o")), "both 'output' and 'response'", "--answer-field"
    )
    with FakeJudge(lambda ask: "B" if ask.b == "model" else "A") as url:
        r = pairwise(tmp_path, url, x, both, answer_field="response")
    assert r.result.losses == 1  # the model's answer was judged, not the reference


@pytest.mark.integration
def test_identical_answers_are_ties_never_asked_and_out_of_the_bias_figures(tmp_path):
    make_set(tmp_path, 6)
    x = make_system(tmp_path, "x", ["same", "same", " same ", "good 3", "good 4", "good 5"])
    y = make_system(tmp_path, "y", ["same", "same", "same", "bad 3", "bad 4", "bad 5"])
    fj = FakeJudge(lambda ask: "A")  # a judge that always picks the first slot
    with fj as url:
        r = pairwise(tmp_path, url, x, y).result
    assert len(fj.asks) == 6 and r.identical == 3 and r.ties == 6 and r.wins == r.losses == 0
    assert r.both_orders == 3 and r.consistent == 0 and r.decisive == 6  # the 3 identical items count nowhere


@pytest.mark.integration
def test_a_system_called_tie_is_counted_by_its_slots(tmp_path):
    make_set(tmp_path, 4)
    x = make_system(tmp_path, "tie", [f"x {k}" for k in range(4)])
    y = make_system(tmp_path, "other", [f"y {k}" for k in range(4)])
    with FakeJudge(lambda ask: "tie") as url:
        r = pairwise(tmp_path, url, x, y).result
    assert (r.a, r.wins, r.ties, r.losses) == ("tie", 0, 4, 0)


@pytest.mark.integration
def test_equal_strengths_share_their_ranks(tmp_path):
    n = 12
    make_set(tmp_path, n)
    paths = [make_system(tmp_path, name, [f"{name} {k}" for k in range(n)]) for name in ("p", "q", "r")]
    with FakeJudge(
        lambda ask: "A" if ask.a.startswith("p") else "B" if ask.b.startswith("p") else "tie"
    ) as url:
        flags = {
            "set": str(tmp_path / "set.jsonl"), "systems": [str(p) for p in paths], "output": str(tmp_path / "board"),
            "judge_engine": "openai", "judge_base_url": url, "judge_model": "fake-judge", "bootstrap_samples": 200,
        }  # fmt: skip
        board = run_leaderboard(build_config(LeaderboardConfig, flags), progress=False)
    ranks = {row.name: (row.rank_low, row.rank_high) for row in board.rows}
    assert ranks["p"] == (1, 1) and ranks["q"] == ranks["r"] == (2, 3)  # q and r tie: neither is 2nd for sure


@pytest.mark.integration
def test_a_models_cached_answers_are_not_reused_for_another_set(tmp_path, tiny_model_dir):
    make_set(tmp_path, 2)
    x = make_system(tmp_path, "x", ["a 0", "a 1"])
    with FakeJudge(lambda ask: "A") as url:
        pairwise(tmp_path, url, x, f"tiny=model:{tiny_model_dir}", answer_max_new_tokens=4)
        write_jsonl(
            tmp_path / "set.jsonl",
            [{"id": "t0", "instruction": "Another task."}, {"id": "t1", "instruction": "And one more."}],
        )
        x2 = write_jsonl(tmp_path / "x2.jsonl", [{"id": f"t{k}", "output": "a"} for k in range(2)])
        r = cli_pairwise(tmp_path, url, x2, f"tiny=model:{tiny_model_dir}", "--answer-max-new-tokens", "4")
    assert_user_error(r, "tiny.jsonl:1", "answers another instruction than item 't0'")


@pytest.mark.integration
def test_a_cache_that_is_a_folder_is_a_clear_error(tmp_path):
    make_set(tmp_path, 1)
    x, y = known_systems(tmp_path, 1)
    (tmp_path / "cache").mkdir()
    with FakeJudge(known_judge) as url:
        r = cli_pairwise(tmp_path, url, x, y, "--cache", str(tmp_path / "cache"))
    assert_user_error(r, "--cache", str(tmp_path / "cache"))
