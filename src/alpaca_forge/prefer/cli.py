"""`alpaca-forge prefer` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_command, say
from .config import PreferConfig

DESCRIPTION = """\
Make preference pairs the AlpacaFarm way: sample K answers to every instruction from a model
(seeded, so reruns sample the same), have a judge compare every two distinct answers of an item in
both orders (optionally with several prompt wordings, and label noise with --flip-rate), and write
the pairs whose verdicts agree as TRL's prompt/chosen/rejected rows, ready for
`alpaca-forge train --method dpo|orpo|kto|simpo|reward`. Ties and order-inconsistent pairs are
dropped and counted. Answers and verdicts are cached beside the output: a killed run resumes and
asks nothing twice. --from-ratings turns people's `eval rate` verdicts into pairs the same way;
--expert-iteration writes each instruction's best answer as an SFT record instead.

examples:
  alpaca-forge prefer --model runs/my-alpaca --input package:demo-seeds.jsonl --samples 4 \\
      --judge-engine openai --judge-base-url http://gpu-host:8000/v1 --judge-model qwen2.5-72b-instruct \\
      --output out/pairs.jsonl
  # AlpacaFarm's simulated annotators: 4 prompt wordings, a quarter of the labels flipped:
  alpaca-forge prefer --model runs/my-alpaca --input package:demo-seeds.jsonl --judge-engine llamacpp \\
      --annotators 4 --flip-rate 0.25 --output out/pairs-strong.jsonl
  # people's verdicts from an `eval rate` folder:
  alpaca-forge prefer --from-ratings out/rate --input package:demo-eval.jsonl \\
      --a tuned=out/after.jsonl --b base=out/before.jsonl --output out/human-pairs.jsonl
  # expert iteration: the best of 4 answers by a reward model, as SFT records:
  alpaca-forge prefer --model runs/my-alpaca --input package:demo-seeds.jsonl --samples 4 \\
      --expert-iteration --reward-model runs/my-reward --output out/best-of-4-sft.jsonl"""


def register(sub: Any) -> None:
    add_command(
        sub,
        "prefer",
        "preference pairs: a model's sampled answers judged pairwise (or people's ratings)",
        DESCRIPTION,
        PreferConfig,
        _main,
    )


def _main(config: PreferConfig, args: Any) -> int:
    from .runner import run

    r = run(config, progress=not args.quiet)
    s = r.summary
    if s.get("expert_iteration"):
        say(
            "%d SFT records written to %s: the best of %d answers each, chosen by %s",
            r.pairs, r.output, s["samples"], s["chosen_by"],
        )  # fmt: skip
    else:
        dropped = s["dropped"]
        say(
            "%d pairs written to %s (judged by %s); dropped: %d ties, %d order-inconsistent, %d unreadable, "
            "%d identical answers",
            r.pairs, r.output, s["judge"], dropped["tie"], dropped["inconsistent"], dropped["unreadable"],
            dropped["identical"],
        )  # fmt: skip
        if "judgements" in s:
            say(
                "%d answers sampled now (%d cached); %d judgements asked now (%d cached); %d verdicts flipped; "
                "judge cost %d prompt + %d completion tokens",
                s["answers_sampled"], s["answers_cached"], s["judgements_asked"], s["judgements_cached"],
                s["flips"], s["judge_cost"]["prompt_tokens"], s["judge_cost"]["completion_tokens"],
            )  # fmt: skip
    say("%.1f s; summary in %s", s["elapsed_s"], r.summary_path)
    return 0
