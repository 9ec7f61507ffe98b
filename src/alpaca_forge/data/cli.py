"""`alpaca-forge data TOOL` on the command line: one subcommand per tool, flags from its config."""

from __future__ import annotations

import sys
from typing import Any

from ..core.cli import add_tool_group, say
from . import config as c
from .tools import CHECK_NAMES

CHECKS = ", ".join(CHECK_NAMES)

TOOLS = [
    (
        "validate",
        "check every record; report every problem with file, line and field",
        """\
Check every record (instruction, input, output) and report every problem at once, with file,
line (or array index) and field, and a fix. Exit status 2 if any.

example:
  alpaca-forge data validate alpaca_data.json more.jsonl""",
        c.ValidateConfig,
    ),
    (
        "stats",
        "counts, share with input, length histograms (PNG)",
        """\
Print counts, the share of records with an input, word-length summaries and the most common
first words (of conversations: how many, turns per conversation, the share with a system
message; their instruction and output are the last user turn and its reply), and write them as
JSON (--json); then draw length histograms as a PNG (needs
matplotlib: without it the default picture is skipped, and an explicit --plot is an error).

example:
  alpaca-forge data stats data.jsonl --plot data.lengths.png --json data.stats.json""",
        c.StatsConfig,
    ),
    (
        "quality",
        "report likely problems: refusals, truncation, leftovers, duplicates ...",
        f"""\
Run every quality check ({CHECKS}) and report counts and examples.

example:
  alpaca-forge data quality data.jsonl --report quality.json""",
        c.QualityConfig,
    ),
    (
        "clean",
        "remove what `quality` flags (checks configurable)",
        """\
Remove every record flagged by the chosen quality checks (only those run: near_duplicate, the
costly one, only when chosen: it compares instructions, a conversation's user turns joined);
the removed ones are written beside the output with the checks that flagged them. Of a
conversation, refusal looks at every assistant turn.

example:
  alpaca-forge data clean data.jsonl --output clean.jsonl --checks refusal,empty_output,near_duplicate""",
        c.CleanConfig,
    ),
    (
        "dedupe",
        "drop near-duplicates by ROUGE-L (exact, greedy in file order)",
        """\
Keep each record unless its ROUGE-L F1 with an earlier kept record is above the threshold
(self-instruct's filter; scores identical to the rouge-score package). Of a conversation, --key
instruction compares all its user turns joined, --key output all its assistant turns. Writes the
kept records, and the dropped ones with the record each collided with.

example:
  alpaca-forge data dedupe data.jsonl --output data.dedup.jsonl --threshold 0.7""",
        c.DedupeConfig,
    ),
    (
        "split",
        "seeded train/validation split",
        """\
Split a dataset into DIR/train.jsonl and DIR/val.jsonl, at random but seeded; both keep the
file's order. The same split as `train --val-size` makes for the same seed and size.

example:
  alpaca-forge data split data.jsonl --output-dir splits --val-size 0.05""",
        c.SplitConfig,
    ),
    (
        "convert",
        "Alpaca <-> OpenAI messages <-> ShareGPT <-> seed-task format",
        """\
Rewrite a dataset in another format. Input may be Alpaca records, conversations (OpenAI
`messages` or ShareGPT `conversations`, system message and several turns kept), or
seed/evaluation tasks; output is the --to format. A conversation of several exchanges, or with
a system message, has no alpaca or seed form: every such record is named (file:line) and
nothing is written.

examples:
  alpaca-forge data convert alpaca_data.json --to messages --output chat.jsonl
  alpaca-forge data convert sharegpt.json --to messages --output chat.jsonl""",
        c.ConvertConfig,
    ),
    (
        "score",
        "a judge rates every record: accuracy and helpfulness, 1-5 (AlpaGasus-style); cached, resumable",
        """\
Ask a judge (any engine: a server, a local model, or a rule judge for offline demos) to rate each
record's output for accuracy and helpfulness, 1 to 5, with our rubric. Writes every row as read
plus "score": {accuracy, helpfulness, overall (their mean), judge} ("score": null where the reply
held no readable rating after --retries), and draws the score histograms. Replies are cached
(append-only, beside the output): a rerun asks nothing, and a killed run resumes where it stopped.
A server judge is kept --judge-batch-size requests in flight. Then keep the best with
`data clean SCORED --min-score 4.5 --checks none`. Rule judges: rule:longer rates long outputs
high, rule:shorter short ones (1 for an empty output): lengths, not quality. The embedded 135M
model does not follow the rubric (its replies hold no rating): rate with a capable model.

examples:
  alpaca-forge data score data.jsonl --output scored.jsonl --judge-engine openai \\
      --judge-base-url http://127.0.0.1:8000/v1 --judge-model my-judge --judge-batch-size 32
  alpaca-forge data score data.jsonl --output scored.jsonl --judge-model rule:longer""",
        c.ScoreConfig,
    ),
    (
        "decontaminate",
        "drop training records that overlap an evaluation set (shared 13-gram, or ROUGE-L F1 > 0.7)",
        """\
Drop every training record whose text (instruction and input, by default) overlaps an item of
an evaluation set: a shared run of --ngram words (13: GPT-3's test; items shorter than that are
left to ROUGE-L), or a ROUGE-L F1 above --threshold (0.7), computed exactly as rouge-score does.
Words are ROUGE-L's: lower-case letters and digits. Writes the kept records, and the dropped ones
(OUTPUT's name + .dropped.jsonl) each with the evaluation item it matched (file, line, id), the
method, the ROUGE-L F1 and the shared words. A conversation is checked turn by turn: it goes
when any of its user turns overlaps.

example:
  alpaca-forge data decontaminate train.jsonl --against eval.jsonl --against more-eval.jsonl \\
      --output train.clean.jsonl""",
        c.DecontaminateConfig,
    ),
    (
        "tokenize",
        "write the exact input_ids and labels training will use; --show prints masked vs trained",
        """\
Tokenise records exactly as `train` does (prompt format, masking, truncation that keeps the EOS)
and write one JSON line per example, in input order, with input_ids and labels (-100 = masked,
not learnt; a conversation learns its assistant turns, see --assistant-turns). --show N prints
N examples with masked text dimmed (or in ⟦brackets⟧ when not a terminal) and trained text
bright, to check masking before paying for GPUs.

example:
  alpaca-forge data tokenize --model smollm2-135m-instruct train.jsonl --output ids.jsonl --show 2""",
        c.TokenizeConfig,
    ),
]


def register(sub: Any) -> None:
    names = ", ".join(name for name, *_ in TOOLS)
    add_tool_group(
        sub,
        "data",
        f"tools over Alpaca datasets: {names}",
        "Tools over Alpaca datasets (.json array or .jsonl, .gz too). Run `alpaca-forge data TOOL --help`.",
        TOOLS,
        HANDLERS,
    )


def _validate(config: c.ValidateConfig, args: Any) -> int:
    from .runner import run_validate

    for path, count in run_validate(config).records.items():
        print(f"{path}: {count} records, all valid")
    return 0


def _stats(config: c.StatsConfig, args: Any) -> int:
    from .runner import run_stats

    r = run_stats(config, echo=print)
    if r.json_path:
        say("numbers: %s", r.json_path)
    if r.plot:
        say("histograms: %s", r.plot)
    else:
        say("histograms skipped: matplotlib is not installed (pip install 'alpaca-forge[plot]')")
    return 0


def _quality(config: c.QualityConfig, args: Any) -> int:
    from .runner import run_quality

    r = run_quality(config, progress=not args.quiet)
    print(f"{r.report['records']} records checked")
    for name, found in r.report["checks"].items():
        print(f"  {name:<20} {found['count']:>7}")
        for ex in found["examples"]:
            snippet = _snippet(ex).replace("\n", " ")[:110]
            print(f"      [{ex['index']}] {snippet}")
    if r.report_path:
        say("report: %s", r.report_path)
    return 0


def _snippet(row: dict[str, Any]) -> str:
    """A record row as one line: instruction -> output (a conversation's: its turns, in order)."""
    if "messages" in row:
        return " -> ".join(m["content"] for m in row["messages"] if m["role"] != "system")
    return row["instruction"] + " -> " + row["output"]


def _clean(config: c.CleanConfig, args: Any) -> int:
    from .runner import run_clean

    r = run_clean(config, progress=not args.quiet)
    say(
        "kept %d of %d records -> %s; %d removed -> %s",
        r.kept,
        r.kept + r.removed,
        r.output,
        r.removed,
        r.removed_path,
    )
    return 0


def _dedupe(config: c.DedupeConfig, args: Any) -> int:
    from .runner import run_dedupe

    r = run_dedupe(config, progress=not args.quiet)
    say(
        "kept %d of %d records (%d dropped, ROUGE-L F1 > %s on %s) in %.1f s",
        r.kept,
        r.records,
        r.dropped,
        config.threshold,
        config.key,
        r.elapsed_s,
    )
    say("kept: %s; dropped, each with its duplicate: %s", r.output, r.dropped_path)
    return 0


def _split(config: c.SplitConfig, args: Any) -> int:
    from .runner import run_split

    r = run_split(config)
    say("%d training records -> %s; %d validation records -> %s", r.train, r.train_path, r.val, r.val_path)
    return 0


def _convert(config: c.ConvertConfig, args: Any) -> int:
    from .runner import run_convert

    r = run_convert(config)
    say("%d records -> %s (%s format)", r.records, r.output, config.to)
    return 0


def _tokenize(config: c.TokenizeConfig, args: Any) -> int:
    from .runner import run_tokenize

    r = run_tokenize(config, color=sys.stdout.isatty())
    for text in r.shown:
        print(text)
    say("%s (format: %s)%s", r.summary, r.format, f"; written to {r.output}" if r.output else "")
    return 0


def _score(config: c.ScoreConfig, args: Any) -> int:
    from .score import run_score

    r = run_score(config, progress=not args.quiet)
    mean = f"{r.mean_overall:.2f}" if r.mean_overall is not None else "-"
    say(
        "%d of %d records rated by %s (%d asked now, %d from the cache); mean overall %s",
        r.rated,
        r.records,
        r.judge,
        r.asked,
        r.cached,
        mean,
    )
    if r.unreadable:
        say("%d records left unrated (no readable rating after the retries): \"score\": null", r.unreadable)
    print("overall  records  kept by --min-score at it")
    for value, count in r.overall_counts.items():
        print(f"{value:>7}  {count:>7}  {r.kept_at(value):>7}")
    say("judge tokens: %d prompt + %d completion", r.prompt_tokens, r.completion_tokens)
    say("scored: %s; cache: %s", r.output, r.cache)
    if r.plot:
        say("histograms: %s", r.plot)
    else:
        say("histograms skipped: matplotlib is not installed (pip install 'alpaca-forge[plot]')")
    return 0


def _decontaminate(config: c.DecontaminateConfig, args: Any) -> int:
    from .decontaminate import run_decontaminate

    r = run_decontaminate(config)
    against = ", ".join(f"{path} ({n} items)" for path, n in r.against.items())
    say("kept %d of %d records; %d dropped for overlapping %s", r.kept, r.records, r.dropped, against)
    if r.dropped:
        methods = ", ".join(f"{name}: {n}" for name, n in sorted(r.by_method.items()))
        say("by method: %s; %d evaluation items matched", methods, r.matched_items)
    say("checked in %.1f s; kept: %s; dropped, each with its match: %s", r.elapsed_s, r.output, r.dropped_path)
    return 0


HANDLERS = {
    "validate": _validate,
    "stats": _stats,
    "quality": _quality,
    "clean": _clean,
    "dedupe": _dedupe,
    "split": _split,
    "convert": _convert,
    "tokenize": _tokenize,
    "score": _score,
    "decontaminate": _decontaminate,
}
