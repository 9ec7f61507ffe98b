"""The demo recipe end to end: `alpaca-forge run recipes/demo.yaml`, timed per stage, and what it made.

    .venv/bin/python bench/bench_demo.py [--recipe recipes/demo.yaml] [--out bench/results/demo.json]

The recipe is copied with its run directory moved into a temporary folder (so no earlier run is
resumed or skipped), run once as a subprocess, then run again with nothing changed (every stage
skipped: the cost of checking). The figures come from the run's own manifest.json (wall time per
stage) and state.json (each stage's figures): records accepted, training steps and tok/s, the
answers, the judge's verdicts, the GGUF's size, parity and llama.cpp decode speed. About 7 minutes
on 2 cores, the GGUF → dense cache of the embedded model already on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from machine import describe, write_results

REPO = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "alpaca-forge"


def run_recipe(recipe: Path) -> float:
    """One `alpaca-forge run` in a subprocess; its wall time."""
    start = time.perf_counter()
    p = subprocess.run(
        [str(CLI), "run", str(recipe)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"alpaca-forge run {recipe} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return elapsed


def figures(run_dir: Path) -> dict:
    """What the README says about a run, from its manifest.json and state.json."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = json.loads((run_dir / "state.json").read_text())["stages"]
    f = {name: s.get("figures", {}) for name, s in stages.items()}
    summary = f["train"]["summary"]
    report = f["eval"]["report"]
    gguf = f["export"]["gguf"]
    return {
        "stage_s": {name: s["wall_s"] for name, s in manifest["stages"].items()},
        "generate": {"requests": f["generate"]["requests"], "accepted": f["generate"]["accepted"]},
        "data": {"records": f["data"]["records"]},
        "train": {
            "method": summary["config"]["method"],
            "steps": summary["steps"],
            "tokens_per_s": summary["steady_tokens_per_s"],
            "first_loss": summary["first_loss"],
            "last_loss": summary["last_loss"],
        },
        "infer": {"before": f["infer"]["before"]["answers"], "after": f["infer"]["after"]["answers"]},
        "eval": {
            "items": report["items"],
            "judgements": report["judgements"],
            "unreadable": report["unreadable_verdicts"],
            "position_consistency": report["position_consistency"],
            "wins": report["wins"],
            "ties": report["ties"],
            "losses": report["losses"],
            # the report's a is the fine-tuned model, b the base
            "empty_tuned": report["empty_answers"][0],
            "empty_base": report["empty_answers"][1],
        },
        "export": {
            "quant": gguf["quant"],
            "file_mb": round(gguf["bytes"] / 1e6, 1),
            "source_mb": round(f["export"]["source_bytes"] / 1e6, 1),
            "top1_last": gguf["parity"]["top1_last"],
            "top1_all": gguf["parity"]["top1_all"],
            "tok_s": f["export"]["speed"]["tokens_per_s"],
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml", help="the recipe to run")
    ap.add_argument("--out", default="bench/results/demo.json", help="where the numbers go")
    args = ap.parse_args()
    args.recipe = args.recipe.resolve()

    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        recipe = yaml.safe_load(args.recipe.read_text())
        recipe["run_dir"] = str(Path(tmp) / "run")
        copy = Path(tmp) / args.recipe.name
        copy.write_text(yaml.safe_dump(recipe, sort_keys=False))
        wall = run_recipe(copy)
        rerun = run_recipe(copy)
        result = {
            "machine": describe(),
            "recipe": str(args.recipe.relative_to(REPO) if args.recipe.is_relative_to(REPO) else args.recipe),
            "wall_s": round(wall, 1),
            "rerun_s": round(rerun, 1),
            **figures(Path(recipe["run_dir"])),
        }
    print(json.dumps(result, indent=2))
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
