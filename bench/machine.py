"""Which machine a bench ran on, in the same words in every results file.

The README says on what CPU each figure was measured; a figure without its machine cannot be
compared with the next run's.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """cpu (model name), cpus (usable by this process), python, and the 1-minute load average when
    the numbers were written: above the core count, other work shared the machine and the figures
    are low."""
    return {
        "cpu": cpu_name(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def write_results(path: str | Path, result: dict) -> None:
    """`result` as the bench's JSON results file (its folder made), and say where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
