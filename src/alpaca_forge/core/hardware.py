"""What a run takes of the machine: accelerators' peak throughput and the model FLOPs utilisation
(MFU) a training run reaches, and this process's peak resident memory.

MFU = k x parameters x tokens per second / (peak FLOP/s of the devices), with k = 6 for a full
fine-tune (forward 2, backward 4 per parameter and token) and 4 for LoRA/QLoRA (the frozen
weights get no weight gradient, saving a third). Used by `train` (measured) and `run` (forecast).
Peak memory is what `export diff | recover` report, to show that they stream.
"""

from __future__ import annotations

import sys

BYTES_PER_MB = 1_000_000  # decimal MB, as Hugging Face counts "MB" in max_shard_size

# Dense bf16 peak TFLOP/s (fp32 for the CPU), without sparsity, from the makers' data sheets.
PEAK_TFLOPS = {
    "cpu": 0.2,  # 2 AVX2 cores: 2 FMA units x 8 fp32 lanes x 2 FLOPs x ~3 GHz each
    "a10": 125.0,
    "l4": 121.0,
    "rtx3090": 71.0,
    "rtx4090": 165.0,
    "l40s": 362.0,
    "a100": 312.0,
    "h100": 989.0,  # SXM
    "h200": 989.0,
}
# How CUDA names them (torch.cuda.get_device_name), most specific first.
_DEVICE_NAMES = (
    ("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("l40s", "l40s"), ("a10", "a10"),
    ("l4", "l4"), ("4090", "rtx4090"), ("3090", "rtx3090"),
)  # fmt: skip


def flops_per_token_factor(method: str) -> int:
    return 6 if method == "full" else 4


def peak_tflops_of(device_name: str) -> float | None:
    """The bf16 peak of a CUDA device by its name, or None for one not in the table."""
    name = device_name.lower()
    for needle, key in _DEVICE_NAMES:
        if needle in name:
            return PEAK_TFLOPS[key]
    return None


def mfu(tokens_per_s: float, parameters: int, method: str, peak_tflops: float, processes: int = 1) -> float:
    """The share of the devices' peak that k x parameters x tokens/s is."""
    return flops_per_token_factor(method) * parameters * tokens_per_s / (peak_tflops * 1e12 * processes)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / BYTES_PER_MB if sys.platform == "darwin" else peak * 1024 / BYTES_PER_MB  # bytes / KiB
