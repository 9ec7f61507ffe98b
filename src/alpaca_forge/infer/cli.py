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
      --input package:demo-eval.jsonl --output out/served-after.jsonl --batch-size 32"""


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
    return 0
