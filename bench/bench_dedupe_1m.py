"""Greedy ROUGE-L dedupe of one million records, streamed: time and peak memory.

    .venv/bin/python bench/bench_dedupe_1m.py [--records 1000000] [--out bench/results/dedupe_1m.json]

The records are built from the 55,185 instructions of ../shared/data/corpus/t0_55k.alpaca.jsonl.gz:
first the corpus itself, in its order, then --records minus that many copies of randomly chosen
ones, each with seeded word-level edits (about one word in 30, at least one: a word dropped,
repeated, swapped with its neighbour or replaced by a word of another instruction), so that most
are near-duplicates and not exact copies. They are generated as the dedupe reads them: the input
is a stream, never a list (`core.rouge.greedy_dedupe_stream`).

Checks: greedy keeps a prefix's decisions, so the first 55,185 fates must be the 55K corpus's own
kept set, which must equal the one the engine gave before it streamed (its SHA-256 below, from
`greedy_dedupe` at commit 1c465bb). Time and peak RSS (this process, getrusage) go to --out; the
goal is <= 10 min and <= 3 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from alpaca_forge.core.rouge import greedy_dedupe_stream
from machine import describe  # bench/ is this script's folder

CORPUS = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "corpus" / "t0_55k.alpaca.jsonl.gz"
)
THRESHOLD = 0.7
# The 55K corpus's kept positions at τ 0.7 (12,178 of 55,185) as the list engine gave them at
# 1c465bb: sha256 of json.dumps(kept).
KEPT_55K_SHA256 = "15e99f04eebff19de3b9f3703e805714dba1cf33e615f179edeab29f551cdf22"
KEPT_55K = 12178


def perturbed(texts: list[str], total: int, seed: int = 0) -> Iterator[str]:
    """The corpus, then copies of random instructions with word-level edits, one at a time."""
    yield from texts
    rng = random.Random(seed)
    for _ in range(total - len(texts)):
        words = rng.choice(texts).split()
        for _ in range(max(1, len(words) // 30)):
            if not words:
                break
            at = rng.randrange(len(words))
            op = rng.randrange(4)
            if op == 0 and len(words) > 1:
                del words[at]
            elif op == 1:
                words.insert(at, words[at])
            elif op == 2 and at + 1 < len(words):
                words[at], words[at + 1] = words[at + 1], words[at]
            else:
                other = rng.choice(texts).split()
                if other:
                    words[at] = rng.choice(other)
        yield " ".join(words)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000, help="how many records to dedupe")
    ap.add_argument("--out", default="bench/results/dedupe_1m.json", help="where to write the numbers")
    args = ap.parse_args()
    if not CORPUS.is_file():
        print(f"skipped: {CORPUS} is absent (the shared data lies beside the repository)")
        return 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["instruction"] for line in f]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    from tqdm import tqdm

    kept: list[int] = []
    dropped = 0
    start = time.perf_counter()
    with tqdm(total=args.records, unit="record", file=sys.stderr, mininterval=5) as bar:
        stream = perturbed(texts, args.records)
        for k, fate in greedy_dedupe_stream(stream, THRESHOLD, progress=bar.update):
            if fate is None:
                kept.append(k)
            else:
                dropped += 1
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    head = [k for k in kept if k < len(texts)]
    head_sha = hashlib.sha256(json.dumps(head).encode()).hexdigest()
    same = head_sha == KEPT_55K_SHA256
    print(
        f"{args.records} records: {elapsed:.0f} s ({elapsed / 60:.1f} min), peak RSS {peak_mb} MB "
        f"({rss_before} MB before, the corpus in memory); kept {len(kept)}, dropped {dropped}"
    )
    print(f"the 55K corpus's kept set: {len(head)} kept, identical to the list engine's: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": describe(),
                "threshold": THRESHOLD,
                "records": args.records,
                "seconds": round(elapsed, 1),
                "peak_rss_mb": peak_mb,
                "rss_before_mb": rss_before,
                "kept": len(kept),
                "dropped": dropped,
                "kept_55k": len(head),
                "kept_55k_identical": same,
                "goal": {"seconds": 600, "peak_rss_mb": 3072},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
