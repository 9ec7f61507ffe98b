"""A peft LoRA adapter -> a GGUF LoRA adapter, which llama.cpp applies to its base at load time
(`llama-server -m base.gguf --lora adapter.gguf`, `Llama(model_path=..., lora_path=...)`, Ollama's
`ADAPTER`): megabytes to ship per fine-tune instead of a whole model.

The file, as llama.cpp's loader (src/llama-adapter.cpp) reads it:

- `general.type` = "adapter", `adapter.type` = "lora", `general.architecture` = the base's (a
  file for another architecture is refused at load), `adapter.lora.alpha`;
- per adapted matrix W, the pair `<W's GGUF name>.lora_a` and `.lora_b`: peft's lora_A (r, in)
  and lora_B (out, r) as they are, so llama.cpp computes W x + scale * B (A x), with
  scale = alpha / r, r read from the tensor's shape.

peft scales by alpha / r too, or by alpha / sqrt(r) with rsLoRA, and may give modules their own
rank or alpha (rank_pattern / alpha_pattern). One alpha goes into the file; whatever a module's
peft scale differs from alpha_file / r by is folded into its lora_b (a module's rank is read from
its tensors, as llama.cpp does). Llama's Q/K rows are permuted
in the base GGUF (to_gguf.permute_rows): lora_b's rows of q_proj and k_proj are the output rows,
so they are permuted the same way; lora_a (the input side) stays.

What a GGUF LoRA cannot carry is refused before any work: DoRA, modules saved whole
(modules_to_save), LoRA on the embedding, bias terms, an adapter for another base.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.models import adapter_facts, weights_fingerprint

log = logging.getLogger("alpaca_forge")

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PAIR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
_EMBEDDING = re.compile(r"\.lora_embedding_[AB]$")


@dataclass(frozen=True)
class AdapterSpec:
    """adapter_config.json, checked: what the file needs of it."""

    folder: Path
    rank: int
    alpha: float
    rslora: bool
    recorded_base: str | None  # peft's base_model_name_or_path, or what `train` recorded
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def scale(self, module: str, rank: int) -> float:
        """peft's scale for one module (the same pattern rule as peft: a key matches a module
        whose dotted name ends in it)."""
        alpha = next(
            (a for k, a in self.alpha_pattern.items() if re.fullmatch(rf"(.*\.)?({k})", module)),
            self.alpha,
        )
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def file_alpha(self) -> float:
        """The one alpha the file holds: exact for every module of the adapter's own rank."""
        return self.alpha * math.sqrt(self.rank) if self.rslora else self.alpha


@dataclass(frozen=True)
class LoraPair:
    module: str  # "model.layers.0.self_attn.q_proj"
    gguf_name: str  # "blk.0.attn_q.weight"; the file holds it + ".lora_a" / ".lora_b"
    a: Any  # torch tensor (r, in)
    b: Any  # torch tensor (out, r)
    fold: float  # factor folded into lora_b: peft's scale / llama.cpp's


# ---------------------------------------------------------------------------------------------
# Reading the adapter (before any model loads)


def _refuse(folder: Path, what: str, fix: str) -> UserError:
    return UserError(f"--adapter {folder}: {what}", fix)


def read_adapter(folder: Path) -> AdapterSpec:
    """adapter_config.json read and checked: every feature a GGUF LoRA cannot carry is an error."""
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        raise _refuse(folder, "no such folder", "point --adapter at the folder `train --method lora` wrote")
    if not config_file.is_file():
        raise _refuse(
            folder,
            "not a LoRA adapter folder (no adapter_config.json)",
            "point --adapter at the folder `alpaca-forge train --method lora` (or peft's save_pretrained) wrote",
        )
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise _refuse(folder, f"adapter_config.json is unreadable ({e})", "train the adapter again") from e
    merge = "merge it instead (`alpaca-forge export merge`) and export the merged folder with `export gguf`"
    unsupported = [
        (cfg.get("peft_type", "LORA") != "LORA", f"a {cfg.get('peft_type')} adapter, not LoRA"),
        (bool(cfg.get("use_dora")), "a DoRA adapter (use_dora: true): llama.cpp applies plain LoRA only"),
        (bool(cfg.get("modules_to_save")), f"it saves whole modules ({cfg.get('modules_to_save')})"),
        (cfg.get("bias", "none") != "none" or bool(cfg.get("lora_bias")), "it trains bias terms"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out layers (GPT-2 style Conv1D)"),
        (bool(cfg.get("target_parameters")), "LoRA on parameters (target_parameters)"),
        (bool(cfg.get("trainable_token_indices")), "trainable token embeddings"),
        (bool(cfg.get("layer_replication")), "layer replication"),
    ]
    for bad, what in unsupported:
        if bad:
            raise _refuse(folder, f"{what}: a GGUF LoRA adapter cannot carry it", merge)
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise _refuse(folder, f"no adapter weights ({' or '.join(_WEIGHT_FILES)})", "train the adapter again")
    recorded = adapter_facts(folder).get("base_model") or cfg.get("base_model_name_or_path")
    return AdapterSpec(
        folder,
        int(cfg.get("r", 8)),  # peft's defaults
        float(cfg.get("lora_alpha", 8)),
        bool(cfg.get("use_rslora")),
        recorded,
        {k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
    )


def read_pairs(spec: AdapterSpec) -> dict[str, dict[str, Any]]:
    """module -> {"A": tensor, "B": tensor}, from the adapter's weights file."""
    import torch

    path = next(spec.folder / f for f in _WEIGHT_FILES if (spec.folder / f).is_file())
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    pairs: dict[str, dict[str, Any]] = {}
    embedding = next((k for k in state if _EMBEDDING.search(k.removesuffix(".weight"))), None)
    if embedding:
        raise _refuse(
            spec.folder,
            f"LoRA on the embedding ({embedding}): this export writes LoRA on linear layers only",
            "train with --lora-targets that leave out embed_tokens, or merge it (`export merge`)",
        )
    for key, tensor in state.items():
        m = _PAIR.match(key)
        if not m:
            raise _refuse(
                spec.folder, f"a tensor saved whole with the adapter: {key}", "merge it (`export merge`)"
            )
        pairs.setdefault(m["module"], {})[m["side"]] = tensor
    for module, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            raise _refuse(spec.folder, f"{module} has only lora_{''.join(sides)}", "train the adapter again")
    return pairs


# ---------------------------------------------------------------------------------------------
# Against the base


def _wrong_base(spec: AdapterSpec, base: str, why: str) -> UserError:
    recorded = f" (it records {spec.recorded_base!r})" if spec.recorded_base else ""
    return UserError(
        f"--adapter {spec.folder} does not fit the base model {base}{recorded}: {why}",
        "pass the base the adapter was trained on as --model",
    )


def plan_pairs(spec: AdapterSpec, model: Any, arch: Any, base: str) -> list[LoraPair]:
    """Each LoRA pair named as llama.cpp names its matrix, checked against the base's shapes (and
    against the weights' fingerprint the adapter recorded at training time)."""
    import gguf
    import numpy as np

    recorded = adapter_facts(spec.folder).get("base_fingerprint")
    if recorded and recorded != weights_fingerprint(model):
        raise _wrong_base(spec, base, "it was trained on other base weights (their fingerprints differ)")
    config = model.config
    state = model.state_dict()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plans = []
    for module, sides in sorted(read_pairs(spec).items()):
        a, b = sides["A"], sides["B"]
        weight = module + ".weight"
        if weight not in state:
            raise _wrong_base(spec, base, f"it adapts {module}, which the base does not have")
        out_f, in_f = state[weight].shape
        if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise _wrong_base(
                spec,
                base,
                f"{module} is {tuple(b.shape[:1]) + tuple(a.shape[1:])} in the adapter, "
                f"{(out_f, in_f)} in the base",
            )
        if tied and module == "lm_head":
            raise _refuse(
                spec.folder,
                "LoRA on lm_head, which this base ties to the embedding (its GGUF has no output matrix)",
                "merge it (`export merge`) and export the merged folder",
            )
        name = name_map.get_name(weight, try_suffixes=(".weight",))
        if name is None:
            raise _refuse(
                spec.folder,
                f"llama.cpp's {arch.gguf} has no matrix for {module}",
                "merge it (`export merge`)",
            )
        probe = np.arange(6, dtype=np.float32).reshape(2, 3)
        if not np.array_equal(arch.tensor(weight, probe, config), probe):
            raise _refuse(
                spec.folder,
                f"{module}: {arch.gguf}'s GGUF stores this matrix changed, which an adapter cannot follow",
                "merge it (`export merge`) and export the merged folder",
            )
        rank = a.shape[0]
        fold = spec.scale(module, rank) / (spec.file_alpha() / rank)
        plans.append(LoraPair(module, name, a, b, fold))
    if not plans:
        raise _refuse(spec.folder, "no LoRA weights in the adapter", "train the adapter again")
    return plans


# ---------------------------------------------------------------------------------------------
# The file


def _b_rows(pair: LoraPair, model: Any, arch: Any) -> Any:
    """lora_b as float32, scaled by its fold, Q/K output rows permuted as in the base GGUF."""
    from .to_gguf import permute_rows

    b = pair.b.detach().float().cpu().numpy()
    if pair.fold != 1.0:
        b = b * pair.fold
    leaf = pair.module.rsplit(".", 1)[-1]
    if arch.permute_qk and leaf in ("q_proj", "k_proj"):
        config = model.config
        heads = config.num_attention_heads
        if leaf == "k_proj":
            heads = getattr(config, "num_key_value_heads", None) or heads
        b = permute_rows(b, heads)
    return b


def write_lora_gguf(
    pairs: list[LoraPair],
    spec: AdapterSpec,
    model: Any,
    arch: Any,
    path: Path,
    quant: str,
    *,
    name: str,
    prompt_format: Any = None,
) -> int:
    """Write the adapter as `path`; returns its size in bytes."""
    import gguf

    from ..engines.llamacpp import PROMPT_FORMAT_KEY
    from .to_gguf import tensor_type

    writer = gguf.GGUFWriter(str(path), arch.gguf)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, spec.file_alpha())
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if prompt_format is not None:  # the format the adapter was trained with, for our tools
            writer.add_string(PROMPT_FORMAT_KEY, json.dumps(prompt_format.to_dict()))
        for pair in pairs:
            a = pair.a.detach().float().cpu().numpy()
            for suffix, data in ((".lora_a", a), (".lora_b", _b_rows(pair, model, arch))):
                qtype, _ = tensor_type(pair.gguf_name + suffix, data.shape, quant)
                kind = gguf.GGMLQuantizationType[qtype]
                writer.add_tensor(pair.gguf_name + suffix, gguf.quants.quantize(data, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# `export gguf --adapter`


@dataclass(frozen=True)
class LoraExport:
    """What `export_lora` wrote: runner.run_gguf turns it into its result (and the Modelfile)."""

    bytes: int
    architecture: str
    export_s: float
    parity: Any  # parity.Parity, None with --no-verify
    report: Path | None
    prompt_format: Any


def export_lora(config: Any, out: Path, report_path: Path, *, progress: bool = True) -> LoraExport:
    """The adapter as the GGUF LoRA file `out`, then (unless --no-verify) the parity check:
    --model's f16 GGUF with this adapter applied by llama.cpp, against transformers with the
    adapter merged by peft, on the same token ids; its figures go to `report_path`."""
    import tempfile
    import time

    from ..core.files import refuse_existing, staged_output
    from ..core.models import load_pretrained
    from ..core.prompts import FORMAT_FILE, read_saved_format, resolve_format
    from .lora_base import check_base_gguf
    from .parity import write_report
    from .to_gguf import architecture_of

    spec = read_adapter(Path(config.adapter).expanduser())  # before the base loads
    for path in (out, report_path):
        refuse_existing(path, force=config.force, folder=False)
    model, tokenizer, _ = load_pretrained(config.model)
    model = model.float().eval()  # the merged reference, and a base GGUF of full precision
    arch = architecture_of(model)
    pairs = plan_pairs(spec, model, arch, config.model)
    # The format the adapter was trained on (train saves it beside the adapter), or --format.
    saved = read_saved_format(spec.folder)
    if saved is None and config.format is None:
        raise _refuse(
            spec.folder,
            f"no {FORMAT_FILE}, so which prompt format the adapter was trained on is unknown",
            "pass --format alpaca, --format user-assistant or --format chat (the base's own template), "
            f"the one it was trained on (alpaca-forge train writes {FORMAT_FILE} itself)",
        )
    fmt = resolve_format(config.format, None, saved=saved, tokenizer=tokenizer)
    if config.base_gguf:
        base_gguf = Path(config.base_gguf).expanduser()
        check_base_gguf(base_gguf, arch.gguf, pairs, fmt, tokenizer)
    started = time.perf_counter()
    with staged_output(out, force=config.force, folder=False) as tmp:
        size = write_lora_gguf(
            pairs, spec, model, arch, tmp, config.quant, name=spec.folder.name, prompt_format=fmt
        )
        export_s = time.perf_counter() - started
        parity = None
        if config.verify:
            with tempfile.TemporaryDirectory(prefix=".lora-parity-", dir=out.parent) as scratch:
                parity = _verify(model, tokenizer, fmt, spec, tmp, Path(scratch), config, progress)
    report = write_report(
        report_path,
        parity,
        file=out.name,
        adapter=str(spec.folder),
        model=config.model,
        quant=config.quant,
        bytes=size,
        reference="transformers, float32, the adapter merged by peft; llama.cpp: --model "
        f"as {_base_quant(config.quant)} GGUF with this file applied (lora_path)",
    )
    log.info("wrote %s (LoRA adapter for %s, %s, %.1f MB)", out, config.model, config.quant, size / 1e6)
    return LoraExport(size, arch.gguf, export_s, parity, report, fmt)


def _base_quant(quant: str) -> str:
    return "f32" if quant == "f32" else "f16"


def _verify(
    model: Any,
    tokenizer: Any,
    fmt: Any,
    spec: AdapterSpec,
    adapter_file: Path,
    scratch: Path,
    config: Any,
    progress: bool,
) -> Any:
    """Only the next-token choices are judged: how llama.cpp tokenizes is the base's export's
    concern (`export gguf --model` checks it), and the adapter changes nothing there."""
    from peft import PeftModel

    from ..core.library_noise import peft_call
    from .parity import MINIMUM_TOP1, MINIMUM_TOP1_OTHER, check_parity, describe
    from .to_gguf import write_gguf

    base_file = scratch / "base.gguf"
    base_quant = _base_quant(config.quant)
    write_gguf(model, tokenizer, fmt, base_file, base_quant, name="base", pre_tokenizer=config.pre_tokenizer)
    with peft_call():
        merged = PeftModel.from_pretrained(model, str(spec.folder)).merge_and_unload().eval()
    parity = check_parity(
        merged, tokenizer, fmt, base_file, prompts=config.verify_prompts, progress=progress, lora=adapter_file
    )
    for line in describe(parity, config.quant):
        log.info("%s", line)
    floor = MINIMUM_TOP1.get(config.quant, MINIMUM_TOP1_OTHER)
    if parity.top1_all < floor:
        raise UserError(
            f"--output {config.output}: --model's {base_quant} GGUF with this adapter applied agrees with "
            f"the merged model's next-token choices at only {parity.top1_all:.1%} of {parity.positions} "
            f"positions (a correct {config.quant} adapter reaches {floor:.0%}; nothing was written)",
            "report this as a bug with the adapter's adapter_config.json (--no-verify writes the file regardless)",
        )
    return parity
