"""GGUF files dequantized once and cached as dense models.

transformers dequantizes a GGUF into a dense model; that takes ~20 s for SmolLM2, so the dense
result is saved once under the cache folder (`cache_root()`), keyed by the file's path, size and
modification time, and later loads read it in under a second. `dense_gguf` gives one answer
either way: the cached folder, or, where no cache can be written, the loaded model held in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseGguf:
    """A GGUF file as a dense model. Normally `folder`, the cache's copy, which loads like any saved
    model; where the cache cannot be written (a read-only home, ALPACA_FORGE_NO_CACHE=1), `folder`
    is None and the model and tokenizer loaded now are held instead."""

    folder: Path | None
    model: Any = None  # transformers PreTrainedModel, dequantized to fp32; only when folder is None
    tokenizer: Any = None  # only when folder is None


def cache_root() -> Path:
    """Where converted models are kept: $ALPACA_FORGE_CACHE, else the XDG cache folder."""
    if os.environ.get("ALPACA_FORGE_CACHE"):
        return Path(os.environ["ALPACA_FORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alpaca-forge"


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


@contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Silence transformers' own bars for steps that take a second (loading or saving dense weights)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Dequantize a GGUF file into a dense fp32 model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("reading %s (GGUF, dequantized once to a dense model)", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(
            f"{gguf}: cannot be loaded as a GGUF model ({e})",
            "check that the file is a complete GGUF of a causal LM",
        ) from e
    clear_gguf_marker(model)
    return model, tokenizer


def clear_gguf_marker(model: Any) -> None:
    """Make a model that transformers loaded from GGUF saveable like any dense model.

    The weights are already dequantized, but the model still carries the GGUF quantizer, whose
    `save_pretrained` refuses with "not serializable". This is the one place that clears it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(model)


def dense_gguf(gguf: Path) -> DenseGguf:
    """The cached dense copy of a GGUF, made now if missing; the loaded pair instead when the
    cache cannot be written (read-only home, ALPACA_FORGE_NO_CACHE=1)."""
    target = _gguf_cache_dir(gguf)
    if (target / ".complete").is_file():
        return DenseGguf(target)
    model, tokenizer = load_gguf(gguf)
    if os.environ.get("ALPACA_FORGE_NO_CACHE"):
        return DenseGguf(None, model, tokenizer)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        with no_hf_progress_bars():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf) + "\n")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
        log.info("cached the dense model in %s (later loads take under a second)", target)
        return DenseGguf(target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning(
            "could not cache the converted model in %s (%s); it will be converted on every load", target, e
        )
        return DenseGguf(None, model, tokenizer)
