"""`alpaca-forge serve` under load, on the embedded SmolLM2, against the engine called directly in
the same process.

    .venv/bin/python bench/bench_serve.py [--tokens 128] [--clients 16] [--soak-s 60] [--out bench/results/serve.json]

1. One streaming client: tokens/s through the server (HTTP, SSE, the content filter on every
   piece, the request log) vs the in-process engine's own `stream()` — the baseline — on the same
   prompt, greedy, exactly `--tokens` new tokens (EOS suppressed). The two alternate for
   `--rounds` pairs; the figure is the median of the pairs' ratios (this machine drifts by ±10%
   over a minute, which a pair run back to back mostly shares), best vs best beside it. The
   clients are threads of this process, so their own work counts against the server here.
2. `--clients` concurrent streaming clients, each its own prompt: aggregate tokens/s (all tokens
   over the wall time) vs the single client's, and time to first token p50 / p95.
3. `--clients` clients asking again and again for `--soak-s` seconds: errors (any non-200, an
   error chunk, a stream without `[DONE]`), and the process's resident memory at the end vs after
   warm-up (the runs above are the warm-up).

Clients are threads of this process speaking HTTP over loopback with httpx, so the server's
process is this one and its memory is what /proc/self/status reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from alpaca_forge import GenerationSettings, Message, load_model
from alpaca_forge.engines.transformers_engine import TransformersEngine
from alpaca_forge.serve import ServeConfig, start
from machine import describe  # bench/ is this script's folder

TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a robot learning to paint",
    "the first day at a new school",
    "a dragon who is afraid of heights",
    "a detective in a city of cats",
    "a baker who bakes bread for the moon",
    "two friends lost in a forest",
    "a violinist on a sinking ship",
    "a garden that grows at night",
    "an astronaut who misses the rain",
    "a clock that runs backwards",
    "a library where the books whisper",
    "a fisherman and a talking fish",
    "a town where it always snows",
    "a map to a place that moved",
    "a letter delivered fifty years late",
]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_clients(client: Callable[[int], None], count: int) -> float:
    """`client(0)` ... `client(count - 1)` in threads at once; the wall time until all are done."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def stream_once(client: httpx.Client, url: str, body: dict) -> dict:
    """One streamed answer: tokens, seconds, time to first piece, and whether it ended cleanly."""
    start = time.perf_counter()
    first = None
    tokens, done, error = 0, False, None
    with client.stream(
        "POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        if r.status_code != 200:
            r.read()
            return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"]["message"]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    ok = done and error is None
    return {"ok": ok, "tokens": tokens, "elapsed_s": elapsed, "ttft_s": first, "error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--rounds", type=int, default=7, help="single-client rounds of each side, alternating")
    ap.add_argument("--soak-s", type=float, default=60.0, help="length of the soak run, seconds")
    ap.add_argument("--soak-tokens", type=int, default=64, help="new tokens per answer in the soak run")
    ap.add_argument("--out", default="bench/results/serve.json", help="where the numbers go")
    args = ap.parse_args()

    lm = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    lm.model.generation_config.suppress_tokens = [lm.tokenizer.eos_token_id]  # fixed-length answers
    engine = TransformersEngine(lm)
    question = f"Write a long story about {TOPICS[0]}."
    settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0.0, repetition_penalty=1.1)

    def direct() -> float:
        s = engine.stream([Message("user", question)], settings)
        for _ in s:
            pass
        return s.completion.completion_tokens / s.elapsed_s

    log = Path(tempfile.mkdtemp()) / "requests.jsonl"
    cfg = ServeConfig(port=0, request_log=str(log), max_batch_size=args.clients)
    results: dict = {"machine": describe(), "tokens": args.tokens}
    with start(cfg, engine=engine) as server, httpx.Client(timeout=600) as client:
        server.wait_ready(120)
        url = server.api_url + "/chat/completions"
        name = server.state.backend.name

        def body(topic: str, tokens: int) -> dict:
            return {
                "model": name,
                "temperature": 0,
                "max_tokens": tokens,
                "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            }

        # 1. one client
        direct(), stream_once(client, url, body(TOPICS[0], args.tokens))  # warm-up
        rates: dict[str, list[float]] = {"direct": [], "server": []}
        for _ in range(args.rounds):
            rates["direct"].append(direct())
            r = stream_once(client, url, body(TOPICS[0], args.tokens))
            assert r["ok"] and r["tokens"] == args.tokens, r
            rates["server"].append(r["tokens"] / r["elapsed_s"])
        single = statistics.median(rates["server"])
        pair_ratio = statistics.median(s / d for s, d in zip(rates["server"], rates["direct"], strict=True))
        results["single"] = {
            "direct_tok_s_median": round(statistics.median(rates["direct"]), 2),
            "server_tok_s_median": round(single, 2),
            "ratio_median_of_pairs": round(pair_ratio, 3),
            "ratio_best_vs_best": round(max(rates["server"]) / max(rates["direct"]), 3),
            "rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        }
        print(
            f"one client: server {single:.1f} tok/s vs engine {statistics.median(rates['direct']):.1f} tok/s "
            f"(medians); median of pair ratios {pair_ratio:.3f}x (goal >= 0.90), "
            f"best vs best {results['single']['ratio_best_vs_best']:.3f}x"
        )

        # 2. many clients at once
        def fan_out(tokens: int) -> tuple[list[dict], float]:
            out: list[dict] = [{}] * args.clients
            barrier = threading.Barrier(args.clients)

            def one(i: int) -> None:
                with httpx.Client(timeout=600) as c:
                    barrier.wait()
                    out[i] = stream_once(c, url, body(TOPICS[i % len(TOPICS)], tokens))

            return out, run_clients(one, args.clients)

        fan_out(16)  # warm-up at this batch size
        runs, wall = fan_out(args.tokens)
        assert all(r["ok"] for r in runs), [r for r in runs if not r["ok"]]
        total = sum(r["tokens"] for r in runs)
        ttfts = sorted(r["ttft_s"] for r in runs)
        aggregate = total / wall
        results["concurrent"] = {
            "clients": args.clients,
            "aggregate_tok_s": round(aggregate, 2),
            "vs_single": round(aggregate / single, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], 3),
            "largest_batch": getattr(server.state.backend.engine, "stats", None)
            and server.state.backend.engine.stats.largest_batch,
        }
        print(
            f"{args.clients} clients: {aggregate:.1f} tok/s aggregate = {aggregate / single:.2f}x one client "
            f"(goal >= 4); time to first token p50 {results['concurrent']['ttft_p50_s']} s, "
            f"p95 {results['concurrent']['ttft_p95_s']} s"
        )

        # 3. soak
        warm_rss = rss_mb()
        stop_at = time.perf_counter() + args.soak_s
        counts = {"requests": 0, "errors": 0, "tokens": 0}
        errors: list[str] = []
        lock = threading.Lock()

        def soak(i: int) -> None:
            k = i
            with httpx.Client(timeout=600) as c:
                while time.perf_counter() < stop_at:
                    try:
                        r = stream_once(c, url, body(TOPICS[k % len(TOPICS)], args.soak_tokens))
                    except httpx.HTTPError as e:
                        r = {"ok": False, "error": repr(e)}
                    k += 1
                    with lock:
                        counts["requests"] += 1
                        counts["tokens"] += r.get("tokens", 0)
                        if not r["ok"]:
                            counts["errors"] += 1
                            errors.append(str(r.get("error")))

        soak_wall = run_clients(soak, args.clients)
        end_rss = rss_mb()
        results["soak"] = {
            "seconds": round(soak_wall, 1),
            **counts,
            "tok_s": round(counts["tokens"] / soak_wall, 1),
            "rss_after_warmup_mb": round(warm_rss, 1),
            "rss_end_mb": round(end_rss, 1),
            "rss_change": round(end_rss / warm_rss - 1, 4),
            "first_errors": errors[:5],
        }
        print(
            f"soak: {counts['requests']} requests in {soak_wall:.0f} s, {counts['errors']} errors, "
            f"RSS {warm_rss:.0f} -> {end_rss:.0f} MB ({results['soak']['rss_change']:+.1%}; goal within 5%)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
