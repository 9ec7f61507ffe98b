"""CPU training throughput of `alpaca-forge train` on the embedded SmolLM2-135M, against plain PyTorch
and against the original's batching, all in this one process on the same threads.

    .venv/bin/python bench/bench_train.py [--threads 2] [--steps 8] [--out bench/results/train.json]

1. Raw step speed. A plain PyTorch loop (forward, backward, torch.optim.AdamW step, zero_grad) on
   batches of 4 x 256 tokens is the baseline. Our trainer then runs on records of the corpus whose
   examples fill the 256-token window exactly, so its batches have the same shape. Both in fp32
   and with bf16 autocast where the CPU has bfloat16 instructions. Goal: ours >= 95% of plain.
2. Packing against the original's batching. The same records from the real length mix of
   ../shared/data/corpus (Alpaca prompt, window 512, 4 items per step) are trained on twice: packed
   into full rows, and as random batches padded to their longest item (the original's). Compared:
   real (unpadded) tokens per second. Goal: packed >= 1.5x padded.

Every rate leaves out the first step (start-up cost). Numbers go to the --out JSON file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "corpus" / "t0_55k.alpaca.jsonl.gz"
)
MODEL = "smollm2-135m-instruct"


def sample_records(corpus: Path, n: int, seed: int) -> list[dict]:
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return random.Random(seed).sample(rows, n)


def full_window_records(records: list[dict], window: int, need: int) -> list[dict]:
    """Records whose example (prompt + response + EOS, response cut to fit) is exactly `window` long."""
    from alpaca_forge import sft
    from alpaca_forge.models import load_tokenizer
    from alpaca_forge.prompts import get_format
    from alpaca_forge.records import Record

    tok = load_tokenizer(MODEL)
    fmt = get_format("alpaca")
    picked = []
    for i, r in enumerate(records):
        rec = Record(instruction=r["instruction"], input=r.get("input", ""), output=r["output"])
        ex = sft.encode_record(rec, i, tok, fmt, window, False)
        if ex is not None and len(ex.input_ids) == window:
            picked.append(r)
            if len(picked) == need:
                return picked
    raise SystemExit(f"only {len(picked)} records fill a {window}-token window; sample more")


def plain_pytorch(batch: int, seq: int, steps: int, bf16: bool) -> float:
    """Tokens per second of a bare training loop, first step left out."""
    import torch

    from alpaca_forge.models import load_pretrained

    model, _, _ = load_pretrained(MODEL)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    start = 0.0
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    del model, opt
    return batch * seq * steps / elapsed


def ours(data: Path, work: Path, steps: int, **flags) -> dict:
    """One `alpaca-forge train` run in this process; its train_summary."""
    from alpaca_forge.train import resolve_config, run

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
    result = run(resolve_config(None, settings), progress=False)
    summary = result.summary
    shutil.rmtree(out, ignore_errors=True)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="Alpaca JSONL.gz with the real length mix")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for every run")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (one more runs first, untimed)")
    ap.add_argument("--records", type=int, default=3000, help="corpus records sampled (seeded)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = ap.parse_args()
    if not args.corpus.is_file():
        print(f"skipped: {args.corpus} is absent (it comes with ../shared/data)")
        return 0
    import torch

    from alpaca_forge.train import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "torch": torch.__version__,
        "model": MODEL,
        "timed_steps": args.steps,
    }
    records = sample_records(args.corpus, args.records, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        # 1. Raw step speed at 4 x 256.
        full = full_window_records(records, 256, 4 * (args.steps + 1))
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
            plain = plain_pytorch(4, 256, args.steps, bf16)
            s = ours(
                full_path,
                work / "runs",
                args.steps,
                max_seq_len=256,
                batch_size=4,
                dtype=dtype,
                threads=args.threads,
            )
            mine = s["steady_tokens_per_s"]
            raw[dtype] = {
                "plain_pytorch_tokens_per_s": round(plain, 1),
                "alpaca_forge_tokens_per_s": round(mine, 1),
                "padding_share": s["padding_share"],
                "ratio": round(mine / plain, 3),
            }
            print(
                f"raw step {dtype}: plain {plain:.1f} tok/s, ours {mine:.1f} tok/s, ratio {mine / plain:.3f}"
            )
        results["raw_step_4x256"] = raw

        # 2. Packed rows against random batches padded to their longest item, window 512.
        mix_path = work / "mix.jsonl"
        mix_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        batching = {}
        for mode in ("padded", "packed"):
            s = ours(
                mix_path,
                work / "runs",
                args.steps,
                max_seq_len=512,
                batch_size=4,
                batching=mode,
                threads=args.threads,
            )
            batching[mode] = {
                "real_tokens_per_s": s["steady_tokens_per_s"],
                "padding_share": s["padding_share"],
                "median_step_s": s["median_step_s"],
                "trained_share": round(s["trained_tokens_this_run"] / s["tokens_seen_this_run"], 4),
                "records_truncated": s["tokenized"]["truncated"],
            }
            print(
                f"{mode}: {s['steady_tokens_per_s']:.1f} real tok/s, padding {s['padding_share']:.1%}, "
                f"median step {s['median_step_s']:.2f} s"
            )
        ratio = batching["packed"]["real_tokens_per_s"] / batching["padded"]["real_tokens_per_s"]
        batching["packed_over_padded"] = round(ratio, 3)
        print(f"packed / padded (real tokens per second): {ratio:.2f}x")
        results["batching_512"] = batching
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
