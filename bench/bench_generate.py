"""Generation throughput against a local OpenAI-compatible server with 200 ms latency.

    .venv/bin/python bench/bench_generate.py [--latency-s 0.2] [--concurrency 32] [--out bench/results/generate.json]

The same job (N records from the 175 real seed tasks, or 12 made-up ones without the shared data)
runs twice in this process against the loopback fake teacher of tests/: once with one request in
flight, once with --concurrency in flight. The ratio of records/s is the figure; the goal is ≥20x.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from alpaca_forge import EngineConfig, Record, read_records, write_records
from alpaca_forge.engines.openai_http import OpenAIEngine
from alpaca_forge.generate import GenerateConfig, run
from machine import describe  # bench/ is this script's folder

from fake_teacher import FakeTeacher, Script

SEEDS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "seed_tasks.jsonl"


def run_once(url: str, seeds: list[Record], n: int, concurrency: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = GenerateConfig(
            seeds=str(write_records(Path(tmp) / "seeds.jsonl", seeds)),
            output=str(Path(tmp) / "gen.jsonl"),
            num_instructions=n,
            concurrency=concurrency,
            engine=EngineConfig(engine="openai", base_url=url, model="fake"),
        )
        teacher = OpenAIEngine(url, "fake")  # opened here, so its set-up is not timed
        start = time.perf_counter()
        result = run(config, progress=False, engine=teacher)
        elapsed = time.perf_counter() - start
        teacher.close()
    return {
        "concurrency": concurrency,
        "records": result.accepted,
        "requests": result.requests,
        "seconds": round(elapsed, 3),
        "records_per_s": round(result.accepted / elapsed, 1),
    }


def serve(latency_s: float, urls) -> None:
    with FakeTeacher(Script(latency_s=latency_s)) as url:
        urls.put(url)
        threading.Event().wait()  # until the benchmark terminates this process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-s", type=float, default=0.2, help="the fake server's answer delay")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight for the fast run")
    ap.add_argument("--out", default="bench/results/generate.json", help="where to write the numbers")
    args = ap.parse_args()
    seeds = (
        read_records(SEEDS)
        if SEEDS.is_file()
        else [Record(f"Explain idea {w} simply.", "", "...") for w in "abcdefghijkl"]
    )
    # The teacher runs in a process of its own, as a real one would: its threads must not compete
    # with the generator's for this interpreter's lock.
    ctx = multiprocessing.get_context("spawn")
    urls = ctx.Queue()
    server = ctx.Process(target=serve, args=(args.latency_s, urls), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    try:
        # The same job in both runs: 64 requests' worth of ~16 accepted records each (a reply
        # holds at most 16 new tasks; two full waves at 32 in flight).
        n = 64 * 16
        one = run_once(url, seeds, n, 1)
        many = run_once(url, seeds, n, args.concurrency)
    finally:
        server.terminate()
    ratio = many["records_per_s"] / one["records_per_s"]
    print(f"1 in flight: {one['records_per_s']} records/s ({one['requests']} requests in {one['seconds']} s)")
    print(
        f"{args.concurrency} in flight: {many['records_per_s']} records/s ({many['requests']} requests in {many['seconds']} s)"
    )
    print(f"ratio: {ratio:.1f}x (goal: >= 20x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": describe(),
                "latency_s": args.latency_s,
                "runs": [one, many],
                "ratio": round(ratio, 2),
                "goal": 20,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
