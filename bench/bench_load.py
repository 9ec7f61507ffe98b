"""Loading the embedded SmolLM2 once its dense cache exists, against a bare `from_pretrained` of the
same folder in this process, and a whole command's wall time.

    .venv/bin/python bench/bench_load.py [--rounds 3] [--out bench/results/load.json]

1. Weights: `alpaca_forge.load_model("smollm2-135m-instruct")` (resolve the name, find the GGUF's
   dense copy in the cache, load model and tokenizer, pick dtype and device, read the prompt format)
   vs `AutoModelForCausalLM.from_pretrained(folder)` plus `AutoTokenizer.from_pretrained(folder)` on
   that cached folder: the baseline. One warm-up of each (the files into the page cache), then
   `--rounds` alternating rounds; best of each.
2. The whole command: `alpaca-forge chat --max-new-tokens 1` answering one line on stdin, in a
   subprocess (Python start, imports, load, one token, exit), with the default transformers engine
   and with `--engine llamacpp`; `--rounds` alternating rounds after a warm-up, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from machine import describe, write_results

MODEL = "smollm2-135m-instruct"
CLI = Path(sys.executable).parent / "alpaca-forge"


def dense_folder() -> Path:
    """The embedded GGUF's dense copy in the cache, made now if it is missing (not timed)."""
    from alpaca_forge.core.gguf_cache import dense_gguf
    from alpaca_forge.core.models import resolve_model

    dense = dense_gguf(Path(resolve_model(MODEL).location))
    if dense.folder is None:
        raise SystemExit("the dense cache cannot be written here (ALPACA_FORGE_NO_CACHE?): nothing to time")
    return dense.folder


def ours() -> float:
    from alpaca_forge import load_model

    start = time.perf_counter()
    lm = load_model(MODEL)
    elapsed = time.perf_counter() - start
    del lm
    return elapsed


def bare(folder: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def command(engine: str) -> float:
    argv = [str(CLI), "chat", "--engine", engine, "--max-new-tokens", "1", "--no-stats"]
    start = time.perf_counter()
    p = subprocess.run(argv, input="Hello\n", capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each side, after a warm-up")
    ap.add_argument("--out", default="bench/results/load.json", help="where the numbers go")
    args = ap.parse_args()

    folder = dense_folder()
    ours(), bare(folder)  # warm-up: the files into the page cache, first-import costs
    weights: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(args.rounds):
        weights["ours"].append(ours())
        weights["bare"].append(bare(folder))
    best = {k: min(v) for k, v in weights.items()}
    print(
        f"weights: load_model {best['ours']:.2f} s vs bare from_pretrained {best['bare']:.2f} s "
        f"({best['ours'] / best['bare']:.2f}x); rounds {weights}"
    )

    command("transformers"), command("llamacpp")  # warm-up
    runs: dict[str, list[float]] = {"transformers": [], "llamacpp": []}
    for _ in range(args.rounds):
        for engine in runs:
            runs[engine].append(command(engine))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"alpaca-forge chat, one line, 1 token: {medians['transformers']:.2f} s; "
        f"--engine llamacpp {medians['llamacpp']:.2f} s; rounds {runs}"
    )

    result = {
        "machine": describe(),
        "model": MODEL,
        "weights": {
            "ours_s": round(best["ours"], 3),
            "bare_s": round(best["bare"], 3),
            "ratio": round(best["ours"] / best["bare"], 3),
            "rounds": args.rounds,
            "rounds_s": {k: [round(x, 3) for x in v] for k, v in weights.items()},
        },
        "command": {
            "argv": "alpaca-forge chat --engine ENGINE --max-new-tokens 1 --no-stats < one line",
            "transformers_s": round(medians["transformers"], 2),
            "llamacpp_s": round(medians["llamacpp"], 2),
            "rounds": args.rounds,
            "rounds_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        },
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
