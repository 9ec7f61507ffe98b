"""A transformers model -> one GGUF file for llama.cpp, written with the `gguf` package.

What goes into the file, in order:

1. architecture metadata (`llama.*`, `qwen3.*` ...: blocks, widths, heads, RoPE, norm epsilon),
   as the architecture's entry in `gguf_arch.ARCHITECTURES` writes it;
2. the tokenizer: its model type (`gpt2` byte-level BPE, or `llama` SentencePiece-style BPE with
   byte fallback), every token with its type, the merges, the special ids, whether BOS is added,
   the chat template, and the *pre-tokenizer* name (all in `gguf_tokenizer`);
3. our prompt format and its stop strings (`alpaca_forge.*` keys), so `--engine llamacpp` renders
   prompts exactly as training did;
4. the tensors, renamed by the `gguf` package's name map, changed as the architecture says (Q/K
   rows permuted for llama: `permute_rows`), plus the ones it computes (Llama 3's rope_freqs),
   quantised by the `gguf` package's own quantisers (f16, bf16, q8_0, q4_0/1, q5_0/1).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.chat_template import with_chat_template
from ..core.errors import UserError
from ..core.prompts import PromptFormat
from ..engines import SamplingDefaults
from ..engines.llamacpp import PROMPT_FORMAT_KEY, SAMPLING_KEYS
from . import gguf_gemma  # noqa: F401  (registers Gemma 2/3; imported here, not in gguf_arch: no cycle)
from .gguf_arch import ARCHITECTURES, Arch
from .gguf_tokenizer import add_tokenizer

log = logging.getLogger("alpaca_forge")

# Keys of our own in the file (the prompt format's, PROMPT_FORMAT_KEY, is the llama.cpp engine's).
STOP_STRINGS_KEY = "alpaca_forge.stop_strings"


@dataclass(frozen=True)
class TensorPlan:
    """One tensor as it goes into the file."""

    hf_name: str
    gguf_name: str
    qtype: str  # a gguf.GGMLQuantizationType name: F32, F16, BF16, Q8_0, Q4_0 ...
    shape: tuple[int, ...]  # as transformers holds it
    why: str | None = None  # why the type differs from the one asked for


@dataclass
class Written:
    path: Path
    architecture: str
    tokenizer_model: str
    pre_tokenizer: str
    quant: str
    tensors: list[TensorPlan] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # tensors kept wider than asked, and why
    bytes: int = 0


# ---------------------------------------------------------------------------------------------
# The architecture


def architecture_of(model: Any) -> Arch:
    """The registry's entry for a transformers model, checked against what it can write; or an
    error naming what is supported."""
    config = model.config
    names = list(getattr(config, "architectures", None) or [type(model).__name__])
    for name in names:
        if name in ARCHITECTURES:
            ARCHITECTURES[name].check(config)
            return ARCHITECTURES[name]
    supported = ", ".join(f"{k} ({v.gguf})" for k, v in ARCHITECTURES.items())
    raise UserError(
        f"GGUF export does not support this architecture ({', '.join(names) or config.model_type})",
        f"supported: {supported}; for others use llama.cpp's own convert_hf_to_gguf.py on the merged folder",
    )


# ---------------------------------------------------------------------------------------------
# Tensors


def permute_rows(weight: Any, n_head: int) -> Any:
    """(n_head * head_dim, ...) rows reordered from RoPE's half-split layout to interleaved pairs:
    per head, (h0 .. h_{d/2-1}, h_{d/2} .. h_{d-1}) -> (h0, h_{d/2}, h1, h_{d/2+1}, ...)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


# The quantisation asked for -> (type of the big matrices, type of the embedding/output, file type).
# The embedding (tied to the output in small models) is the tensor most hurt by rounding: q8_0
# keeps it at f16 (on SmolLM2 that lifts top-1 agreement with transformers from 93% to 97% for
# 18% more bytes), and the 4- and 5-bit types keep it at q8_0, as llama.cpp's own files do.
_PLANS = {
    "f32": ("F32", "F32", "ALL_F32"),
    "f16": ("F16", "F16", "MOSTLY_F16"),
    "bf16": ("BF16", "BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "F16", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "Q8_0", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "Q8_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "Q8_0", "MOSTLY_Q5_1"),
}


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> tuple[str, str | None]:
    """(type, why it differs from the asked one, or None). Vectors (norms, biases) stay F32, as
    llama.cpp expects; a matrix whose rows do not split into whole blocks falls back to F16."""
    import gguf

    body, embed, _ = _PLANS[quant]
    if len(shape) < 2:
        return "F32", None
    wanted = embed if gguf_name in ("token_embd.weight", "output.weight") else body
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]]
    if shape[-1] % block:
        return (
            "F16",
            f"{gguf_name}: rows of {shape[-1]} are not a multiple of {wanted}'s block of {block}: F16",
        )
    return wanted, None


def plan_tensors(model: Any, arch: Arch, quant: str) -> list[TensorPlan]:
    """What the file will hold, tensor by tensor, read from names and shapes alone (and the
    architecture's computed tensors, which have no hf_name)."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plans = []
    for hf_name, tensor in model.state_dict().items():
        if arch.skip(hf_name) or (tied and hf_name == "lm_head.weight"):
            continue  # not for llama.cpp / the embedding stands in for a tied output
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(
                f"GGUF export: no llama.cpp name for the tensor {hf_name!r} ({arch.gguf})",
                f"this model has parts llama.cpp's {arch.gguf} does not run; export a plain {arch.gguf} model",
            )
        shape = tuple(tensor.shape)
        qtype, why = tensor_type(name, shape, quant)
        plans.append(TensorPlan(hf_name, name, qtype, shape, why))
    for name, data in arch.extra_tensors(config).items():
        plans.append(TensorPlan("", name, "F32", tuple(data.shape)))
    return plans


def tensor_bytes(plan: TensorPlan) -> int:
    """Bytes of a tensor in its GGUF type: whole blocks of `block` values, `size` bytes each."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[plan.qtype]]
    rows = math.prod(plan.shape[:-1])
    return rows * (plan.shape[-1] // block) * size


def tensor_data(model: Any, arch: Arch, plan: TensorPlan, state: dict[str, Any]) -> Any:
    """One tensor as the file stores it: float32, changed as the architecture says (Q/K rows of
    llama permuted), then quantised."""
    import gguf

    config = model.config
    if not plan.hf_name:
        return arch.extra_tensors(config)[plan.gguf_name].astype(np.float32)
    data = state[plan.hf_name].detach().float().cpu().numpy()
    if arch.permute_qk and plan.hf_name.rsplit(".", 2)[-2] in ("q_proj", "k_proj"):
        n_head = config.num_attention_heads
        heads = (
            n_head if ".q_proj." in plan.hf_name else getattr(config, "num_key_value_heads", None) or n_head
        )
        data = permute_rows(data, heads)  # weights and biases alike: their rows are the heads'
    data = arch.tensor(plan.hf_name, data, config)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[plan.qtype])


# ---------------------------------------------------------------------------------------------
# Sampling


def sampling_of(model: Any) -> SamplingDefaults:
    """The sampling the model's authors set in its generation_config.json (what `serve` and vLLM
    fill a request's left-out settings from)."""
    return SamplingDefaults.of_generation_config(
        getattr(model, "generation_config", None), "the model's generation_config.json"
    )


def add_sampling(writer: Any, sampling: SamplingDefaults) -> None:
    """The same settings as the file's general.sampling.* keys, which llama.cpp's own tools and
    our llama.cpp engine (so `serve --engine llamacpp`) take as defaults."""
    for name, value in sampling.as_dict().items():
        if name in SAMPLING_KEYS:
            writer.add_float32(SAMPLING_KEYS[name], float(value))


# ---------------------------------------------------------------------------------------------
# The whole file


def write_gguf(
    model: Any,
    tokenizer: Any,
    prompt_format: PromptFormat,
    path: Path,
    quant: str,
    *,
    name: str,
    pre_tokenizer: str | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Written:
    """Write `model` as `path` (a file that must not exist yet). `quant` is one of `_PLANS`."""
    import gguf

    arch = architecture_of(model)
    plans = plan_tensors(model, arch, quant)
    writer = gguf.GGUFWriter(str(path), arch.gguf)
    try:
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[_PLANS[quant][2]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch.hparams(writer, model.config)
        tokenizer = with_chat_template(tokenizer, prompt_format)  # the template renders our format
        tok_model, pre = add_tokenizer(writer, tokenizer, model.config.vocab_size, pre_tokenizer)
        writer.add_string(PROMPT_FORMAT_KEY, json.dumps(prompt_format.to_dict()))
        if prompt_format.stop_strings:  # for other runtimes; our engine takes them from the format
            writer.add_array(STOP_STRINGS_KEY, list(prompt_format.stop_strings))
        add_sampling(writer, sampling_of(model))
        # Two passes, so memory stays flat whatever the model's size: the header lists every
        # tensor's type and size (known from shapes alone), then each tensor is quantised and
        # written in turn, in the same order.
        for plan in plans:
            writer.add_tensor_info(
                plan.gguf_name,
                plan.shape,
                np.float32,
                tensor_bytes(plan),
                raw_dtype=gguf.GGMLQuantizationType[plan.qtype],
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        state = model.state_dict()
        for plan in plans:
            writer.write_tensor_data(tensor_data(model, arch, plan, state))
            if progress and plan.hf_name:  # computed tensors are not among the model's
                progress(1)
    finally:
        writer.close()
    written = Written(path, arch.gguf, tok_model, pre, quant, plans, [p.why for p in plans if p.why])
    written.bytes = path.stat().st_size
    return written
