"""`alpaca-forge eval pairwise | leaderboard | rate | safety` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_tool_group, say
from . import config as c
from .rate import cli as rate_cli
from .safety import cli as safety_cli

TOOLS = [
    (
        "pairwise",
        "system A against system B, judged blind by an LLM in both orders",
        """\
Compare two systems' answers to every instruction of a set with an LLM judge (any engine). Every
item is judged in both orders (the verdicts must agree, else it is a tie) unless --one-order.
Verdicts are cached (OUTPUT/judgements.jsonl): a rerun is free and a killed run resumes. The
report gives wins/ties/losses, the win rate with a 95% bootstrap interval over items, the exact
sign test, the judge's position consistency and first-slot preference, a length-controlled win
rate, per-category results (Holm-adjusted) and the smallest difference the set can detect.

examples:
  alpaca-forge eval pairwise --set package:demo-eval.jsonl --a tuned=out/after.jsonl --b base=out/before.jsonl \\
      --judge-engine llamacpp --output out/eval
  # a judge on an OpenAI-compatible server, 16 verdicts in flight; a model as system B:
  alpaca-forge eval pairwise --set package:demo-eval.jsonl --a tuned=out/after.jsonl \\
      --b base=model:smollm2-135m-instruct --judge-engine openai --judge-base-url http://gpu-host:8000/v1 \\
      --judge-model qwen2.5-72b-instruct --batch-size 16 --output out/eval-strong-judge""",
        c.PairwiseConfig,
    ),
    (
        "leaderboard",
        "several systems ranked by Bradley–Terry over pairwise judgements",
        """\
Judge every pair of systems (or each against --baseline) on the set and rank them with a
Bradley–Terry model, with 95% bootstrap intervals over items for the strengths and the ranks.
Judgements are cached as in pairwise: share --cache with a pairwise run to reuse its verdicts.

example:
  alpaca-forge eval leaderboard --set package:demo-eval.jsonl out/after.jsonl out/before.jsonl \\
      --baseline before --judge-engine llamacpp --cache out/eval/judgements.jsonl --output out/board""",
        c.LeaderboardConfig,
    ),
    rate_cli.TOOL,
    safety_cli.TOOL,
]


def register(sub: Any) -> None:
    add_tool_group(
        sub,
        "eval",
        "blind pairwise evaluation (LLM judge, people), leaderboard, safety",
        "Evaluate models the way Alpaca was: blind pairwise comparisons on an instruction set, with "
        "intervals and tests. Run `alpaca-forge eval TOOL --help`.",
        TOOLS,
        HANDLERS,
    )


def _pairwise(config: c.PairwiseConfig, args: Any) -> int:
    from .report import interval, percent, power_line
    from .runner import run_pairwise

    run = run_pairwise(config, progress=not args.quiet)
    r = run.result
    lc = r.length_controlled
    say(
        "%s vs %s, judged by %s: %d wins, %d ties, %d losses, %d unjudged",
        r.a,
        r.b,
        r.judge,
        r.wins,
        r.ties,
        r.losses,
        r.unjudged,
    )
    say("win rate %s; sign test p = %.3g", interval(r.win_rate), r.sign_test_p)
    say("length-controlled win rate %s", interval(lc.win_rate) if lc.note is None else f"n/a: {lc.note}")
    if r.both_orders:
        say(
            "position consistency %s of %d items; first-slot preference %s of %d decisive verdicts",
            percent(r.position_consistency), r.both_orders, percent(r.first_slot_rate), r.decisive,
        )  # fmt: skip
    if r.unreadable:
        say(
            "%d of %d verdicts could not be read (the replies are in %s)",
            r.unreadable,
            r.judgements,
            run.cache,
        )
    say(power_line(r))
    if config.show_disagreements:
        by_id = {o.item_id: o for o in r.outcomes}
        name = {"a": r.a, "b": r.b, "tie": "tie"}
        for item_id in r.disagreements:
            first, second = by_id[item_id].winners
            say(
                "disagreed: %s (%s shown first: %s; %s shown first: %s)",
                item_id,
                r.a,
                name[first],
                r.b,
                name[second],
            )
    say(
        "%d judgements asked now, the rest cached; %.1f s; report in %s",
        run.asked,
        run.elapsed_s,
        run.output / "report.md",
    )
    return 0


def _leaderboard(config: c.LeaderboardConfig, args: Any) -> int:
    from .runner import run_leaderboard

    board = run_leaderboard(config, progress=not args.quiet)
    for k, row in enumerate(board.rows, start=1):
        say(
            "%d. %-28s %+.2f [%+.2f, %+.2f]  rank %d-%d",
            k,
            row.name,
            row.strength,
            row.low,
            row.high,
            row.rank_low,
            row.rank_high,
        )
    say(
        "%d judgements asked now; %.1f s; leaderboard in %s",
        board.asked,
        board.elapsed_s,
        board.output / "leaderboard.md",
    )
    return 0


HANDLERS = {
    "pairwise": _pairwise,
    "leaderboard": _leaderboard,
    "rate": rate_cli.handle,
    "safety": safety_cli.handle,
}
