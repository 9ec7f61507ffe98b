"""`alpaca-forge eval rate` on the command line (listed by eval/cli.py)."""

from __future__ import annotations

from typing import Any

from ...core.cli import say
from .config import RateConfig

TOOL = (
    "rate",
    "a blind rating page for people: A or B or tie, several raters, agreement (Cohen's kappa)",
    """\
Serve a page on which people rate two systems' answers blind: the instruction (and input), then
the two answers as Response A and Response B in a random order per rater, without the systems'
names. Keys 1/A, 2/T and 3/B (or the buttons) choose; U takes the last rating back. Each rater
gives a name and resumes where they stopped, after a reload or a restart: every rating is appended
to OUTPUT/ratings.jsonl at once. Ctrl-C stops the page and writes the report, in the format of
`eval pairwise`: all raters pooled in OUTPUT/, each rater in OUTPUT/raters/NAME/, and
OUTPUT/agreement.md with Cohen's kappa between raters and, with --judge-report, against the LLM judge.

examples:
  alpaca-forge eval rate --set package:demo-eval.jsonl --a tuned=out/after.jsonl --b base=out/before.jsonl \\
      --output out/rate
  # raters on other machines, with kappa against an `eval pairwise` run of the same two systems:
  alpaca-forge eval rate --set package:demo-eval.jsonl --a tuned=out/after.jsonl --b base=out/before.jsonl \\
      --output out/rate --host 0.0.0.0 --judge-report out/eval
  alpaca-forge eval rate --set package:demo-eval.jsonl --a tuned=out/after.jsonl --b base=out/before.jsonl \\
      --output out/rate --report-only                 # the report of the ratings so far""",
    RateConfig,
)


def handle(config: RateConfig, args: Any) -> int:
    from .runner import run_rate

    run = run_rate(config)
    report = run.report
    if run.url is not None:
        say("%d rating%s recorded in this session", run.recorded, "" if run.recorded == 1 else "s")
    if report is None:
        return 0
    r = report.pooled
    say(
        "%s vs %s, rated by %d people: %d wins, %d ties, %d losses on %d of %d items",
        r.a, r.b, len(report.raters), r.wins, r.ties, r.losses, r.judged, r.items,
    )  # fmt: skip
    if r.win_rate.value is not None:
        say("win rate %.1f%% [%.1f, %.1f]; sign test p = %.3g", 100 * r.win_rate.value,
            100 * r.win_rate.low, 100 * r.win_rate.high, r.sign_test_p)  # fmt: skip
    for k in (*report.between_raters, *report.with_judge):
        shown = "n/a" if k.kappa is None else f"{k.kappa:.2f}"
        say("kappa %s / %s: %s on %d items", k.first, k.second, shown, k.items)
    say("report in %s (agreement: %s)", report.output / "report.md", report.output / "agreement.md")
    return 0
