"""Streamed chat speed on the embedded SmolLM2, against a bare `model.generate` in the same process.

    .venv/bin/python bench/bench_chat.py [--tokens 128] [--rounds 3] [--out bench/results/chat.json]

Both sides decode the same prompt greedily for exactly `--tokens` new tokens (EOS suppressed, so
the length is fixed), fp32 on the CPU. The bare side is `model.generate(...)` on the tokenized
prompt; ours is the transformers engine's `stream()` as `alpaca-forge chat` drives it (worker
thread, streamer, stop-string filter, seeded under its lock). Rounds alternate the two sides and
the best round of each is kept (the 2-core machines vary by ±10% between runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from alpaca_forge import GenerationSettings, Message, load_model
from alpaca_forge.engines.transformers_engine import TransformersEngine
from machine import describe  # bench/ is this script's folder

QUESTION = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each side")
    ap.add_argument("--out", default="bench/results/chat.json", help="where the numbers go")
    args = ap.parse_args()

    lm = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    lm.model.generation_config.suppress_tokens = [lm.tokenizer.eos_token_id]  # fixed length
    engine = TransformersEngine(lm)
    settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0.0, repetition_penalty=1.0)
    conversation = [Message("user", QUESTION)]
    prompt = engine.render(conversation, args.tokens)
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(
                **ids, max_new_tokens=args.tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
            )
        n = out.shape[1] - ids["input_ids"].shape[1]
        return n / (time.perf_counter() - start)

    def ours() -> float:
        stream = engine.stream(conversation, settings)
        for _ in stream:
            pass
        return stream.completion.completion_tokens / stream.elapsed_s

    bare(), ours()  # warm-up: first-call allocations
    rates: dict[str, list[float]] = {"bare": [], "stream": []}
    for _ in range(args.rounds):
        rates["bare"].append(bare())
        rates["stream"].append(ours())
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["stream"] / best["bare"]
    print(
        f"bare model.generate: {best['bare']:.1f} tok/s; alpaca-forge chat stream: {best['stream']:.1f} tok/s"
    )
    print(
        f"ratio {ratio:.3f}x (rounds: bare {[round(x, 1) for x in rates['bare']]}, stream {[round(x, 1) for x in rates['stream']]})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "tokens": args.tokens,
        "rounds": rates,
        "best_tok_s": best,
        "ratio": round(ratio, 4),
        "threads": torch.get_num_threads(),
        "machine": describe(),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
