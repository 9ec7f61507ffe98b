"""Generation throughput against a local OpenAI-compatible server with 200 ms latency.

    .venv/bin/python bench/bench_generate.py [--method self-instruct] [--latency-s 0.2]
        [--concurrency 32] [--waves 20] [--out bench/results/generate.json]

The loopback fake teacher of tests/ runs in a process of its own and answers every request after
--latency-s. Two runs of `generate` in this process, against that one server:

1. one request in flight, a few requests: the time one request takes, and how much of it is ours
   (the rest is the server's scripted latency);
2. --concurrency in flight for --waves waves (--max-requests = concurrency x waves; 32 x 20 = 640
   requests): requests/s against the in-flight bound, concurrency / latency (32 / 0.2 s = 160/s).
   The goal is >= 90% of the bound.

--method picks the generator (self-instruct; evol and magpie once they answer the fake teacher).
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
GOAL = 0.9  # of the in-flight bound


def run_once(url: str, seeds: list[Record], method: str, requests: int, concurrency: int) -> dict:
    """Exactly `requests` requests (--max-requests; the record target is out of reach)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = GenerateConfig(
            seeds=str(write_records(Path(tmp) / "seeds.jsonl", seeds)),
            output=str(Path(tmp) / "gen.jsonl"),
            method=method,
            num_instructions=requests * 100,
            max_requests=requests,
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
        "requests": result.requests,
        "records": result.accepted,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(result.requests / elapsed, 2),
        "records_per_s": round(result.accepted / elapsed, 1),
    }


def serve(latency_s: float, urls) -> None:
    with FakeTeacher(Script(latency_s=latency_s)) as url:
        urls.put(url)
        threading.Event().wait()  # until the benchmark terminates this process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="self-instruct", help="the generator to run (generate --method)")
    ap.add_argument("--latency-s", type=float, default=0.2, help="the fake server's answer delay")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight for the fast run")
    ap.add_argument("--waves", type=int, default=20, help="the fast run sends concurrency x waves requests")
    ap.add_argument("--single", type=int, default=10, help="requests of the one-in-flight run")
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
        one = run_once(url, seeds, args.method, args.single, 1)
        many = run_once(url, seeds, args.method, args.concurrency * args.waves, args.concurrency)
    finally:
        server.terminate()
    per_request_ms = 1000 * one["seconds"] / one["requests"]
    ours_ms = per_request_ms - 1000 * args.latency_s
    bound = args.concurrency / args.latency_s
    share = many["requests_per_s"] / bound
    print(f"method {args.method}, latency {args.latency_s * 1000:g} ms")
    print(f"1 in flight: {per_request_ms:.1f} ms a request ({ours_ms:.1f} ms ours), {one['requests']} requests")
    print(
        f"{args.concurrency} in flight: {many['requests']} requests ({args.waves} waves) in {many['seconds']} s: "
        f"{many['requests_per_s']} requests/s, {many['records_per_s']} records/s"
    )
    print(f"{share:.1%} of the in-flight bound {bound:g} requests/s (goal: >= {GOAL:.0%})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": describe(),
                "method": args.method,
                "latency_s": args.latency_s,
                "one_request_ms": round(per_request_ms, 1),
                "ours_ms_per_request": round(ours_ms, 1),
                "runs": [one, many],
                "bound_requests_per_s": bound,
                "share_of_bound": round(share, 3),
                "goal": GOAL,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
