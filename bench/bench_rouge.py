"""Greedy ROUGE-L dedupe at scale, against the rouge-score package in the same process.

    .venv/bin/python bench/bench_rouge.py [--reference-sample 2000] [--out bench/results/rouge.json]

1. Our engine dedupes the 55K instructions of ../shared/data/corpus/t0_55k.alpaca.jsonl.gz (τ 0.7).
2. On a seeded random sample of N records (default 2000) among those of at most 30 tokens (Alpaca-
   sized instructions: rouge-score's pure-Python LCS takes minutes on long passages), the same
   greedy pass is run with rouge-score's own scorer on every pair (both cores); the kept sets must
   be identical, and the ratio of the two wall times is printed.
Numbers go to the --out JSON file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from alpaca_forge.core.rouge import rouge_tokens
from alpaca_forge.core.rouge_dedupe import greedy_dedupe
from machine import describe  # bench/ is this script's folder

CORPUS = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "corpus" / "t0_55k.alpaca.jsonl.gz"
)
THRESHOLD = 0.7
_scorer = None


def _max_score(args: tuple[str, list[str]]) -> float:
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    text, kept = args
    return max((_scorer.score(text, k)["rougeL"].fmeasure for k in kept), default=0.0)


def reference_greedy(texts: list[str], workers: int) -> tuple[list[int], int]:
    """The plain algorithm: score each text against every kept one with rouge-score."""
    kept: list[int] = []
    pairs = 0
    with ProcessPoolExecutor(workers) as pool:
        for i, text in enumerate(texts):
            kept_texts = [texts[k] for k in kept]
            chunks = [kept_texts[c::workers] for c in range(workers)]
            best = max(pool.map(_max_score, [(text, c) for c in chunks]))
            pairs += len(kept_texts)
            if best <= THRESHOLD:
                kept.append(i)
            if i % 100 == 99:
                print(
                    f"  reference: {i + 1}/{len(texts)} records, {len(kept)} kept, {pairs} pairs", flush=True
                )
    return kept, pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--reference-sample", type=int, default=2000, help="records for the rouge-score reference run"
    )
    ap.add_argument("--out", default="bench/results/rouge.json", help="where to write the numbers")
    args = ap.parse_args()
    if not CORPUS.is_file():
        print(f"skipped: {CORPUS} is absent (the shared data lies beside the repository)")
        return 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["instruction"] for line in f]

    start = time.perf_counter()
    kept, dropped = greedy_dedupe(texts, THRESHOLD)
    full_s = time.perf_counter() - start
    print(f"ours, all {len(texts)} records: {full_s:.1f} s, kept {len(kept)}, dropped {len(dropped)}")

    short = [t for t in texts if len(rouge_tokens(t)) <= 30]
    sample = random.Random(0).sample(short, min(args.reference_sample, len(short)))
    start = time.perf_counter()
    ours_sample, _ = greedy_dedupe(sample, THRESHOLD)
    ours_s = time.perf_counter() - start
    workers = min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    ref_sample, pairs = reference_greedy(sample, workers)
    ref_s = time.perf_counter() - start
    identical = ours_sample == ref_sample
    print(
        f"sample of {len(sample)} records: ours {ours_s:.2f} s, rouge-score reference {ref_s:.1f} s "
        f"({pairs} pairs, {pairs / ref_s:.0f} pairs/s on {workers} processes): {ref_s / ours_s:.0f}x; "
        f"kept sets identical: {identical} ({len(ours_sample)} kept)"
    )
    results = {
        "machine": {**describe(), "platform": platform.platform()},
        "threshold": THRESHOLD,
        "full": {"records": len(texts), "seconds": round(full_s, 2), "kept": len(kept), "target_seconds": 10},
        "reference": {
            "records": len(sample),
            "ours_seconds": round(ours_s, 3),
            "rouge_score_seconds": round(ref_s, 1),
            "rouge_score_pairs": pairs,
            "workers": workers,
            "speedup": round(ref_s / ours_s, 1),
            "kept_identical": identical,
            "kept": len(ours_sample),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
