"""Where a model runs and in which dtype: one policy for generation (`pick_device`, `pick_dtype`)
and training (`training_precision`), bf16 on a GPU that has it, fp32 elsewhere.

A CPU's own bf16 support is read from its flags (`/proc/cpuinfo`): without AVX512-BF16 or AMX,
bf16 matrix products are emulated and far slower than fp32, which training warns about.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> Any:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {device!r} asked for, but no CUDA GPU is available", "use --device cpu (or auto)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            f"device {device!r} asked for, but MPS is not available", "use --device cpu (or auto)"
        )
    return dev


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_dtype(dtype: str, device: Any) -> Any:
    """`auto` is bf16 on a GPU that supports it, else fp32 (fp16 is only ever an explicit choice)."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def training_precision(dtype: str) -> tuple[str, Any]:
    """(device type, autocast dtype or None for fp32) for training: the same policy as `pick_dtype`
    (bf16 on a GPU that has it, fp32 elsewhere), plus what only training needs (fp16 loss scaling
    runs on CUDA alone)."""
    import torch

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        return ("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else None) if cuda else ("cpu", None)
    if dtype == "float16":
        if not cuda:
            raise UserError(
                "float16 training needs a CUDA GPU (it relies on loss scaling, which runs there)",
                "on a CPU use --dtype bfloat16 or float32",
            )
        return "cuda", torch.float16
    if dtype == "bfloat16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16", "use --dtype float16 (loss-scaled) or float32")
        if not cuda and cpu_has_native_bf16() is False:
            log.warning(
                "warning: this CPU has no bfloat16 instructions (no AVX512-BF16 or AMX): bfloat16 "
                "matrix products are emulated and run far slower than float32 (130x, measured on an "
                "AVX2 EPYC); use --dtype float32 here"
            )
        return ("cuda" if cuda else "cpu"), torch.bfloat16
    return ("cuda" if cuda else "cpu"), None


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16); None where
    the CPU's flags cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = {
        word
        for line in text.splitlines()
        if line.lower().startswith(("flags", "features"))
        for word in line.split(":", 1)[-1].split()
    }
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
