"""Launched by torchrun from test_train.py: one small `alpaca_forge.train.run` per process, then
each process writes a digest of the weights it ended with (OUTPUT/rank-N.json), so the test can
tell that every rank holds the same model.

    torchrun --nproc_per_node 2 tests/train_ranks.py MODEL DATA OUTPUT
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def digest(named_tensors) -> str:
    """sha256 over every tensor's name and bytes, in name order: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(model: str, data: str, output: str) -> int:
    from alpaca_forge.train import TrainConfig, run

    config = TrainConfig(model=model, data=data, output=output, epochs=1, batch_size=2, save_steps=3)
    result = run(config, progress=False)
    rank = int(os.environ["RANK"])
    about = {"rank": rank, "steps": result.steps, "digest": digest(result.model.named_parameters())}
    (Path(output) / f"rank-{rank}.json").write_text(json.dumps(about) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
