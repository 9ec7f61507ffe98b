"""`alpaca-forge run` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_command, say
from .config import RunConfig

DESCRIPTION = """\
Run a recipe: seed tasks -> generated data -> cleaned data -> a fine-tuned model -> answers before
and after -> a blind pairwise evaluation -> a GGUF export, in one run directory, with a cost
forecast, a provenance manifest (versions, hashes, licences, tokens, cost, time per stage) and one
self-contained HTML report. Each stage is configured exactly as its own command (same keys as its
flags); the recipe joins the stages. A stage whose settings and inputs are unchanged is skipped;
a killed run resumes where it stopped; --from STAGE reruns that stage and all after it.

examples:
  alpaca-forge run recipes/demo.yaml --dry-run   # every problem, the plan and the cost, nothing run
  alpaca-forge run recipes/demo.yaml             # the embedded model as teacher, student and judge
  alpaca-forge run recipes/demo.yaml --from train   # retrain and redo what follows
  alpaca-forge run recipes/demo.yaml --set stages.train.epochs=1   # one change, the file untouched"""


def register(sub: Any) -> None:
    add_command(
        sub,
        "run",
        "run a recipe: generate -> data -> train -> infer -> eval -> export, one report",
        DESCRIPTION,
        RunConfig,
        _main,
    )


def _main(config: RunConfig, args: Any) -> int:
    from .runner import run

    r = run(config, progress=not args.quiet)
    if r.dry_run:
        print(f"plan for {r.recipe} (run directory {r.run_dir}):")
        print("\n".join(r.plan_lines()))
        print("cost forecast:")
        print("\n".join(f"  {line}" for line in r.forecast.lines()))
        for note in r.notes:
            print(f"note: {note}")
        return 0
    print("\n".join(r.plan_lines()))
    say("run: %s finished in %.0f s; manifest %s", r.recipe, r.wall_s, r.manifest)
    print(f"report: {r.report}")
    return 0
