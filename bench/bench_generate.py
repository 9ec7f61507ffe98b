"""Generation throughput against a local OpenAI-compatible server with 200 ms latency.

    .venv/bin/python bench/bench_generate.py [--method self-instruct|evol|magpie|all] [--latency-s 0.2]
        [--concurrency 32] [--waves 20] [--out bench/results/generate.json]

A scripted fake server of tests/ (fake_teacher, fake_evol_teacher, fake_magpie: the method's own)
runs in a process of its own and answers every request after --latency-s. `alpaca-forge generate`
runs in this process (the real CLI, in-process) against that one server:

1. one request in flight, --single and then twice as many requests: the time one call takes (the
   difference of the two runs, so without the command's start-up), and how much of it is ours
   (the rest is the server's scripted latency);
2. --concurrency in flight for --waves waves (--max-requests = concurrency x waves; 32 x 20 = 640
   requests): calls to the server per second against the in-flight bound, concurrency / latency
   (32 / 0.2 s = 160/s), for the whole command, and beyond its first wave (the difference with a
   one-wave run: no start-up, no summary). The goal is >= 90% of the bound in flight, beyond the
   first wave (the whole command's share, start-up included, is printed beside it).
   (A magpie request is two calls in a row, a query and its answer: the summary's engine_calls.)

The fake servers listen with a backlog of 256 (the standard library's 5 drops SYNs when 32
connections open at once: a second's wait each) and answer with TCP_NODELAY (tests/loopback.py, as
uvicorn and vLLM do): without it
every reply waits ~40 ms for the client's delayed ACK between its headers and its body.
Self-instruct runs as generate does by default, without --similarity-details (its per-record
neighbour fields score every candidate against the whole pool); `--similarity-details` here
measures that too. The 1-minute load average before each method's runs is recorded with it: the
machine's 2 cores are shared, and the share of the bound falls with their load.
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
from alpaca_forge import Record, read_records, write_records
from in_process import timed_cli  # bench/ is this script's folder
from machine import describe

SEEDS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "seed_tasks.jsonl"
GOAL = 0.9  # of the in-flight bound
METHODS = ("self-instruct", "evol", "magpie")


def serve(method: str, latency_s: float, urls) -> None:
    if method == "self-instruct":
        from fake_teacher import FakeTeacher, Script

        server = FakeTeacher(Script(latency_s=latency_s))
    elif method == "evol":
        from fake_evol_teacher import EvolScript, FakeEvolTeacher

        server = FakeEvolTeacher(EvolScript(latency_s=latency_s))
    else:
        from fake_magpie import FakeMagpieServer, MagpieScript

        server = FakeMagpieServer(MagpieScript(latency_s=latency_s))
    with server as url:
        urls.put(url)
        threading.Event().wait()  # until the benchmark terminates this process


def magpie_template(folder: Path) -> Path | None:
    """The embedded SmolLM2's chat template (magpie needs one for a server), or None."""
    try:
        import llama_cpp

        from alpaca_forge.engines.llamacpp import gguf_path, template_tokenizer

        llm = llama_cpp.Llama(model_path=str(gguf_path("smollm2-135m-instruct")), vocab_only=True, verbose=False)
        path = folder / "smollm2.jinja"
        path.write_text(template_tokenizer(llm).chat_template, encoding="utf-8")
        return path
    except Exception as e:  # any reason: the method is skipped, and why is said
        print(f"magpie skipped: no chat template ({e})")
        return None


def run_once(method: str, url: str, seeds: Path, extra: list[str], requests: int, concurrency: int) -> dict:
    """Exactly `requests` requests (--max-requests; the record target is out of reach)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gen.jsonl"
        args = [
            "generate", "--method", method, "--output", str(out), "--engine", "openai", "--base-url", url,
            "--model", "fake", "--num-instructions", str(requests * 100), "--max-requests", str(requests),
            "--concurrency", str(concurrency), *([] if method == "magpie" else ["--seeds", str(seeds)]), *extra,
        ]  # fmt: skip
        code, elapsed, err = timed_cli(args)
        summary_path = out.with_name("gen.summary.json")
        if code not in (0, None) or not summary_path.is_file():
            raise SystemExit(f"{method}: generate failed ({code}): {err[-2000:]}")
        summary = json.loads(summary_path.read_text())
    calls = summary.get("details", {}).get("engine_calls", summary["requests"])  # magpie: 2 a request
    return {
        "concurrency": concurrency,
        "requests": summary["requests"],
        "calls": calls,
        "records": summary["accepted"],
        "seconds": round(elapsed, 3),
        "calls_per_s": round(calls / elapsed, 2),
        "records_per_s": round(summary["accepted"] / elapsed, 1),
    }


def bench(method: str, args: argparse.Namespace, seeds: Path, extra: list[str]) -> dict:
    load = os.getloadavg()[0]
    # The server runs in a process of its own, as a real one would: its threads must not compete
    # with the generator's for this interpreter's lock.
    ctx = multiprocessing.get_context("spawn")
    urls = ctx.Queue()
    server = ctx.Process(target=serve, args=(method, args.latency_s, urls), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    try:
        # Two runs one at a time, of N and 2N requests: their difference is N requests' time,
        # without the command's start-up (config, seeds, the first imports).
        run_once(method, url, seeds, extra, 1, 1)  # warm-up: the first run imports what it uses
        short = run_once(method, url, seeds, extra, args.single, 1)
        long = run_once(method, url, seeds, extra, 2 * args.single, 1)
        wave = run_once(method, url, seeds, extra, args.concurrency, args.concurrency)
        many = run_once(method, url, seeds, extra, args.concurrency * args.waves, args.concurrency)
    finally:
        server.terminate()
    per_call_ms = 1000 * (long["seconds"] - short["seconds"]) / (long["calls"] - short["calls"])
    ours_ms = per_call_ms - 1000 * args.latency_s
    bound = args.concurrency / args.latency_s
    share = many["calls_per_s"] / bound
    # beyond the first wave: the calls after it over the time after it (no start-up, no summary)
    steady = (many["calls"] - wave["calls"]) / (many["seconds"] - wave["seconds"]) / bound
    print(f"{method}, latency {args.latency_s * 1000:g} ms")
    print(f"  1 in flight: {per_call_ms:.1f} ms a call to the server ({ours_ms:.1f} ms ours)")
    print(
        f"  {args.concurrency} in flight: {many['requests']} requests ({many['calls']} calls) in {many['seconds']} s: "
        f"{many['calls_per_s']} calls/s, {many['records_per_s']} records/s"
    )
    print(f"  {share:.1%} of the in-flight bound {bound:g} calls/s for the whole command; "
          f"{steady:.1%} beyond the first wave (goal: >= {GOAL:.0%})")  # fmt: skip
    return {
        "method": method,
        **({"similarity_details": True} if "--similarity-details" in extra else {}),
        "load_average_1min_before": round(load, 2),
        "one_call_ms": round(per_call_ms, 1),
        "ours_ms_per_call": round(ours_ms, 1),
        "runs": [short, long, wave, many],
        "share_of_bound": round(share, 3),
        "steady_share_of_bound": round(steady, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="self-instruct", choices=(*METHODS, "all"), help="the generator(s)")
    ap.add_argument("--latency-s", type=float, default=0.2, help="the fake server's answer delay")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight for the fast run")
    ap.add_argument("--waves", type=int, default=20, help="the fast run sends concurrency x waves requests")
    ap.add_argument("--single", type=int, default=10, help="requests of the one-in-flight run")
    ap.add_argument("--out", default="bench/results/generate.json", help="where to write the numbers")
    ap.add_argument(
        "--similarity-details", action="store_true", help="self-instruct also runs with --similarity-details"
    )
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        seed_records = (
            read_records(SEEDS)
            if SEEDS.is_file()
            else [Record(f"Explain idea {w} simply.", "", "...") for w in "abcdefghijkl"]
        )
        seeds = write_records(Path(tmp) / "seeds.jsonl", seed_records)
        for method in METHODS if args.method == "all" else (args.method,):
            extra: list[str] = []
            if method == "evol":
                extra = ["--evol-rounds", "4"]  # 175 seeds x 4 rounds: requests enough for 640
            if method == "magpie":
                template = magpie_template(Path(tmp))
                if template is None:
                    continue
                extra = ["--magpie-template", str(template)]
            results.append(bench(method, args, seeds, extra))
            if method == "self-instruct" and args.similarity_details:
                results.append(bench(method, args, seeds, ["--similarity-details"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": describe(),
                "latency_s": args.latency_s,
                "concurrency": args.concurrency,
                "bound_requests_per_s": args.concurrency / args.latency_s,
                "goal": GOAL,
                "methods": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
