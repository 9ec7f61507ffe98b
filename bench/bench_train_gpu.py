"""GPU training throughput of `alpaca-forge train`: a ~1.1B random-initialised Llama (TinyLlama's
shape), bf16, full fine-tune and LoRA, on the real length mix of the 55K corpus.

    python bench/bench_train_gpu.py --corpus PATH.jsonl.gz [--steps 30] [--out bench/results/train_gpu.json]

Each run goes through the real command (`python -m alpaca_forge train`), packed rows of 1,024
tokens, 8 rows per step. Reported: tokens per second over the Trainer's own runtime (every step,
the first included), the steady rate after the first step (from train_summary.json), and MFU = 6 x parameters x tokens/s / the GPU's dense bf16 peak (attention's own
FLOPs left out, so MFU is slightly understated). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_model(folder: Path) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from alpaca_forge import get_format, save_model

    from conftest import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()  # ids < 320; the model keeps a real 32K vocabulary
    model = build_tiny_model(
        tok,
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        initializer_range=0.02,
        tie_word_embeddings=False,
    )
    save_model(model, tok, folder, get_format("alpaca"))
    return sum(p.numel() for p in model.parameters())


def run(model: Path, data: Path, out: Path, method: str, steps: int, compile: bool = False) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "alpaca_forge",
        "-q",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--method",
        method,
        "--max-steps",
        str(steps),
        "--batch-size",
        "8",
        "--max-seq-len",
        "1024",
        "--dtype",
        "bfloat16",
        "--save-steps",
        "100000",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-5" if method == "full" else "1e-4",
        *(["--compile"] if compile else []),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    wall = time.perf_counter() - start
    summary = json.loads((out / "train_summary.json").read_text())
    return {"summary": summary, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="Alpaca JSONL(.gz) with the real length mix")
    ap.add_argument("--records", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default="/tmp/bench-train-gpu")
    ap.add_argument("--out", default="bench/results/train_gpu.json")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return 0
    name = torch.cuda.get_device_name()
    from alpaca_forge.core.hardware import peak_tflops_of

    peak_tflops = peak_tflops_of(name)
    peak = peak_tflops * 1e12 if peak_tflops else None
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if args.corpus.endswith(".gz") else open
    with opener(args.corpus, "rt") as f:
        lines = [next(f) for _ in range(args.records)]
    data = work / "data.jsonl"
    data.write_text("".join(lines))
    params = build_model(work / "llama-1b")
    results = {"gpu": name, "parameters": params, "peak_bf16_flops": peak, "runs": {}}
    for method, compile in (("full", False), ("full", True), ("lora", False), ("lora", True)):
        key = method + ("+compile" if compile else "")
        out = work / f"run-{key}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = run(work / "llama-1b", data, out, method, args.steps, compile)
        s = r["summary"]
        tokens_per_step = s["tokens_seen_this_run"] / max(1, s["steps"])
        tok_s = s["tokens_seen_this_run"] / s["train_runtime_s"]
        flops_per_token = 6 * params if method == "full" else 4 * params  # LoRA: no weight gradients
        mfu = tok_s * flops_per_token / peak if peak else None
        results["runs"][key] = {
            "steps": s["steps"],
            "tokens_per_step": round(tokens_per_step),
            "tokens_per_s": round(tok_s),
            "mfu": round(mfu, 3) if mfu else None,
            "first_step_s": s.get("first_step_s"),
            "median_step_s": s.get("median_step_s"),
            "steady_tokens_per_s": s.get("steady_tokens_per_s"),
            "steady_mfu": round(s["steady_tokens_per_s"] * flops_per_token / peak, 3)
            if peak and s.get("steady_tokens_per_s")
            else None,
            "summary_mfu": s.get("mfu"),  # what train itself reports on CUDA
            "peak_gpu_memory_gb": s.get("peak_gpu_memory_gb"),
            "setup_s": s.get("setup_s"),
            "save_s": s.get("save_s"),
            "padding_share": s["padding_share"],
            "train_runtime_s": s["train_runtime_s"],
            "wall_s": round(r["wall_s"], 1),
        }
        print(key, json.dumps(results["runs"][key]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
