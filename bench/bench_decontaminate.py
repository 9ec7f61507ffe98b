"""`data decontaminate` at scale: the 55K T0 corpus against the 252 user-oriented evaluation
instructions, and planted overlaps found.

    .venv/bin/python bench/bench_decontaminate.py [--sample 1000] [--out bench/results/decontaminate.json]

1. The whole tool (`run_decontaminate`: read both files, check, write the kept records and the
   dropped listing) on ../shared/data/corpus/t0_55k.alpaca.jsonl.gz vs
   ../shared/data/eval/user_oriented_instructions.jsonl, default settings (instruction + input,
   13-gram, ROUGE-L F1 > 0.7): wall and CPU seconds, and the counts. Target: <= 10 s on 2 cores.
2. Planted: 40 evaluation items copied with a few words changed, 40 with a 13-word run of theirs
   inside a long unrelated text, and 40 near misses (F1 at most 0.7, no 13-gram), added to the
   corpus: how many of each the check drops.
3. On a seeded sample of --sample corpus records plus the planted ones, every (record, item) pair
   is scored directly (core.rouge.rouge_l and a plain n-gram set): the decisions must be identical.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from alpaca_forge.core.rouge import rouge_l, rouge_tokens
from alpaca_forge.data import DecontaminateConfig, run_decontaminate
from alpaca_forge.data.decontaminate import compared_text, decontaminate
from machine import describe, write_results  # bench/ is this script's folder

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CORPUS = SHARED / "corpus" / "t0_55k.alpaca.jsonl.gz"
EVAL = SHARED / "eval" / "user_oriented_instructions.jsonl"
NGRAM, THRESHOLD = 13, 0.7


def eval_texts() -> list[str]:
    texts = []
    for line in EVAL.read_text().splitlines():
        item = json.loads(line)
        for inst in item["instances"]:
            texts.append(compared_text(item["instruction"], inst.get("input", ""), "instruction+input"))
    return texts


def plant(against: list[str], corpus: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    """(texts, kinds): near copies, embedded 13-grams, and near misses of evaluation items."""
    texts, kinds = [], []
    long_items = [e for e in against if len(rouge_tokens(e)) >= 20]
    for e in rng.sample(against, 40):  # a few words changed: ROUGE-L still above 0.7
        words = e.split()
        for _ in range(max(1, len(words) // 12)):
            words[rng.randrange(len(words))] = rng.choice(["thing", "please", "quickly", "now"])
        texts.append(" ".join(words))
        kinds.append("near_copy")
    for e in rng.sample(long_items, 40):  # 13 of its words in a row inside a long other text
        t = rouge_tokens(e)
        at = rng.randrange(len(t) - NGRAM + 1)
        filler = rng.choice([c for c in corpus if len(c) > 2000])
        texts.append(filler[:1000] + " " + " ".join(t[at : at + NGRAM]) + " " + filler[1000:2000])
        kinds.append("embedded_13gram")
    misses = 0
    for e in rng.sample(against, len(against)):  # half its words kept, the rest replaced: kept
        if misses == 40:
            break
        words = e.split()
        cut = [w if k % 2 == 0 else "different" for k, w in enumerate(words)]
        text = " ".join(cut)
        if max(rouge_l(text, a) for a in against) <= THRESHOLD and len(words) >= 8:
            texts.append(text)
            kinds.append("near_miss")
            misses += 1
    return texts, kinds


def brute_force(texts: list[str], against: list[str]) -> set[int]:
    grams = set()
    for e in against:
        t = rouge_tokens(e)
        grams |= {tuple(t[p : p + NGRAM]) for p in range(len(t) - NGRAM + 1)}
    dropped = set()
    for i, text in enumerate(texts):
        t = rouge_tokens(text)
        if any(tuple(t[p : p + NGRAM]) in grams for p in range(len(t) - NGRAM + 1)) or max(rouge_l(text, e) for e in against) > THRESHOLD:
            dropped.add(i)
    return dropped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=1000, help="corpus records checked against every pair directly")
    ap.add_argument("--out", default="bench/results/decontaminate.json", help="where to write the numbers")
    args = ap.parse_args()
    if not CORPUS.is_file() or not EVAL.is_file():
        print(f"skipped: {SHARED} is absent (the shared data lies beside the repository)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        config = DecontaminateConfig(file=str(CORPUS), against=(str(EVAL),), output=f"{tmp}/kept.jsonl")
        wall, cpu = time.perf_counter(), time.process_time()
        r = run_decontaminate(config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        listing = [json.loads(line) for line in Path(r.dropped_path).read_text().splitlines()]
    print(
        f"whole tool, {r.records} records vs {sum(r.against.values())} items: {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"(the check itself {r.elapsed_s:.1f} s); kept {r.kept}, dropped {r.dropped} {r.by_method}"
    )
    for d in listing[:10]:
        print(f"  [{d['where']}] {d['method']} F1 {d['rouge_l']}: {d['record']['instruction'][:70]!r}")
        print(f"      ~ {d['against']['id']}: {d['against']['instruction'][:70]!r}")

    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        corpus = [compared_text(row["instruction"], row.get("input", ""), "instruction+input") for row in map(json.loads, f)]
    against = eval_texts()
    rng = random.Random(0)
    planted, kinds = plant(against, corpus, rng)
    texts = corpus + planted
    start = time.perf_counter()
    hits = decontaminate(texts, against, ngram=NGRAM, threshold=THRESHOLD)
    check_s = time.perf_counter() - start
    dropped = {h.index for h in hits}
    found = {
        kind: sum(1 for k, p in zip(kinds, range(len(corpus), len(texts)), strict=True) if k == kind and p in dropped)
        for kind in ("near_copy", "embedded_13gram", "near_miss")
    }
    total = {kind: kinds.count(kind) for kind in found}
    print(f"planted ({check_s:.1f} s for {len(texts)} records): dropped {found} of {total}")

    sample = sorted(rng.sample(range(len(corpus)), args.sample)) + list(range(len(corpus), len(texts)))
    start = time.perf_counter()
    expected = {sample[k] for k in brute_force([texts[i] for i in sample], against)}
    brute_s = time.perf_counter() - start
    ours = dropped & set(sample)
    identical = ours == expected
    print(f"every pair of {len(sample)} records x {len(against)} items compared directly ({brute_s:.0f} s): identical {identical}")

    write_results(
        args.out,
        {
            "machine": describe(),
            "settings": {"key": "instruction+input", "ngram": NGRAM, "rouge_l_threshold": THRESHOLD},
            "whole_tool": {
                "records": r.records,
                "eval_items": sum(r.against.values()),
                "wall_seconds": round(wall, 2),
                "cpu_seconds": round(cpu, 2),
                "check_seconds": round(r.elapsed_s, 2),
                "target_seconds": 10,
                "kept": r.kept,
                "dropped": r.dropped,
                "by_method": r.by_method,
                "eval_items_matched": r.matched_items,
            },
            "planted": {"dropped": found, "planted": total, "check_seconds": round(check_s, 2)},
            "direct_comparison": {"records": len(sample), "identical": identical, "seconds": round(brute_s, 1)},
        },
    )
    ok = identical and found["near_copy"] == total["near_copy"] and found["embedded_13gram"] == total["embedded_13gram"]
    return 0 if ok and found["near_miss"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
