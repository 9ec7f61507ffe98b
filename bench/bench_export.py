"""`alpaca-forge export gguf` on the embedded SmolLM2: what each quantisation costs in agreement
with the model, and what it buys in decode speed and memory, through llama.cpp alone and through
our engine, `infer` and `serve`, against transformers in fp32 — the baseline — in the same run.

    .venv/bin/python bench/bench_export.py [--quants f16,q8_0,q4_0,q4_k_m] [--tokens 128] [--rounds 3] [--pairs 6] [--threads 2] [--verify-prompts 100] [--out bench/results/export.json]

1. Export: each `--quants` type written by `run_gguf` with its parity check (the file fed the same
   token ids as transformers fp32: top-1 agreement after each prompt and at every position). The
   embedded model ships as a Q4_1 GGUF that transformers dequantises, so "fp32" here is those
   dequantised weights, and f16 is expected to match them almost exactly.
2. Decode: one prompt that makes a long answer ("Write a long story about a lighthouse keeper.", in
   the model's chat template), greedy, repetition penalty 1.1, `--tokens` new tokens, `--threads`
   threads everywhere, prefill included in every timing:
   a. transformers fp32, `TransformersEngine.stream()` — the baseline;
   b. llama.cpp direct: plain llama-cpp-python, no alpaca_forge code, `generate()` plus a
      `detokenize()` per token as any client needs; the KV cache is reset before each answer so
      the prompt is evaluated every time, as our engine does;
   c. our `LlamaCppEngine.stream()` (what chat, infer and serve run), opened by `open_engine`;
   d. `infer.run()` on a one-record file: its own tok/s (generation and the JSONL write; the figure
      it reports) and end to end (the model load included);
   e. `serve` on loopback with its default content filter, one streaming client (httpx, SSE, in
      the same process), tokens from the request to the last chunk.
   Each configuration runs in its own fresh subprocess (`--child`), so one model's memory never
   counts in another's figure: peak RSS (VmHWM) and RSS after the last answer (VmRSS), the model
   still loaded (but for infer, whose `run()` closes its engine). Each child answers once to warm
   up, then `--rounds` times; the figure is the median. This machine is shared and drifts by 10%
   or more over a minute, so for each file the children run direct, engine, direct, infer,
   direct, serve, direct: each of ours is compared with the median of the two direct children
   around it (best round vs best round beside it), and every round records the CPU seconds it
   got per wall second (about `--threads` when it had its cores).
3. The goals' speed ratios for the engine and `serve` come from one more child per file, where
   direct, engine and serve answer in turn `--pairs` times in one process (as `bench_serve.py`
   measures): separate processes on this shared machine differ by up to 20% between two runs of
   the very same code, rounds within one process by about 3%.
4. A markdown table, a table of every child, the PASS/FAIL of the goals, and every number in `--out`.
"""

from __future__ import annotations

# Only the standard library at module level: a `--child` imports what its configuration needs and
# nothing more (the llama.cpp direct child must not pay for torch in its memory figure).
import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a long story about a lighthouse keeper."
QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
CONTEXT_TOKENS = 1024
REPETITION_PENALTY = 1.1  # the in-process default of every stage
# Goals
STACK_VS_DIRECT = 0.90  # engine, infer and serve vs llama.cpp direct, tok/s
OURS = ("engine", "infer", "serve")
RSS_VS_FP32 = {"q4_0": 0.30, "q4_k_m": 0.30}  # peak RSS of llama.cpp direct vs transformers fp32
TOP1_AFTER_PROMPT = {"f16": 0.99, "q8_0": 0.97}


def memory_mb() -> dict[str, float]:
    """This process's peak (VmHWM) and current (VmRSS) resident memory, MB; the current split into
    anonymous memory and mapped files (llama.cpp maps the GGUF; safetensors are mapped too)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MB
    return {
        "peak_rss_mb": fields["VmHWM"],
        "rss_after_mb": fields["VmRSS"],
        "rss_after_anon_mb": fields["RssAnon"],
        "rss_after_file_mb": fields["RssFile"],
    }


def cpu_s() -> float:
    """CPU seconds of this process so far, all its threads (llama.cpp's and OpenMP's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(answer, rounds: int) -> dict:
    """One warm-up answer, then `rounds`; `answer()` gives {"tokens", "elapsed_s", ...}.

    Each round also records CPU seconds per wall second: about `--threads` when the decode had its
    cores; less when other work took them (this machine is shared) or its threads slept."""
    answer()
    done = []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), cpu_s()
        r = answer()
        r["cpu_per_wall"] = (cpu_s() - cpu) / (time.perf_counter() - wall)
        done.append(r)
    return {
        "tok_s": round(statistics.median(r["tokens"] / r["elapsed_s"] for r in done), 2),
        "tokens": [r["tokens"] for r in done],
        "rounds_tok_s": [round(r["tokens"] / r["elapsed_s"], 2) for r in done],
        "rounds_cpu_per_wall": [round(r["cpu_per_wall"], 2) for r in done],
        "last": done[-1],
        **memory_mb(),  # here, while the caller still holds its model
    }


# ---------------------------------------------------------------------------------------------
# The children: each one configuration, in a fresh process


def child_export(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    from alpaca_forge.export.config import GgufConfig
    from alpaca_forge.export.runner import run_gguf

    start = time.perf_counter()
    cfg = GgufConfig(
        model=MODEL,
        output=a["output"],
        quant=a["quant"],
        verify=True,
        verify_prompts=a.get("verify_prompts", 100),
        force=True,
    )
    res = run_gguf(cfg, progress=False)
    p = res.parity
    return {
        "file_mb": round(res.bytes / 1e6, 1),
        "export_s": round(res.export_s, 2),
        "wall_s": round(time.perf_counter() - start, 1),  # model load and parity check included
        "fallbacks": res.fallbacks,
        "parity": {
            "top1_last": p.top1_last,
            "top1_all": p.top1_all,
            "max_logit_diff": p.max_logit_diff,
            "tokenization_agree": p.tokenization_agree,
            "prompts": p.prompts,
            "positions": p.positions,
            "elapsed_s": round(p.elapsed_s, 1),
        },
    }


def stream_answerer(engine, conversation, settings):
    """answer(): one answer streamed from an engine (ours: transformers or llama.cpp)."""

    def answer() -> dict:
        s = engine.stream(conversation, settings)
        text = "".join(s)
        c = s.completion
        return {
            "tokens": c.completion_tokens,
            "elapsed_s": s.elapsed_s,
            "finish": c.finish_reason.value,
            "text": text,
        }

    return answer


def child_transformers(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    from alpaca_forge import GenerationSettings, Message, load_model
    from alpaca_forge.engines.transformers_engine import TransformersEngine

    lm = load_model(MODEL, device="cpu", dtype="float32")
    engine = TransformersEngine(lm)
    settings = GenerationSettings(
        max_new_tokens=a["tokens"], temperature=0.0, repetition_penalty=REPETITION_PENALTY
    )
    conversation = [Message("user", PROMPT)]
    answer = stream_answerer(engine, conversation, settings)

    # The prompt text every other configuration is given or must render the same.
    weights_mb = round(sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 1e6, 1)
    return {
        "prompt": engine.render(conversation, a["tokens"]),
        "weights_mb": weights_mb,
        **measure(answer, a["rounds"]),
    }


def direct_answerer(a: dict):
    """(answer(), prompt tokens): llama-cpp-python alone, what any client of the file would write."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=a["model"],
        n_ctx=CONTEXT_TOKENS,
        n_threads=a["threads"],
        n_threads_batch=a["threads"],
        verbose=False,
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids = llm.tokenize(a["prompt"].encode(), add_bos=False, special=True)

    def answer() -> dict:
        llm.reset()  # evaluate the prompt again, not reuse the cached one (prefill is timed everywhere)
        start = time.perf_counter()
        n, eog, pieces = 0, False, []
        for tok in llm.generate(
            ids, temp=0.0, top_k=0, min_p=0.0, top_p=1.0, repeat_penalty=REPETITION_PENALTY
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                eog = True
                break
            pieces.append(llm.detokenize([tok]))
            n += 1
            if n >= a["tokens"]:
                break
        elapsed = time.perf_counter() - start
        return {
            "tokens": n,
            "elapsed_s": elapsed,
            "eog": eog,
            "text": b"".join(pieces).decode(errors="replace"),
        }

    return answer, len(ids)


def child_direct(a: dict) -> dict:
    answer, prompt_tokens = direct_answerer(a)
    return {"prompt_tokens": prompt_tokens, **measure(answer, a["rounds"])}


def _engine_config(a: dict):
    from alpaca_forge import EngineConfig

    return EngineConfig(
        engine="llamacpp", model=a["model"], cpu_threads=a["threads"], context_tokens=CONTEXT_TOKENS
    )


def child_engine(a: dict) -> dict:
    from alpaca_forge import GenerationSettings, Message, open_engine

    engine = open_engine(_engine_config(a))
    settings = GenerationSettings(
        max_new_tokens=a["tokens"], temperature=0.0, repetition_penalty=REPETITION_PENALTY
    )
    conversation = [Message("user", PROMPT)]
    answer = stream_answerer(engine, conversation, settings)

    same_prompt = engine.render(conversation, a["tokens"]) == a["prompt"]
    out = {"same_prompt": same_prompt, "load_s": round(engine.load_s, 3), **measure(answer, a["rounds"])}
    engine.close()
    return out


def child_infer(a: dict) -> dict:
    from alpaca_forge import GenerationSettings
    from alpaca_forge.infer.config import InferConfig
    from alpaca_forge.infer.runner import run

    folder = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    (folder / "in.jsonl").write_text(json.dumps({"instruction": PROMPT, "input": ""}) + "\n")
    cfg = InferConfig(
        input=str(folder / "in.jsonl"),
        output=str(folder / "out.jsonl"),
        overwrite=True,  # every round answers again
        engine=_engine_config(a),
        generation=GenerationSettings(max_new_tokens=a["tokens"], temperature=0.0),
    )
    assert cfg.settings.repetition_penalty == REPETITION_PENALTY, cfg.settings

    def answer() -> dict:
        start = time.perf_counter()
        res = run(cfg, progress=False)  # opens the model, answers, closes it
        wall = time.perf_counter() - start
        row = json.loads((folder / "out.jsonl").read_text().splitlines()[-1])
        assert row["num_tokens"] == res.tokens, (row, res)
        return {
            "tokens": res.tokens,
            "elapsed_s": res.elapsed_s,
            "wall_s": wall,
            "finish": row["finish_reason"],
        }

    # tok_s is infer's own figure (generation and the JSONL write); end to end adds the model load.
    out = measure(answer, a["rounds"])
    out["end_to_end_tok_s"] = round(out["last"]["tokens"] / out["last"]["wall_s"], 2)
    return out


def serve_answerer(client, url: str, body: dict):
    """answer(): one streaming request to our server, timed from the request to the last chunk."""

    def answer() -> dict:
        start_t = time.perf_counter()
        tokens, done, finish, text = None, False, None, []
        with client.stream("POST", url, json=body) as r:
            assert r.status_code == 200, (r.status_code, r.read())
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    text.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
        elapsed = time.perf_counter() - start_t
        assert done and tokens is not None, "the stream ended without usage or [DONE]"
        return {"tokens": tokens, "elapsed_s": elapsed, "finish": finish, "text": "".join(text)}

    return answer


def _serve_body(a: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": a["tokens"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def child_serve(a: dict) -> dict:
    import httpx

    from alpaca_forge.serve import ServeConfig, start

    cfg = ServeConfig(port=0, engine=_engine_config(a))  # content filter on, as by default
    body = _serve_body(a)
    t0 = time.perf_counter()
    with start(cfg) as server, httpx.Client(timeout=600) as client:
        server.wait_ready(120)
        ready_s = time.perf_counter() - t0
        body["model"] = server.state.backend.name
        out = measure(serve_answerer(client, server.api_url + "/chat/completions", body), a["rounds"])
    return {"ready_s": round(ready_s, 2), **out}


def child_paired(a: dict) -> dict:
    """Speed ratios measured in one process, the way `bench_serve.py` measures them: llama.cpp
    direct, our engine and `serve` answer in turn, `--pairs` times, and each round's ratio is
    taken against the direct answer just before it (seconds apart, so they share this machine's
    drift). Each direct answer runs on a fresh thread, as every engine answer does: llama.cpp's
    OpenMP threads slow down ~20% once two long-lived threads of one process have both decoded."""
    import threading

    import httpx

    from alpaca_forge import GenerationSettings, Message
    from alpaca_forge.serve import ServeConfig, start

    direct, _ = direct_answerer(a)

    def direct_on_a_fresh_thread() -> dict:
        got: dict = {}
        t = threading.Thread(target=lambda: got.update(direct()))
        t.start()
        t.join()
        return got

    settings = GenerationSettings(
        max_new_tokens=a["tokens"], temperature=0.0, repetition_penalty=REPETITION_PENALTY
    )
    body = _serve_body(a)
    with start(ServeConfig(port=0, engine=_engine_config(a))) as server, httpx.Client(timeout=600) as client:
        server.wait_ready(120)
        body["model"] = server.state.backend.name
        engine = server.state.backend.engine
        serve = serve_answerer(client, server.api_url + "/chat/completions", body)

        ours = stream_answerer(engine, [Message("user", PROMPT)], settings)
        for warm in (direct_on_a_fresh_thread, ours, serve):
            warm()
        rounds = []
        for _ in range(a["pairs"]):
            d, e, v = direct_on_a_fresh_thread(), ours(), serve()
            rate = {k: x["tokens"] / x["elapsed_s"] for k, x in (("direct", d), ("engine", e), ("serve", v))}
            rounds.append({k: round(x, 2) for k, x in rate.items()})
    return {
        "rounds": rounds,
        "engine_vs_direct": round(statistics.median(r["engine"] / r["direct"] for r in rounds), 3),
        "serve_vs_direct": round(statistics.median(r["serve"] / r["direct"] for r in rounds), 3),
    }


CHILDREN = {
    "export": child_export,
    "transformers": child_transformers,
    "direct": child_direct,
    "engine": child_engine,
    "infer": child_infer,
    "serve": child_serve,
    "paired": child_paired,
}


def child_main(spec: str) -> None:
    a = json.loads(spec)
    out = CHILDREN[a["kind"]](a)
    for key, value in memory_mb().items():  # the export child's; a decode child measured its own
        out.setdefault(key, value)
    out["torch_loaded"] = "torch" in sys.modules
    Path(a["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The parent: runs the children, prints the table


def spawn(kind: str, folder: Path, **args) -> dict:
    """One child process; its result, or its stderr's tail in the exception."""
    result = folder / f"{kind}-{time.monotonic_ns()}.json"
    spec = json.dumps({"kind": kind, "result": str(result), **args})
    start = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if p.returncode != 0 or not result.is_file():
        raise RuntimeError(f"child {kind} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["child_wall_s"] = round(time.perf_counter() - start, 1)
    if "tok_s" in out:
        figure = f"{out['tok_s']:.1f} tok/s"
    elif "serve_vs_direct" in out:
        figure = f"engine {out['engine_vs_direct']:.0%}, serve {out['serve_vs_direct']:.0%}"
    else:
        figure = f"export {out['export_s']:.1f} s"
    print(
        f"  {kind:<12} {args.get('quant', ''):<7} {figure:>24}   child {out['child_wall_s']} s",
        file=sys.stderr,
    )
    return out


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    versions = {}
    for pkg in ("llama_cpp_python", "torch", "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_1min": round(os.getloadavg()[0], 2),  # above cpus_usable: a shared machine
        "versions": versions,
    }


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def table(results: dict) -> str:
    base = results["transformers_fp32"]
    head = (
        "| configuration | file MB | export s | top-1 after prompt / all | llama.cpp direct tok/s | direct vs fp32 "
        "| our engine tok/s (% of direct: paired; separate) | infer tok/s (% direct) "
        "| serve tok/s (% of direct: paired; separate) | RSS peak MB (direct) "
        "| RSS % of fp32 |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    rows.append(
        f"| transformers fp32 (baseline) | — | — | — | {base['tok_s']:.1f} (transformers) | 1.00x | — | — | — "
        f"| {base['peak_rss_mb']:.0f} | 100% |"
    )
    for q, r in results["quants"].items():
        e, par = r["export"], r["export"]["parity"]
        d = r["direct_tok_s"]
        ours = " | ".join(
            f"{r[k]['tok_s']:.1f} ({r[k]['vs_direct_paired']:.0%}; {r[k]['vs_direct']:.0%})"
            if "vs_direct_paired" in r[k]
            else f"{r[k]['tok_s']:.1f} ({r[k]['vs_direct']:.0%})"
            for k in OURS
        )
        rows.append(
            f"| {q} | {e['file_mb']:.1f} | {e['export_s']:.1f} | {par['top1_last']:.1%} / {par['top1_all']:.1%} "
            f"| {d:.1f} | {d / base['tok_s']:.2f}x | {ours} "
            f"| {r['direct_peak_rss_mb']:.0f} | {r['direct_peak_rss_mb'] / base['peak_rss_mb']:.0%} |"
        )
    return "\n".join(rows)


def detail_table(results: dict) -> str:
    """Every child: its rounds, CPU per wall second, memory."""
    rows = [
        "| configuration | tok/s (rounds) | vs direct: median / best | CPU s per wall s | peak RSS MB "
        "| RSS after MB (anon + files) | torch loaded |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, c: dict) -> str:
        vs = f"{c['vs_direct']:.0%} / {c['vs_direct_best']:.0%}" if "vs_direct" in c else "—"
        if "end_to_end_tok_s" in c:
            vs += f"; end to end {c['end_to_end_tok_s']:.1f} tok/s"
        return (
            f"| {name} | {c['tok_s']:.1f} ({', '.join(f'{x:.1f}' for x in c['rounds_tok_s'])}) | {vs} "
            f"| {', '.join(f'{x:.2f}' for x in c['rounds_cpu_per_wall'])} | {c['peak_rss_mb']:.0f} "
            f"| {c['rss_after_mb']:.0f} ({c['rss_after_anon_mb']:.0f} + {c['rss_after_file_mb']:.0f}) "
            f"| {c['torch_loaded']} |"
        )

    rows.append(row("transformers fp32", results["transformers_fp32"]))
    for q, r in results["quants"].items():
        order = [("direct", r["direct_runs"][0])]
        for i, kind in enumerate(OURS):
            order += [(kind, r[kind]), ("direct", r["direct_runs"][i + 1])]
        rows += [row(f"{q} {kind}", c) for kind, c in order]
    return "\n".join(rows)


def goals(results: dict) -> list[tuple[bool, str]]:
    base = results["transformers_fp32"]
    out = []
    for q, r in results["quants"].items():
        for kind in OURS:
            c = r[kind]
            # engine and serve: the in-process pairs; infer (which opens its own model): the
            # separate children around it
            ratio = c.get("vs_direct_paired", c["vs_direct"])
            how = "median of in-process pairs" if "vs_direct_paired" in c else "medians of separate processes"
            out.append(
                (
                    ratio >= STACK_VS_DIRECT,
                    f"{q} {kind}: {ratio:.0%} of llama.cpp direct, {how} (separate processes "
                    f"{c['vs_direct']:.0%}, best vs best {c['vs_direct_best']:.0%}; goal >= {STACK_VS_DIRECT:.0%})",
                )
            )
        if q in RSS_VS_FP32:
            ratio = r["direct_peak_rss_mb"] / base["peak_rss_mb"]
            out.append(
                (
                    ratio <= RSS_VS_FP32[q],
                    f"{q} peak RSS: {ratio:.0%} of transformers fp32's (goal <= {RSS_VS_FP32[q]:.0%})",
                )
            )
        if q in TOP1_AFTER_PROMPT:
            top1 = r["export"]["parity"]["top1_last"]
            out.append(
                (
                    top1 >= TOP1_AFTER_PROMPT[q],
                    f"{q} top-1 after prompt: {top1:.1%} (goal >= {TOP1_AFTER_PROMPT[q]:.0%})",
                )
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default=",".join(QUANTS), help="comma-separated GGUF types to export and run")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    ap.add_argument(
        "--rounds", type=int, default=3, help="measured answers per configuration, after one warm-up"
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of torch and llama.cpp")
    ap.add_argument(
        "--pairs",
        type=int,
        default=6,
        help="rounds of direct / engine / serve in one process (the goals' ratios)",
    )
    ap.add_argument(
        "--verify-prompts",
        type=int,
        default=100,
        help="prompts of each export's parity check (fewer: a quick try)",
    )
    ap.add_argument("--out", default="bench/results/export.json", help="where the numbers go")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return

    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    common = {"tokens": args.tokens, "rounds": args.rounds, "threads": args.threads}
    started = time.perf_counter()
    results: dict = {
        "machine": machine(),
        "model": MODEL,
        "prompt": PROMPT,
        **common,
        "pairs": args.pairs,
        "quants": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        folder = Path(tmp)
        print("transformers fp32 (baseline)", file=sys.stderr)
        base = spawn("transformers", folder, **common)
        if min(base["tokens"]) < args.tokens:
            print(f"warning: transformers stopped early: {base['tokens']} tokens", file=sys.stderr)
        prompt = base.pop("prompt")
        results["prompt_text"] = prompt
        results["transformers_fp32"] = base
        for q in quants:
            print(q, file=sys.stderr)
            gguf = str(folder / f"{MODEL}.{q}.gguf")
            r: dict = {
                "export": spawn(
                    "export",
                    folder,
                    quant=q,
                    output=gguf,
                    threads=args.threads,
                    verify_prompts=args.verify_prompts,
                )
            }
            run = {**common, "model": gguf, "prompt": prompt, "quant": q}
            # direct, engine, direct, infer, direct, serve, direct: each of ours between two of
            # llama.cpp's own, seconds apart, which share most of this machine's drift.
            r["direct_runs"] = [spawn("direct", folder, **run)]
            for kind in OURS:
                r[kind] = spawn(kind, folder, **run)
                r["direct_runs"].append(spawn("direct", folder, **run))
                around = r["direct_runs"][-2:]
                d = statistics.median(x for c in around for x in c["rounds_tok_s"])
                r[kind]["vs_direct"] = round(r[kind]["tok_s"] / d, 3)
                best = max(x for c in around for x in c["rounds_tok_s"])
                r[kind]["vs_direct_best"] = round(max(r[kind]["rounds_tok_s"]) / best, 3)
            r["paired"] = spawn("paired", folder, **run, pairs=args.pairs)
            for kind in ("engine", "serve"):
                r[kind]["vs_direct_paired"] = r["paired"][f"{kind}_vs_direct"]
            r["direct_tok_s"] = round(
                statistics.median(x for d in r["direct_runs"] for x in d["rounds_tok_s"]), 2
            )
            r["direct_peak_rss_mb"] = max(d["peak_rss_mb"] for d in r["direct_runs"])
            results["quants"][q] = r
    results["total_s"] = round(time.perf_counter() - started, 1)

    print(table(results))
    print()
    print(detail_table(results))
    print()
    checks = goals(results)
    for ok, line in checks:
        print(("PASS " if ok else "FAIL ") + line)
    results["goals"] = [{"pass": ok, "goal": line} for ok, line in checks]
    for q, r in results["quants"].items():
        notes = []
        if not r["engine"]["same_prompt"]:
            notes.append("our engine rendered another prompt than transformers")
        short = {k: r[k]["tokens"] for k in ("engine", "infer", "serve")} | {
            "direct": r["direct_runs"][0]["tokens"]
        }
        if any(min(t) < args.tokens for t in short.values()):
            notes.append(f"fewer than {args.tokens} tokens: {short}")
        starved = [
            kind
            # infer's rounds include its single-threaded model load: its share is lower anyway
            for kind, c in [("direct", d) for d in r["direct_runs"]]
            + [(k, r[k]) for k in ("engine", "serve")]
            if min(c["rounds_cpu_per_wall"]) < 0.85 * args.threads
        ]
        if starved:
            notes.append(
                f"rounds with under 85% of {args.threads} CPUs (shared machine): {', '.join(starved)}"
            )
        if notes:
            print(f"note {q}: " + "; ".join(notes))
    print(f"total {results['total_s']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
