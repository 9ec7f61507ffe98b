"""Learning from preferences on CPU: our DPO against TRL's DPOTrainer driven directly, the memory
of LoRA DPO against LoRA SFT, and how many judge calls `prefer` keeps in flight.

    .venv/bin/python bench/bench_align.py [--threads 2] [--steps 6] [--rounds 2] [--out bench/results/align.json]

1. Step speed. `alpaca-forge train --method dpo --tune lora` on the embedded SmolLM2-135M, and
   TRL 1.16's DPOTrainer built here by hand on the same model, LoRA settings, batch, pairs (the
   same token ids: TRL's own dataset preparation is skipped, since it cannot take ids), reference
   log-probs precomputed by both, the same step timer. Compared: the median step time (best of
   the rounds, which alternate the two). Goal: ours >= 0.95x TRL's speed.
2. Peak memory. LoRA DPO and LoRA SFT on the same data sizes (SFT learns prompt + chosen of each
   pair, padded batches of as many items as DPO has pairs), each in a process of its own; peak
   RSS (ru_maxrss). Goal: DPO <= 1.15x SFT.
3. Judge calls in flight. `prefer` with a judge on an OpenAI-compatible server (our scripted
   loopback judge answering after 50 ms) and --judge-batch-size 32: the most requests the server
   held at once and the judgements per second while judging. Goal: 32 in flight, >= 80% of
   32 / 50 ms.

About 6-8 minutes on 2 cores. Numbers go to the --out JSON file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the scripted judge and the tiny model builders

from machine import describe, write_results  # noqa: E402  (bench/ is this script's folder)

MODEL = "smollm2-135m-instruct"
CORPUS = REPO / "tests" / "fixtures" / "data" / "corpus" / "small.alpaca.jsonl.gz"
GOALS = {"dpo_speed_vs_trl": 0.95, "dpo_rss_vs_sft": 1.15, "judge_throughput_share": 0.8}


def corpus_pairs(n: int) -> list[dict]:
    """n pairs from the vendored corpus: a record's own answer chosen, the next record's rejected."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    pairs = []
    for i in range(n):
        a, b = rows[i], rows[(i + 1) % len(rows)]
        pairs.append(
            {
                "id": str(i),
                "instruction": a["instruction"],
                "input": a.get("input", ""),
                "chosen": a["output"],
                "rejected": b["output"],
            }
        )
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_settings(data: Path, output: Path, steps: int, threads: int, batch: int, seq: int) -> dict:
    return {
        "model": MODEL,
        "data": str(data),
        "output": str(output),
        "method": "dpo",
        "tune": "lora",
        "max_steps": steps + 1,
        "batch_size": batch,
        "max_seq_len": seq,
        "save_steps": 100_000,
        "logging_steps": 100_000,
        "warmup_ratio": 0.0,
        "lr_schedule": "constant",
        "threads": threads,
        "report_to": "none",
        "dtype": "float32",
    }


def ours(settings: dict) -> float:
    """One `alpaca-forge train --method dpo --tune lora` run in this process: its median step."""
    from alpaca_forge.train import TrainConfig, run

    result = run(TrainConfig(**settings), progress=False)
    shutil.rmtree(settings["output"], ignore_errors=True)
    return float(result.summary["median_step_s"])


def trl_direct(settings: dict) -> float:
    """TRL's DPOTrainer by hand on what our setup prepares (model, LoRA config, token ids)."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from alpaca_forge.train import TrainConfig
    from alpaca_forge.train.batching import TokenCounts
    from alpaca_forge.train.callbacks import StepTimer
    from alpaca_forge.train.pair_setup import prepare_pairs

    config = TrainConfig(**settings)
    prep = prepare_pairs(config, resume=False)

    class IdsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, name):  # already token ids
            return dataset

    args = DPOConfig(
        output_dir=settings["output"],
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.resolved_learning_rate(),
        max_steps=config.max_steps,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=100_000,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
        data_seed=config.seed,  # as ours: the same pairs in the same order, so the same lengths per step
        optim="adamw_torch_fused",  # as ours
        bf16=False,  # as ours (--dtype float32); TRL's own default is bf16 autocast
        gradient_checkpointing=False,
        max_length=None,
        precompute_ref_log_probs=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        beta=0.1,
        loss_type=["sigmoid"],
    )
    timer = StepTimer(TokenCounts())
    trainer = IdsDPOTrainer(
        model=prep.model,
        args=args,
        train_dataset=prep.train_set,
        processing_class=prep.tokenizer,
        peft_config=prep.peft_config,
        callbacks=[timer],
    )
    assert trainer.ref_model is None  # the adapter-disabled base, as ours
    trainer.remove_callback(PrinterCallback)  # as ours: no log dicts on stdout
    trainer.train()
    shutil.rmtree(settings["output"], ignore_errors=True)
    seconds = sorted(s for s, _ in timer.steps)
    return seconds[len(seconds) // 2]


def step_speed(work: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    data = write_jsonl(work / "pairs.jsonl", corpus_pairs(args.batch * (args.steps + 1)))
    mine, theirs = [], []
    for r in range(args.rounds):  # the order alternates: neither always runs on a warmer machine
        s = dpo_settings(data, work / f"ours-{r}", args.steps, args.threads, args.batch, args.seq)
        t = dpo_settings(data, work / f"trl-{r}", args.steps, args.threads, args.batch, args.seq)
        if r % 2:
            theirs.append(trl_direct(t))
            mine.append(ours(s))
        else:
            mine.append(ours(s))
            theirs.append(trl_direct(t))
        print(f"DPO step, round {r + 1}: ours {mine[-1]:.3f} s, TRL direct {theirs[-1]:.3f} s", flush=True)
    ratio = min(theirs) / min(mine)  # speed: ours over theirs
    return {
        "batch_pairs": args.batch,
        "max_seq_len": args.seq,
        "timed_steps": args.steps + 1,
        "ours_median_step_s": [round(x, 4) for x in mine],
        "trl_direct_median_step_s": [round(x, 4) for x in theirs],
        "speed_ours_over_trl": round(ratio, 3),
        "goal": f">= {GOALS['dpo_speed_vs_trl']}",
        "met": ratio >= GOALS["dpo_speed_vs_trl"],
    }


# ---------------------------------------------------------------------------------------------
# 2. Peak memory, each run in its own process

_PEAK = (
    "import resource, sys\n"
    "from alpaca_forge.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
    "sys.exit(code)\n"
)


def peak_rss_mb(cli_args: list[str]) -> float:
    r = subprocess.run(
        [sys.executable, "-c", _PEAK, *cli_args], capture_output=True, text=True, timeout=900, cwd=REPO
    )
    if r.returncode != 0:
        raise SystemExit(f"train failed: {' '.join(cli_args)}\n{r.stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return kb / 1024


def memory(work: Path, args: argparse.Namespace) -> dict:
    pairs = corpus_pairs(args.batch * (args.steps + 1))
    data = write_jsonl(work / "mem-pairs.jsonl", pairs)
    sft = write_jsonl(
        work / "mem-sft.jsonl",
        [{"instruction": p["instruction"], "input": p["input"], "output": p["chosen"]} for p in pairs],
    )
    common = [
        "-q", "train", "--model", MODEL, "--max-steps", str(args.steps + 1), "--batch-size", str(args.batch),
        "--max-seq-len", str(args.seq), "--save-steps", "100000", "--report-to", "none",
        "--threads", str(args.threads), "--dtype", "float32",
    ]  # fmt: skip
    dpo_mb = peak_rss_mb([*common, "--method", "dpo", "--tune", "lora", "--data", str(data), "--output", str(work / "m-dpo")])
    print(f"peak RSS, LoRA DPO: {dpo_mb:.0f} MB", flush=True)
    sft_mb = peak_rss_mb(
        [*common, "--method", "lora", "--batching", "padded", "--data", str(sft), "--output", str(work / "m-sft")]
    )
    print(f"peak RSS, LoRA SFT: {sft_mb:.0f} MB", flush=True)
    ratio = dpo_mb / sft_mb
    return {
        "items_per_step": args.batch,
        "lora_dpo_peak_rss_mb": round(dpo_mb, 1),
        "lora_sft_peak_rss_mb": round(sft_mb, 1),
        "dpo_over_sft": round(ratio, 3),
        "goal": f"<= {GOALS['dpo_rss_vs_sft']}",
        "met": ratio <= GOALS["dpo_rss_vs_sft"],
    }


# ---------------------------------------------------------------------------------------------
# 3. prefer's judge calls in flight


def judge_in_flight(work: Path, args: argparse.Namespace) -> dict:
    from alpaca_forge import get_format, save_model
    from alpaca_forge.cli import main
    from fake_judge import FakeJudge, fewer_words, slow_judge

    from conftest import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tiny = save_model(build_tiny_model(tok), tok, work / "tiny", get_format("alpaca"))
    items = write_jsonl(
        work / "items.jsonl", [{"instruction": f"Write about topic {k}.", "input": ""} for k in range(args.items)]
    )
    policy, seen = slow_judge(fewer_words, args.judge_delay)
    out = work / "pairs.jsonl"
    with FakeJudge(policy) as url:
        code = main(
            [
                "-q", "prefer", "--model", str(tiny), "--input", str(items), "--output", str(out),
                "--samples", "8", "--temperature", "1.0", "--max-new-tokens", "16",
                "--judge-engine", "openai", "--judge-base-url", url, "--judge-model", "fake-judge",
                "--judge-batch-size", "32",
            ]
        )  # fmt: skip
    assert code == 0, code
    s = json.loads(out.with_name("pairs.summary.json").read_text())
    span = (seen.last or 0) - (seen.first or 0)
    rate = seen.served / span if span else 0.0
    ideal = 32 / args.judge_delay
    print(f"prefer's judge: {seen.most} in flight at most, {rate:.0f} judgements/s (ideal {ideal:.0f})", flush=True)
    return {
        "judge_delay_s": args.judge_delay,
        "judge_batch_size": 32,
        "judgements": seen.served,
        "judgements_in_summary": s["judgements_asked"],
        "most_in_flight": seen.most,
        "judging_s": round(span, 2),
        "judgements_per_s": round(rate, 1),
        "ideal_per_s": round(ideal, 1),
        "share_of_ideal": round(rate / ideal, 3),
        "goal": f"32 in flight, >= {GOALS['judge_throughput_share']:.0%} of 32 / delay",
        "met": seen.most == 32 and rate / ideal >= GOALS["judge_throughput_share"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for every run")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (one more runs first)")
    ap.add_argument("--rounds", type=int, default=2, help="times the speed comparison is repeated, alternating")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step (SFT: records per step)")
    ap.add_argument("--seq", type=int, default=256, help="--max-seq-len of every run")
    ap.add_argument("--items", type=int, default=24, help="instructions prefer judges (8 answers each)")
    ap.add_argument("--judge-delay", type=float, default=0.05, help="seconds the judge takes per request")
    ap.add_argument("--only", choices=["speed", "memory", "judge"], action="append", help="run only these parts")
    ap.add_argument("--out", type=Path, default=Path("bench/results/align.json"))
    args = ap.parse_args()
    import torch

    parts = args.only or ["speed", "memory", "judge"]
    results: dict = {"machine": describe(), "threads": args.threads, "torch": torch.__version__, "model": MODEL}
    import trl

    results["trl"] = trl.__version__
    work = Path(tempfile.mkdtemp(prefix="bench-align-"))
    started = time.perf_counter()
    try:
        if "judge" in parts:
            results["prefer_judge_in_flight"] = judge_in_flight(work, args)
        if "speed" in parts:
            results["dpo_step_vs_trl"] = step_speed(work, args)
        if "memory" in parts:
            results["dpo_vs_sft_peak_rss"] = memory(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["bench_wall_s"] = round(time.perf_counter() - started, 1)
    results["goals_met"] = all(v.get("met", True) for v in results.values() if isinstance(v, dict))
    write_results(args.out, results)
    print(readme_rows(results))
    return 0


def readme_rows(r: dict) -> str:
    """The README's table rows for these numbers."""
    rows = ["| measure | figure | goal |", "| --- | --- | --- |"]
    if "dpo_step_vs_trl" in r:
        s = r["dpo_step_vs_trl"]
        rows.append(
            f"| LoRA DPO step, ours vs TRL's DPOTrainer direct ({s['batch_pairs']} pairs x {s['max_seq_len']} tokens) "
            f"| {min(s['ours_median_step_s']):.2f} s vs {min(s['trl_direct_median_step_s']):.2f} s "
            f"({s['speed_ours_over_trl']:.2f}x) | {s['goal']} |"
        )
    if "dpo_vs_sft_peak_rss" in r:
        m = r["dpo_vs_sft_peak_rss"]
        rows.append(
            f"| peak RSS, LoRA DPO vs LoRA SFT | {m['lora_dpo_peak_rss_mb']:.0f} MB vs {m['lora_sft_peak_rss_mb']:.0f} MB "
            f"({m['dpo_over_sft']:.2f}x) | {m['goal']} |"
        )
    if "prefer_judge_in_flight" in r:
        j = r["prefer_judge_in_flight"]
        rows.append(
            f"| prefer's judge calls ({j['judge_delay_s'] * 1000:.0f} ms each, --judge-batch-size 32) "
            f"| {j['most_in_flight']} in flight, {j['judgements_per_s']:.0f}/s ({j['share_of_ideal']:.0%} of "
            f"{j['ideal_per_s']:.0f}/s) | {j['goal']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
