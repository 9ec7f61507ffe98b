"""README.md's measured figures, rendered from the benches' results files instead of typed by hand.

    .venv/bin/python bench/readme_figures.py            # rewrite README.md's spans from bench/results/
    .venv/bin/python bench/readme_figures.py --check    # exit 1, listing spans that differ

A figure lives in README.md between `<!-- bench:KEY -->` and `<!-- /bench:KEY -->`, and KEY's
render function below writes it from `bench/results/*.json` (which are committed, so the unit test
tests/test_readme_figures.py can hold README.md to them). Figures typed by hand drift from what
the commands print; these cannot. A span's body is inline text (a sentence, or a table row's cells
between the row's outer pipes: `| <!-- bench:chat -->what | figure<!-- /bench:chat --> |`), or, when
its render has several lines (a whole table), the text between blank lines below and above the
markers, each on its own line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
README = BENCH.parent / "README.md"
SPAN = re.compile(r"<!-- bench:(?P<key>[\w-]+) -->(?P<body>.*?)<!-- /bench:(?P=key) -->", re.DOTALL)

# key -> (results files it reads, render function, whether the span is a block of lines)
RENDERS: dict[str, tuple[tuple[str, ...], Callable[..., str], bool]] = {}


def renders(key: str, *files: str, block: bool = False):
    def register(fn: Callable[..., str]) -> Callable[..., str]:
        RENDERS[key] = (files, fn, block)
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Wording shared by the renders


def cpu(machine: dict) -> str:
    """'AMD EPYC, 2 cores' from a results file's machine (bench/machine.py), and the load average
    where other work shared the cores."""
    name = re.sub(r"\((R|TM|tm)\)|\bCPU\b|@.*$|\d+-Core Processor", "", machine["cpu"])
    cores = machine.get("cpus", machine.get("cpus_usable"))
    text = " ".join(name.split()) + (f", {cores} cores" if cores else "")
    load = machine.get("load_average_1min")
    if cores and load is not None and load > cores:  # the figures are low: say so beside them
        text += f", load average {load:.1f}: shared with other work"
    return text


def rows(*cells: tuple[str, str]) -> str:
    """Table rows' cells for a span that opens in the first row's first cell and closes in the last
    row's last cell."""
    return " |\n| ".join(f"{what} | {figure}" for what, figure in cells)


def goal(met: bool, text: str) -> str:
    """'goal ≥ 20×', with **missed** where the figure beside it falls short."""
    return f"goal {text}" + ("" if met else ": **missed**")


def x(ratio: float, digits: int = 2) -> str:
    return f"{ratio:.{digits}f}×"


# ---------------------------------------------------------------------------------------------
# One render per key


@renders("load", "load.json")
def render_load(r: dict) -> str:
    w, c = r["weights"], r["command"]
    return rows(
        (
            "SmolLM2 load, cached (the embedded GGUF's dense copy): `load_model` vs a bare "
            "`AutoModelForCausalLM.from_pretrained` of the same folder, same process, and the whole "
            f"`alpaca-forge chat` (one line, 1 new token) in a subprocess (`bench/bench_load.py`, "
            f"{cpu(r['machine'])})",
            f"{w['ours_s']:.2f} vs {w['bare_s']:.2f} s for the weights ({x(w['ratio'])}, best of "
            f"{w['rounds']}); the whole command {c['transformers_s']:.1f} s, "
            f"{c['llamacpp_s']:.1f} s with `--engine llamacpp` (medians of {c['rounds']}, Python "
            "imports included)",
        )
    )


@renders("chat", "chat.json")
def render_chat(r: dict) -> str:
    b = r["best_tok_s"]
    return rows(
        (
            f"`chat` stream vs bare `model.generate`, SmolLM2 fp32, {r['tokens']} greedy tokens, same "
            f"process, best of {len(r['rounds']['bare'])} alternating rounds (`bench/bench_chat.py`, "
            f"{cpu(r['machine'])}, {r['threads']} threads)",
            f"{b['stream']:.1f} vs {b['bare']:.1f} tok/s ({x(r['ratio'])})",
        )
    )


@renders("generate", "generate.json")
def render_generate(r: dict) -> str:
    cells = []
    for m in r["methods"]:
        many = m["runs"][-1]
        name = f"`--method {m['method']}`" + (" `--similarity-details`" if m.get("similarity_details") else "")
        first = not cells
        what = (
            f"`generate` against a loopback server with {r['latency_s'] * 1000:.0f} ms latency, "
            f"{r['concurrency']} requests in flight for {many['requests']:,} requests, calls/s against the "
            f"in-flight bound of {r['bound_requests_per_s']:.0f}/s (`bench/bench_generate.py`, {cpu(r['machine'])}): {name}"
            if first
            else f"the same, {name}"
        )
        cells.append(
            (
                what,
                f"{many['calls_per_s']:.1f} calls/s = {m['share_of_bound']:.1%} of the bound for the whole command, "
                f"{m['steady_share_of_bound']:.1%} beyond its first wave "
                + (
                    "(opt-in, no goal)"
                    if m.get("similarity_details")
                    else f"({goal(m['steady_share_of_bound'] >= r['goal'], '≥ ' + format(r['goal'], '.0%'))})"
                )
                + f"; one call alone "
                f"{m['one_call_ms']:.0f} ms, {m['ours_ms_per_call']:.1f} ms of it ours; load {m['load_average_1min_before']}",
            )
        )
    return rows(*cells)


@renders("rouge", "rouge.json")
def render_rouge(r: dict) -> str:
    f, ref = r["full"], r["reference"]
    return rows(
        (
            f"greedy ROUGE-L dedupe (τ {r['threshold']}) of the {f['records']:,}-record corpus "
            f"(`bench/bench_rouge.py`, {cpu(r['machine'])})",
            f"{f['seconds']:.1f} s, exact ({goal(f['seconds'] <= f['target_seconds'], '≤ ' + str(f['target_seconds']) + ' s')}); "
            f"{f['kept']:,} kept",
        ),
        (
            f"the same on a {ref['records']:,}-record sample vs the `rouge-score` package, pair by "
            f"pair on {ref['workers']} processes (same bench)",
            f"{ref['ours_seconds']:.2f} s vs {ref['rouge_score_seconds']:.0f} s "
            f"({ref['speedup']:,.0f}×), kept sets {'identical' if ref['kept_identical'] else 'DIFFERENT'}",
        ),
    )


@renders("decontaminate", "decontaminate.json")
def render_decontaminate(r: dict) -> str:
    w, planted, direct = r["whole_tool"], r["planted"], r["direct_comparison"]
    dropped = ", ".join(f"{planted['dropped'][k]} of {n} {k.replace('_', ' ')}" for k, n in planted["planted"].items())
    return rows(
        (
            f"`data decontaminate` of the {w['records']:,}-record corpus against the {w['eval_items']} "
            f"evaluation instructions ({r['settings']['ngram']}-grams and ROUGE-L > {r['settings']['rouge_l_threshold']}; "
            f"`bench/bench_decontaminate.py`, {cpu(r['machine'])})",
            f"{w['wall_seconds']:.1f} s for the whole command ({goal(w['wall_seconds'] <= w['target_seconds'], '≤ ' + str(w['target_seconds']) + ' s')}); "
            f"{w['dropped']} dropped: the corpus does not overlap the set",
        ),
        (
            "the same with planted overlaps, and against comparing every pair directly (same bench)",
            f"dropped {dropped}; {direct['records']:,} records × {w['eval_items']} items pair by pair: "
            f"{'identical' if direct['identical'] else 'DIFFERENT'} decisions",
        ),
    )


@renders("score", "score.json")
def render_score(r: dict) -> str:
    many = r["runs"][-1]
    return rows(
        (
            f"`data score` against a rating judge with {r['latency_s'] * 1000:.0f} ms latency, {r['concurrency']} "
            f"ratings in flight for {many['records']:,} records (`bench/bench_score.py`, {cpu(r['machine'])})",
            f"{many['ratings_per_s']:.1f} ratings/s = {r['share_of_bound']:.1%} of the in-flight bound for the whole "
            f"command, {r['steady_share_of_bound']:.1%} beyond its first wave "
            f"({goal(r['steady_share_of_bound'] >= r['goal'], '≥ ' + format(r['goal'], '.0%'))}); one rating alone "
            f"{r['one_call_ms']:.0f} ms",
        )
    )


@renders("dedupe-1m", "dedupe_1m.json")
def render_dedupe_1m(r: dict) -> str:
    c, core, g = r["cli"], r["core"], r["goal"]
    met = c["seconds"] <= g["seconds"] and c["peak_rss_mb"] <= g["peak_rss_mb"]
    return rows(
        (
            f"`data dedupe` of {c['records']:,} records (the corpus and seeded word-level edits of it, "
            f"{c['input_mb']} MB gzipped), the command in a subprocess (`bench/bench_dedupe_1m.py`, "
            f"{cpu(c['machine'])})",
            f"{c['seconds'] / 60:.1f} min, peak RSS {c['peak_rss_mb']} MB "
            f"({goal(met, '≤ ' + str(g['seconds'] // 60) + ' min, ≤ ' + str(g['peak_rss_mb'] // 1024) + ' GB')}); "
            f"{c['kept']:,} kept; the streaming engine alone {core['seconds'] / 60:.1f} min, {core['peak_rss_mb']} MB; "
            f"the corpus's own {c['kept_55k']:,} kept {'unchanged' if c['kept_55k_identical'] else 'CHANGED'}",
        )
    )


@renders("train", "train.json")
def render_train(r: dict) -> str:
    out = []
    where = f"`bench/bench_train.py`, {cpu(r['machine'])}, {r['threads']} threads"
    for dtype, d in r["raw_step_4x256"].items():
        what = (
            f"`train`, SmolLM2 full fine-tune, {dtype}, 4×256 tokens per step, vs a plain PyTorch "
            f"forward/backward/AdamW loop, best of {r['rounds']} rounds of {r['timed_steps']} steps "
            f"({where})"
        )
        if isinstance(d, str):
            out.append((what, d))
        else:
            out.append(
                (
                    what,
                    f"{d['alpaca_forge_tokens_per_s']:.0f} vs {d['plain_pytorch_tokens_per_s']:.0f} "
                    f"tok/s ({x(d['ratio'])}; {goal(d['ratio'] >= 0.95, '≥ 0.95×')})",
                )
            )
        where = "same bench"
    b = r["batching_512"]
    pad = {m: statistics.mean(b[m]["padding_share_timed_batches"]) for m in ("packed", "padded")}
    out.append(
        (
            "`train`, SmolLM2, window 512, the corpus's real length mix: packed rows vs the original's "
            "random batches padded to their longest (same bench)",
            f"{b['packed']['real_tokens_per_s']:.1f} vs {b['padded']['real_tokens_per_s']:.1f} real "
            f"tok/s ({x(b['packed_over_padded'])}; {goal(b['packed_over_padded'] >= 1.5, '≥ 1.5×')}); "
            f"padding {pad['packed']:.0%} vs "
            f"{pad['padded']:.0%}",
        )
    )
    return rows(*out)


@renders("export-table", "export.json", block=True)
def render_export_table(r: dict) -> str:
    base = r["transformers_fp32"]
    lines = [
        "| file | size MB | export s | top-1 after the prompt / at every position; largest logit "
        "difference | decode tok/s, llama.cpp alone (× transformers fp32) | our engine / `infer` / "
        "`serve`, % of llama.cpp alone | peak RSS MB (% of fp32) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| transformers fp32 (baseline) | {base['weights_mb']:.0f} (fp32 weights) | — | — "
        f"| {base['tok_s']:.1f} (1.00×) | — | {base['peak_rss_mb']:.0f} (100%) |",
    ]
    for q, d in r["quants"].items():
        e, p = d["export"], d["export"]["parity"]
        ours = " / ".join(
            f"{d[k].get('vs_direct_paired', d[k]['vs_direct']):.0%}" for k in ("engine", "infer", "serve")
        )
        lines.append(
            f"| {q} | {e['file_mb']:.0f} | {e['export_s']:.1f} | {p['top1_last']:.0%} / "
            f"{p['top1_all']:.1%}; {p['max_logit_diff']:.2f} | {d['direct_tok_s']:.1f} "
            f"({d['direct_tok_s'] / base['tok_s']:.2f}×) | {ours} | {d['direct_peak_rss_mb']:.0f} "
            f"({d['direct_peak_rss_mb'] / base['peak_rss_mb']:.0%}) |"
        )
    return "\n".join(lines)


@renders("export-setup", "export.json")
def render_export_setup(r: dict) -> str:
    p = next(iter(r["quants"].values()))["export"]["parity"]
    missed = [g["goal"] for g in r["goals"] if not g["pass"]]
    goals = f"{len(r['goals']) - len(missed)} of {len(r['goals'])} met" + "".join(
        f"; **missed**: {m}" for m in missed
    )
    return (
        f"{cpu(r['machine'])}, {r['threads']} threads, {r['tokens']} greedy tokens of one prompt, "
        f"{r['rounds']} rounds per configuration, the engine's and `serve`'s ratios as the median of "
        f"{r['pairs']} in-process pairs, parity over {p['prompts']} prompts ({p['positions']:,} "
        f"positions), {r['total_s'] / 60:.0f} min in all (`bench/bench_export.py`). Goals: {goals}."
    )


@renders("serve", "serve.json")
def render_serve(r: dict) -> str:
    s, c, k = r["single"], r["concurrent"], r["soak"]
    return rows(
        (
            f"`serve`, one streaming client vs the engine's own `stream()`, SmolLM2, {r['tokens']} "
            f"greedy tokens, {len(s['rounds']['server'])} alternating pairs, clients in the same "
            f"process (`bench/bench_serve.py`, {cpu(r['machine'])})",
            f"medians {s['server_tok_s_median']:.1f} vs {s['direct_tok_s_median']:.1f} tok/s; median "
            f"of pair ratios {x(s['ratio_median_of_pairs'])} ({goal(s['ratio_median_of_pairs'] >= 0.9, '≥ 0.90×')}), "
            "best vs best "
            f"{x(s['ratio_best_vs_best'])}",
        ),
        (
            f"`serve`, {c['clients']} concurrent streaming clients, {r['tokens']} tokens each (same bench)",
            f"{c['aggregate_tok_s']:.0f} tok/s aggregate, {x(c['vs_single'], 1)} one client "
            f"({goal(c['vs_single'] >= 4, '≥ 4×')}), "
            f"largest batch {c['largest_batch']}; time to first token p50 {c['ttft_p50_s']:.2f} s, "
            f"p95 {c['ttft_p95_s']:.2f} s",
        ),
        (
            f"`serve`, {c['clients']} clients asking again and again for {k['seconds']:.0f} s (same bench)",
            f"{k['requests']} requests, {k['errors']} errors; resident memory from after warm-up to the "
            f"end {k['rss_change']:+.1%} ({goal(abs(k['rss_change']) <= 0.05 and k['errors'] == 0, 'within 5%, no errors')})",
        ),
    )


METHODS = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tune"}


@renders("demo", "demo.json")
def render_demo(r: dict) -> str:
    s, g, t, e, x_ = r["stage_s"], r["generate"], r["train"], r["eval"], r["export"]
    return rows(
        (
            "`alpaca-forge run recipes/demo.yaml`, its run directory in a temporary folder, the "
            f"GGUF → dense cache already on the machine (`bench/bench_demo.py`, {cpu(r['machine'])})",
            f"{r['wall_s']:.0f} s — generate {s['generate']:.0f} s ({g['requests']} requests, "
            f"{g['accepted']} records accepted), data {s['data']:.0f} s ({r['data']['records']} "
            f"training records), train {s['train']:.0f} s ({METHODS.get(t['method'], t['method'])}, {t['steps']} steps, "
            f"{t['tokens_per_s']:.0f} tok/s), infer {s['infer']:.0f} s ({r['infer']['before']} + "
            f"{r['infer']['after']} answers), eval {s['eval']:.0f} s ({e['judgements']} verdicts), "
            f"export {s['export']:.0f} s ({x_['quant']} GGUF, parity, speed). Run again with nothing "
            f"changed: every stage skipped, {r['rerun_s']:.0f} s",
        ),
        (
            "the demo's outcome (same bench)",
            f"empty answers: base {e['empty_base']}, fine-tuned {e['empty_tuned']} of {e['items']}; "
            f"the judge: {e['unreadable']} of {e['judgements']} verdicts unreadable, position "
            f"consistency {e['position_consistency']:.0%}, {e['wins']} wins / {e['ties']} ties / "
            f"{e['losses']} losses; {x_['quant']} GGUF {x_['file_mb']:.0f} MB (from "
            f"{x_['source_mb']:.0f} MB), top-1 parity {x_['top1_last']:.0%} after the prompt and "
            f"{x_['top1_all']:.0%} at every position, {x_['tok_s']:.1f} tok/s in llama.cpp",
        ),
    )


# ---------------------------------------------------------------------------------------------
# Spans: find, render, compare, rewrite


def render(key: str, results: Path = RESULTS) -> str:
    """KEY's span body from its results files; KeyError for an unknown key, OSError for a missing file."""
    files, fn, block = RENDERS[key]
    text = fn(*(json.loads((results / f).read_text()) for f in files))
    return f"\n\n{text}\n\n" if block else text


def spans(readme_text: str) -> list[tuple[str, str]]:
    return [(m["key"], m["body"]) for m in SPAN.finditer(readme_text)]


def check(readme_text: str, results: Path = RESULTS) -> list[str]:
    """One line per span that is not what its results render to."""
    problems = []
    for key, body in spans(readme_text):
        if key not in RENDERS:
            problems.append(f"bench:{key}: no render function for this key (known: {', '.join(RENDERS)})")
            continue
        try:
            want = render(key, results)
        except OSError as e:
            problems.append(f"bench:{key}: results missing ({e.filename}): run its bench")
            continue
        if body != want:
            problems.append(
                f"bench:{key}: differs from {', '.join(RENDERS[key][0])}:\n  README: {body!r}\n  results: {want!r}"
            )
    return problems


def rewrite(readme_text: str, results: Path = RESULTS) -> str:
    """The text with every span whose results exist rendered afresh (the others left as they are)."""

    def one(m: re.Match) -> str:
        try:
            body = render(m["key"], results)
        except (KeyError, OSError):
            return m[0]
        return f"<!-- bench:{m['key']} -->{body}<!-- /bench:{m['key']} -->"

    return SPAN.sub(one, readme_text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 listing spans that differ")
    ap.add_argument("--readme", type=Path, default=README, help="the Markdown file whose spans are rendered")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the folder of the benches' JSON files")
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    if not args.check:
        args.readme.write_text(rewrite(text, args.results), encoding="utf-8")
    problems = check(args.readme.read_text(encoding="utf-8"), args.results)
    for line in problems:
        print(line)
    found = len(spans(text))
    print(f"{args.readme}: {found} spans, {found - len(problems)} as rendered from {args.results}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
