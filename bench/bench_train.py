"""CPU training throughput of `alpaca-forge train` on the embedded SmolLM2-135M, against plain PyTorch
and against the original's batching, all in this one process on the same threads.

    .venv/bin/python bench/bench_train.py [--threads 2] [--steps 8] [--rounds 2] [--out bench/results/train.json]

1. Raw step speed. A plain PyTorch loop (forward, backward, torch.optim.AdamW step, zero_grad) on
   batches of 4 x 256 tokens is the baseline. Our trainer then runs on records of the corpus whose
   examples fill the 256-token window exactly, so its batches have the same shape. Compared: the
   median step time of each (best of the rounds, which alternate the two). fp32, and bf16 autocast
   where the CPU has bfloat16 instructions. Goal: ours >= 95% of plain.
2. Packing against the original's batching. The same records from the real length mix of
   ../shared/data/corpus (Alpaca prompt, window 512, 4 items per step) are trained on both ways:
   packed into full rows, and as random batches padded to their longest item (the original's).
   Compared: real (unpadded) tokens per second after the first step, averaged over the rounds
   (each round a new data order). Padded runs take twice the steps, so that they see a fair share
   of the random batches. Goal: packed >= 1.5x padded.

About 15 minutes on 2 cores. Numbers go to the --out JSON file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from machine import describe

CORPUS = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "corpus" / "t0_55k.alpaca.jsonl.gz"
)
MODEL = "smollm2-135m-instruct"


def sample_records(corpus: Path, n: int, seed: int) -> list[dict]:
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return random.Random(seed).sample(rows, n)


def full_window_records(records: list[dict], tok, window: int, need: int) -> list[dict]:
    """Records whose example (prompt + response + EOS, response cut to fit) is exactly `window` long."""
    from alpaca_forge.core.examples import encode_record
    from alpaca_forge.core.prompts import get_format
    from alpaca_forge.core.records import Record

    fmt = get_format("alpaca")
    picked = []
    for i, r in enumerate(records):
        rec = Record(instruction=r["instruction"], input=r.get("input", ""), output=r["output"])
        ex = encode_record(rec, i, tok, fmt, window, False)
        if ex is not None and len(ex.input_ids) == window:
            picked.append(r)
            if len(picked) == need:
                return picked
    raise SystemExit(f"only {len(picked)} records fill a {window}-token window; sample more")


def plain_pytorch(batch: int, seq: int, steps: int, bf16: bool) -> float:
    """Median seconds per step of a bare training loop (steps + 1 run)."""
    import torch

    from alpaca_forge.core.models import load_pretrained

    model, _, _ = load_pretrained(MODEL)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    del model, opt
    return statistics.median(times)


def ours(data: Path, work: Path, steps: int, **flags) -> dict:
    """One `alpaca-forge train` run of steps + 1 steps in this process; its train_summary."""
    from alpaca_forge.train import TrainConfig, run

    out = work / f"run-{len(list(work.iterdir()))}"
    settings = {
        "model": MODEL,
        "data": str(data),
        "output": str(out),
        "max_steps": steps + 1,
        "save_steps": 100_000,
        "logging_steps": 100_000,
        "warmup_ratio": 0.0,
        **flags,
    }
    result = run(TrainConfig(**settings), progress=False)
    shutil.rmtree(out, ignore_errors=True)
    return result.summary


def random_batch_padding(lengths: list[int], batch: int, seed: int, trials: int = 200) -> float:
    """Padding share of the original's batching over many random orders of the whole sample."""
    rng = random.Random(seed)
    real = padded = 0
    for _ in range(trials):
        order = lengths[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch):
            chunk = order[i : i + batch]
            real += sum(chunk)
            padded += max(chunk) * len(chunk)
    return 1 - real / padded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="Alpaca JSONL.gz with the real length mix")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for every run")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (one more runs first)")
    ap.add_argument("--rounds", type=int, default=2, help="times each comparison is repeated, alternating")
    ap.add_argument("--records", type=int, default=3000, help="corpus records sampled (seeded)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = ap.parse_args()
    if not args.corpus.is_file():
        print(f"skipped: {args.corpus} is absent (it comes with ../shared/data)")
        return 0
    import torch

    from alpaca_forge.core.devices import cpu_has_native_bf16
    from alpaca_forge.core.examples import tokenize_records
    from alpaca_forge.core.models import load_tokenizer
    from alpaca_forge.core.prompts import get_format
    from alpaca_forge.core.records import read_records
    from alpaca_forge.train.batching import pack

    torch.set_num_threads(args.threads)
    results: dict = {
        "machine": describe(),
        "threads": args.threads,
        "torch": torch.__version__,
        "model": MODEL,
        "timed_steps": args.steps,
        "rounds": args.rounds,
    }
    records = sample_records(args.corpus, args.records, seed=0)
    tok = load_tokenizer(MODEL)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    started = time.perf_counter()
    try:
        # 1. Raw step speed at 4 x 256.
        full = full_window_records(records, tok, 256, 4 * (args.steps + 1))
        full_path = work / "full256.jsonl"
        full_path.write_text("".join(json.dumps(r) + "\n" for r in full))
        (work / "runs").mkdir()
        raw: dict = {}
        dtypes = [("float32", False)]
        if cpu_has_native_bf16() is False:
            raw["bfloat16"] = "skipped: this CPU has no bfloat16 instructions (emulated bf16 is ~130x slower)"
        else:
            dtypes.append(("bfloat16", True))
        for dtype, bf16 in dtypes:
            plain_s, ours_s = [], []
            for _ in range(args.rounds):
                plain_s.append(plain_pytorch(4, 256, args.steps, bf16))
                s = ours(
                    full_path,
                    work / "runs",
                    args.steps,
                    max_seq_len=256,
                    batch_size=4,
                    dtype=dtype,
                    threads=args.threads,
                )
                assert s["padding_share"] == 0.0 and s["tokens_seen_this_run"] == 4 * 256 * (args.steps + 1)
                ours_s.append(s["median_step_s"])
                print(f"raw step {dtype}: plain {plain_s[-1]:.2f} s, ours {ours_s[-1]:.2f} s")
            plain, mine = 1024 / min(plain_s), 1024 / min(ours_s)
            raw[dtype] = {
                "plain_pytorch_step_s": [round(x, 3) for x in plain_s],
                "alpaca_forge_step_s": [round(x, 3) for x in ours_s],
                "plain_pytorch_tokens_per_s": round(plain, 1),
                "alpaca_forge_tokens_per_s": round(mine, 1),
                "ratio": round(mine / plain, 3),
            }
            print(
                f"raw step {dtype}: plain {plain:.1f} tok/s, ours {mine:.1f} tok/s, ratio {mine / plain:.3f}"
            )
        results["raw_step_4x256"] = raw

        # 2. Packed rows against random batches padded to their longest item, window 512.
        mix_path = work / "mix.jsonl"
        mix_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        examples, _ = tokenize_records(read_records(mix_path), tok, get_format("alpaca"), 512)
        lengths = [len(e.input_ids) for e in examples]
        rates: dict[str, list[float]] = {"padded": [], "packed": []}
        padding: dict[str, list[float]] = {"padded": [], "packed": []}
        for r in range(args.rounds):
            for mode, steps in (("padded", 2 * args.steps), ("packed", args.steps)):
                s = ours(
                    mix_path,
                    work / "runs",
                    steps,
                    max_seq_len=512,
                    batch_size=4,
                    batching=mode,
                    seed=42 + r,
                    threads=args.threads,
                )
                rates[mode].append(s["steady_tokens_per_s"])
                padding[mode].append(s["padding_share"])
                print(f"{mode}: {s['steady_tokens_per_s']:.1f} real tok/s, padding {s['padding_share']:.1%}")
        batching: dict = {
            "examples": len(examples),
            "mean_example_tokens": round(statistics.mean(lengths), 1),
            "padding_share_of_random_batches_whole_sample": round(
                random_batch_padding(lengths, 4, seed=0), 4
            ),
            "packed_rows_padding_share_whole_sample": round(
                1 - sum(lengths) / (512 * len(pack(lengths, 512))), 4
            ),
        }
        for mode in rates:
            batching[mode] = {
                "real_tokens_per_s": round(statistics.mean(rates[mode]), 1),
                "rounds_real_tokens_per_s": rates[mode],
                "padding_share_timed_batches": [round(x, 4) for x in padding[mode]],
            }
        ratio = batching["packed"]["real_tokens_per_s"] / batching["padded"]["real_tokens_per_s"]
        batching["packed_over_padded"] = round(ratio, 3)
        print(f"packed / padded (real tokens per second): {ratio:.2f}x")
        results["batching_512"] = batching
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["bench_wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
