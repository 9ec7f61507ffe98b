"""`alpaca-forge generate` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_command, say
from .config import GenerateConfig

DESCRIPTION = """\
Make new instruction records with a teacher model, by one of three methods (--method):

  self-instruct (default, Alpaca's): new tasks from 3 seed tasks a request;
  evol (Evol-Instruct): each --seeds instruction rewritten harder (in depth) or into a new task of
    its domain (in breadth) for --evol-rounds rounds, then answered; failed evolutions are
    eliminated by rule and counted; each record keeps its lineage (parent, round, operation);
  magpie: an aligned model writes the user's queries itself from its chat template's user-turn
    opening (raw completions), then answers them; no seeds; --magpie-turns for conversations.

All three share one request loop: resume after kill -9, --concurrency, --max-cost-usd,
--max-requests, the progress bar, --batch-dir (an OpenAI Batch API file at half price).

Self-instruct: each request shows the teacher 3 seed tasks and
asks for 20 more; as in the original, the stop strings end each reply where task 20 would begin,
so a reply yields at most 16 new tasks (4 to 19). Candidates are parsed, filtered (length,
blacklist, prefixes, first character) and dropped when their ROUGE-L F1 with any seed or accepted
instruction is above 0.7. Records are appended and flushed one by one: kill the run at any moment
and run the same command again to resume. A summary (accepted, drops per filter, tokens, cost) is
printed and written next to the output. Exit status 1 when the teacher stops yielding records.

The teacher's defaults depend on where it runs. A server (--engine openai) gets Alpaca's: up to
3072 tokens at temperature 1.0. A model in this process gets 768 tokens at 0.7: given Alpaca's, a
135M model rambles for minutes inside its first task and its text falls apart. With no --engine,
a .gguf or built-in model runs in llama.cpp when llama-cpp-python is installed, else in
transformers (a line on stderr says so). Explicit flags always win; the summary records the
values used.

examples:
  # offline, the embedded model as teacher in llama.cpp (~1.4 records a request, messy but real):
  alpaca-forge generate --seeds package:demo-seeds.jsonl --output data/gen.jsonl --num-instructions 24
  # any OpenAI-compatible server, 32 requests in flight, priced:
  alpaca-forge generate --seeds seed_tasks.jsonl --output data/alpaca-52k.jsonl --num-instructions 52000 \\
      --engine openai --base-url https://api.openai.com/v1 --model gpt-4o-mini --concurrency 32 \\
      --price-prompt-per-1m 0.15 --price-completion-per-1m 0.60 --max-cost-usd 50
  # Evol-Instruct: 3 rounds of rewrites of the seed tasks by a server teacher
  alpaca-forge generate --method evol --seeds package:demo-seeds.jsonl --output data/evol.jsonl \
      --num-instructions 500 --evol-rounds 3 --engine openai --base-url https://api.openai.com/v1 \
      --model gpt-4o-mini --concurrency 32
  # Magpie: the embedded model asks and answers (~30 s a conversation on 2 cores)
  alpaca-forge generate --method magpie --output data/magpie.jsonl --num-instructions 4
  # the self-instruct server run as one OpenAI Batch API job at half price: writes batch/gen/requests.jsonl and exits 3;
  # submit it, put its output file in batch/gen/results/, then rerun the same command:
  alpaca-forge generate --seeds seed_tasks.jsonl --output data/gen.jsonl --num-instructions 5000 \\
      --engine openai --model gpt-4o-mini --batch-dir batch/gen --max-requests 4000 \\
      --price-prompt-per-1m 0.15 --price-completion-per-1m 0.60"""


def register(sub: Any) -> None:
    add_command(
        sub,
        "generate",
        "new instruction records from a teacher: self-instruct, Evol-Instruct or Magpie",
        DESCRIPTION,
        GenerateConfig,
        _main,
    )


def _main(config: GenerateConfig, args: Any) -> int:
    from .runner import run

    r = run(config, progress=not args.quiet)
    say(
        "%s: %d of %d accepted (%d this run) from %d requests (%.2f per request, %d retries) in %.1f s",
        r.stop_detail,
        r.accepted,
        r.target,
        r.accepted_this_run,
        r.requests,
        r.accepted_per_request,
        r.retries,
        r.wall_time_s,
    )
    say("dropped: %s", ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items())) or "none")
    factor = r.teacher_settings.get("price_factor", 1.0)
    say(
        "tokens: %d prompt + %d completion = $%.4f%s; summary: %s",
        r.prompt_tokens,
        r.completion_tokens,
        r.cost_usd,
        f" (batch: {factor:g} x the list price)" if factor != 1.0 else "",
        r.summary_path,
    )
    return 0 if r.stop.as_asked else 1
