"""`alpaca-forge infer` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_command, say
from .config import InferConfig

DESCRIPTION = """\
Answer every instruction in a file and write one JSON line per answer with the instruction,
input, output, model, prompt format and generation settings. Reads Alpaca records (JSON array or
JSONL), seed tasks and evaluation tasks ({instruction, instances}). Running the same command
again resumes: answers already in --output are skipped.

examples:
  alpaca-forge infer --model runs/my-alpaca --input package:demo-eval.jsonl --output out/after.jsonl
  # on an OpenAI-compatible server (vLLM, TGI, llama.cpp), 32 requests in flight:
  alpaca-forge infer --engine openai --base-url http://gpu-host:8000/v1 --model my-alpaca \\
      --input package:demo-eval.jsonl --output out/served-after.jsonl --batch-size 32
  # the best of 4 samples by a reward model (`train --method reward`), or by a judge:
  alpaca-forge infer --model runs/my-alpaca --input package:demo-eval.jsonl --output out/best-of-4.jsonl \\
      --best-of 4 --temperature 1.0 --reward-model runs/my-reward
  alpaca-forge infer --model runs/my-alpaca --input package:demo-eval.jsonl --output out/best-of-4.jsonl \\
      --best-of 4 --temperature 1.0 --judge-engine openai --judge-base-url http://gpu-host:8000/v1 \\
      --judge-model my-judge"""


def register(sub: Any) -> None:
    add_command(
        sub,
        "infer",
        "answer every instruction of a file (JSONL out, resumable)",
        DESCRIPTION,
        InferConfig,
        _main,
    )


def _main(config: InferConfig, args: Any) -> int:
    from .runner import run

    r = run(config, progress=not args.quiet)
    say(
        "%d answers written to %s (%d were already there); %d tokens in %.1f s (%.1f tok/s)",
        r.written,
        r.output,
        r.already_done,
        r.tokens,
        r.elapsed_s,
        r.tokens_per_s,
    )
    if r.best_of > 1:
        by = config.reward_model or (
            f"the judge ({r.judgements_asked} judgements asked, the rest cached; this run's choices cost "
            f"{r.judge_tokens[0]:,} prompt + {r.judge_tokens[1]:,} completion tokens of the judge)"
        )
        say("each answer is the best of %d samples, chosen by %s", r.best_of, by)
        if r.tied:
            say(
                "%d of %d choices were ties between several best samples (the first of them kept)%s",
                r.tied,
                r.written,
                "" if config.reward_model else "; a judge that always names one position ties every time",
            )
    return 0
