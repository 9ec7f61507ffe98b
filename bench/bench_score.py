"""`data score` throughput against a rating judge with 200 ms latency: requests kept in flight.

    .venv/bin/python bench/bench_score.py [--latency-s 0.2] [--concurrency 32] [--waves 20]
        [--out bench/results/score.json]

tests/fake_rater.py's scripted judge runs in a process of its own and answers every rating after
--latency-s. `alpaca-forge data score` runs in this process (the real CLI, in-process):

1. one request in flight (--judge-batch-size 1) for --single and then twice as many records: the
   time one rating takes (the difference of the two runs, without the command's start-up), and how
   much of it is ours;
2. --concurrency in flight for one wave and for --waves waves (concurrency x waves records, 640 by
   default): ratings per second against the in-flight bound, concurrency / latency (32 / 0.2 s =
   160/s), for the whole command and in the steady state (the difference of the two runs: the
   records beyond the first wave over the time beyond it, without the command's start-up and its
   histogram). The goal is >= 90% of the bound, as for the generators (bench/bench_generate.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from in_process import timed_cli  # bench/ is this script's folder
from machine import describe

GOAL = 0.9


def serve(latency_s: float, urls) -> None:
    from fake_rater import RatingJudge

    with RatingJudge(lambda instruction, output: "Accuracy: 4\nHelpfulness: 5", latency_s) as url:
        urls.put(url)
        threading.Event().wait()  # until the benchmark terminates this process


def run_once(url: str, records: int, concurrency: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        rows = [{"instruction": f"Explain idea {k} simply.", "input": "", "output": f"Idea {k} is ..."} for k in range(records)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = [
            "-q", "data", "score", str(data), "--output", str(Path(tmp) / "scored.jsonl"), "--judge-engine", "openai",
            "--judge-base-url", url, "--judge-model", "rater", "--judge-batch-size", str(concurrency),
        ]  # fmt: skip
        code, elapsed, err = timed_cli(args)
        if code not in (0, None):
            raise SystemExit(f"data score failed ({code}): {err[-2000:]}")
        rated = sum(1 for line in (Path(tmp) / "scored.jsonl").read_text().splitlines() if json.loads(line)["score"])
    return {"concurrency": concurrency, "records": records, "rated": rated, "seconds": round(elapsed, 3),
            "ratings_per_s": round(records / elapsed, 2)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-s", type=float, default=0.2, help="the judge's answer delay")
    ap.add_argument("--concurrency", type=int, default=32, help="ratings in flight for the fast run")
    ap.add_argument("--waves", type=int, default=20, help="the fast run rates concurrency x waves records")
    ap.add_argument("--single", type=int, default=10, help="records of the one-in-flight run")
    ap.add_argument("--out", default="bench/results/score.json", help="where to write the numbers")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    ctx = multiprocessing.get_context("spawn")
    urls = ctx.Queue()
    server = ctx.Process(target=serve, args=(args.latency_s, urls), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    try:
        run_once(url, 1, 1)  # warm-up: the first run imports what it uses
        short = run_once(url, args.single, 1)
        long = run_once(url, 2 * args.single, 1)
        wave = run_once(url, args.concurrency, args.concurrency)
        many = run_once(url, args.concurrency * args.waves, args.concurrency)
    finally:
        server.terminate()
    per_call_ms = 1000 * (long["seconds"] - short["seconds"]) / (long["records"] - short["records"])
    bound = args.concurrency / args.latency_s
    share = many["ratings_per_s"] / bound
    steady = (many["records"] - wave["records"]) / (many["seconds"] - wave["seconds"]) / bound
    print(f"1 in flight: {per_call_ms:.1f} ms a rating ({per_call_ms - 1000 * args.latency_s:.1f} ms ours)")
    print(f"{args.concurrency} in flight: {many['records']} ratings in {many['seconds']} s, {many['ratings_per_s']}/s")
    print(f"{share:.1%} of the in-flight bound {bound:g}/s for the whole command; {steady:.1%} in the steady "
          f"state (goal: >= {GOAL:.0%}); {many['rated']} rated")  # fmt: skip
    result = {
        "machine": describe(),
        "latency_s": args.latency_s,
        "concurrency": args.concurrency,
        "bound_per_s": bound,
        "goal": GOAL,
        "load_average_1min_before": round(load, 2),
        "one_call_ms": round(per_call_ms, 1),
        "ours_ms_per_call": round(per_call_ms - 1000 * args.latency_s, 1),
        "runs": [short, long, wave, many],
        "share_of_bound": round(share, 3),
        "steady_share_of_bound": round(steady, 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
