"""`export merge` and `export gguf`: run(config) -> Result, callable from Python.

(`export diff` / `export recover` live in `diff.py`.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import refuse_existing, staged_output, write_text_atomic
from ..core.models import (
    ADAPTER_BASE_FILE,
    adapter_base,
    load_pretrained,
    load_tokenizer,
    merge_adapter,
    resolve_model,
    save_model,
)
from ..core.prompts import FORMAT_FILE, PromptFormat, read_saved_format, resolve_format
from ..engines import SamplingDefaults
from .config import GGUF_K_QUANTS, GgufConfig, MergeConfig
from .parity import Parity, check_parity, describe, judge, write_report

log = logging.getLogger("alpaca_forge")


# ---------------------------------------------------------------------------------------------
# merge


@dataclass(frozen=True)
class MergeResult:
    output: Path
    base: str
    parameters: int
    elapsed_s: float


def run_merge(config: MergeConfig) -> MergeResult:
    """The adapter merged into its base in full precision, saved with tokenizer and prompt format:
    a plain model folder that transformers and vLLM load."""
    start = time.perf_counter()
    adapter = Path(config.adapter).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json)",
            "point --adapter at the folder `alpaca-forge train --method lora` wrote",
        )
    if not (adapter / ADAPTER_BASE_FILE).is_file() and not config.model:
        raise UserError(
            f"--adapter {adapter}: the adapter does not record its base model",
            "name the base with --model",
        )
    base = config.model or adapter_base(adapter)
    refuse_existing(config.output, force=config.force, folder=True)  # before the base loads
    with staged_output(config.output, force=config.force, folder=True) as tmp:
        model, tokenizer = merge_adapter(adapter, base)
        fmt = read_saved_format(adapter) or resolve_format(None, None, saved=None, tokenizer=tokenizer)
        save_model(model, tokenizer, tmp, fmt)
    parameters = sum(p.numel() for p in model.parameters())
    out = Path(config.output).expanduser()
    log.info("merged %s into %s: %s (%.1fM parameters)", adapter, base, out, parameters / 1e6)
    return MergeResult(out, base, parameters, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# gguf


@dataclass(frozen=True)
class GgufResult:
    output: Path
    quant: str
    bytes: int
    architecture: str
    pre_tokenizer: str
    export_s: float  # writing the file (quantising included)
    parity: Parity | None  # None with --no-verify
    report: Path | None  # the parity JSON beside the file
    modelfile: Path | None  # with --ollama
    fallbacks: list[str] = field(default_factory=list)


def check_llama_cpp(config: GgufConfig) -> None:
    """Before any work: what this export needs of llama-cpp-python is installed."""
    needs = []
    if config.quant in GGUF_K_QUANTS:
        needs.append(f"--quant {config.quant} (K-quants are made by llama.cpp's quantizer)")
    if config.verify:
        needs.append("the parity check (it loads the file in llama.cpp)")
    if not needs:
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        from ..engines.llamacpp import INSTALL_HINT

        skip = "; or add --no-verify to skip the check" if config.verify else ""
        plain = (
            "; or use --quant q4_0/q4_1/q5_0/q5_1, which need no compiler"
            if config.quant in GGUF_K_QUANTS
            else ""
        )
        raise UserError(
            f"llama-cpp-python is not installed, and {' and '.join(needs)} needs it",
            INSTALL_HINT + skip + plain,
        ) from e


def gguf_format(config: GgufConfig) -> PromptFormat:
    """The prompt format a GGUF is written for (its chat template, stop strings and our own key).
    A model folder says it in prompt_format.json, or --format does: without either, the folder's
    tokenizer template may be its base's, which the model was never trained on. A model as
    published (a built-in name, a .gguf file, a Hugging Face id) reads its own template."""
    source = resolve_model(config.model)
    saved = read_saved_format(source.location) if source.kind == "dir" else None
    if source.kind == "dir" and saved is None and config.format is None:
        raise UserError(
            f"--model {config.model}: this folder has no {FORMAT_FILE}, so which prompt format the model "
            "was trained on (the GGUF's chat template) is unknown",
            "pass --format chat for a model as published with its own chat template, or --format alpaca "
            "/ --format user-assistant for one trained on that format (alpaca-forge train writes "
            f"{FORMAT_FILE} itself)",
        )
    tokenizer = None
    if (config.format or (saved.name if saved else None)) in (None, "chat"):
        tokenizer = load_tokenizer(config.model)  # the default and `chat` read its template
    fmt = resolve_format(config.format, None, saved=saved, tokenizer=tokenizer)
    if fmt.name == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"--model {config.model}: the 'chat' prompt format writes the model's own chat template into "
            "the GGUF, and this model's tokenizer has none",
            "pass --format alpaca or --format user-assistant, the format the model was trained on",
        )
    return fmt


def sidecar(output: Path, suffix: str) -> Path:
    """`model.q8_0.gguf` -> `model.q8_0.parity.json` / `model.q8_0.Modelfile`."""
    return output.with_name(output.name.removesuffix(".gguf") + suffix)


def run_gguf(config: GgufConfig, *, progress: bool = True) -> GgufResult:
    from tqdm import tqdm

    from .to_gguf import architecture_of, sampling_of, write_gguf

    check_llama_cpp(config)
    out = Path(config.output).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"--output {out}: a GGUF file's name ends in .gguf", f"e.g. --output {out.name}.gguf")
    if config.adapter:  # a GGUF LoRA adapter for --model, not the model itself
        return _lora_gguf(config, out, progress)
    fmt = gguf_format(config)  # before anything loads: its chat template goes into the file
    report_path, modelfile_path = sidecar(out, ".parity.json"), sidecar(out, ".Modelfile")
    for path in [out, report_path] + ([modelfile_path] if config.ollama else []):
        refuse_existing(path, force=config.force, folder=False)  # before minutes of loading
    model, tokenizer, source = load_pretrained(config.model)
    architecture_of(model)  # an unsupported architecture fails before anything is written
    # Tensors are written one at a time from the dtype they are stored in; only the parity check
    # needs the whole model in float32 (its reference logits), about 4 bytes per parameter.
    model = (model.float() if config.verify else model).eval()
    name = Path(source.spec.rstrip("/")).name.removesuffix(".gguf")
    started = time.perf_counter()
    with staged_output(out, force=config.force, folder=False) as tmp:
        with tqdm(
            total=len(model.state_dict()),
            desc=f"gguf {config.quant}",
            unit="tensor",
            disable=not progress,
            leave=False,
        ) as bar:
            if config.quant in GGUF_K_QUANTS:
                written = _k_quant(model, tokenizer, fmt, tmp, config, name, bar.update)
            else:
                written = write_gguf(
                    model,
                    tokenizer,
                    fmt,
                    tmp,
                    config.quant,
                    name=name,
                    pre_tokenizer=config.pre_tokenizer,
                    progress=bar.update,
                )
        export_s = time.perf_counter() - started
        parity = None
        if config.verify:
            parity = check_parity(
                model, tokenizer, fmt, tmp, prompts=config.verify_prompts, progress=progress
            )
            for line in describe(parity, config.quant):
                log.info("%s", line)
            problems = judge(parity, config.quant)
            if problems:
                raise UserError(
                    f"--output {out}: the exported file does not answer like the model: "
                    + "; ".join(problems)
                    + " (nothing was written)",
                    "if the tokens differ, pass the right --pre-tokenizer; otherwise report this as a bug with "
                    "the model's config.json (--no-verify writes the file regardless)",
                )
    report = write_report(
        report_path,
        parity,
        file=out.name,
        model=config.model,
        quant=config.quant,
        bytes=written.bytes,
        reference="transformers, float32, the same token ids",
    )
    modelfile = (
        write_text_atomic(modelfile_path, ollama_modelfile(out, fmt, sampling=sampling_of(model)))
        if config.ollama
        else None
    )
    log.info(
        "wrote %s (%s, %.1f MB, %s, pre-tokenizer %s) in %.1f s",
        out,
        config.quant,
        written.bytes / 1e6,
        written.architecture,
        written.pre_tokenizer,
        export_s,
    )
    return GgufResult(
        out,
        config.quant,
        written.bytes,
        written.architecture,
        written.pre_tokenizer,
        export_s,
        parity,
        report,
        modelfile,
        written.fallbacks,
    )


def _lora_gguf(config: GgufConfig, out: Path, progress: bool) -> GgufResult:
    """`--adapter`: the adapter as a GGUF LoRA file (lora_gguf), the Modelfile naming its base."""
    from .lora_gguf import export_lora

    modelfile_path = sidecar(out, ".Modelfile")
    if config.ollama:
        refuse_existing(modelfile_path, force=config.force, folder=False)
    r = export_lora(config, out, sidecar(out, ".parity.json"), progress=progress)
    modelfile = None
    if config.ollama:  # config.check() made sure --base-gguf is given
        text = ollama_modelfile(Path(str(config.base_gguf)).expanduser(), r.prompt_format, adapter=out)
        modelfile = write_text_atomic(modelfile_path, text)
    return GgufResult(
        out, config.quant, r.bytes, r.architecture, "", r.export_s, r.parity, r.report, modelfile
    )


def _k_quant(
    model: Any, tokenizer: Any, fmt: Any, path: Path, config: GgufConfig, name: str, bar: Any
) -> Any:
    """K-quants: an f16 file first (the `gguf` package has no K-quantiser), then llama.cpp's
    quantizer, the one llama.cpp's own `llama-quantize` runs."""
    from ..engines.llamacpp import import_llama_cpp
    from .to_gguf import write_gguf

    llama_cpp = import_llama_cpp()
    f16 = path.with_name(path.name + ".f16")
    try:
        written = write_gguf(
            model, tokenizer, fmt, f16, "f16", name=name, pre_tokenizer=config.pre_tokenizer, progress=bar
        )
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{config.quant.upper()}")
        with _stderr_captured() as said:
            status = llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params)
        if status != 0 or not path.is_file():
            last = " / ".join(said.read().strip().splitlines()[-3:])
            raise UserError(
                f"llama.cpp's quantizer failed on {config.quant} (status {status}: {last})",
                "use --quant q8_0, q5_1 or q4_1, which the gguf package writes itself",
            )
    finally:
        f16.unlink(missing_ok=True)
    # llama.cpp keeps a type for tensors whose rows do not split into K-quant blocks of 256 values
    # (SmolLM2's are 576 wide) and says how many, once, in its log.
    fell_back = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", said.read())
    written.fallbacks = (
        [
            f"{fell_back[1]} of {fell_back[2]} tensors: rows not a multiple of 256, kept at llama.cpp's fallback type"
        ]
        if fell_back
        else []
    )
    written.quant = config.quant
    written.bytes = path.stat().st_size
    return written


class _Captured:
    text = ""

    def read(self) -> str:
        return self.text


@contextlib.contextmanager
def _stderr_captured() -> Iterator[_Captured]:
    """What C code writes to the process's stderr (llama.cpp's quantizer prints a line per
    tensor), kept in a file instead: shown only when it fails."""
    import sys
    import tempfile

    sys.stderr.flush()
    captured = _Captured()
    with tempfile.TemporaryFile() as file:
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            captured.text = file.read().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Ollama


def ollama_modelfile(
    gguf_file: Path, fmt: Any, *, adapter: Path | None = None, sampling: SamplingDefaults | None = None
) -> str:
    """An Ollama Modelfile: the file, the prompt template (Go template syntax), the stop strings and
    the sampling (the model's own where its generation_config.json sets it, else ours), so
    `ollama create NAME -f FILE` serves the model with the prompts it was trained on. With
    `adapter` (a GGUF LoRA, the Modelfile beside it), `gguf_file` is its base."""
    from ..core.prompts import Message
    from ..engines import GenerationSettings
    from ..engines.config import IN_PROCESS_REPETITION_PENALTY

    ours = SamplingDefaults(
        temperature=GenerationSettings().temperature, repetition_penalty=IN_PROCESS_REPETITION_PENALTY
    )
    chosen = (sampling or SamplingDefaults()).over(ours)

    if adapter is None:
        lines = [f"FROM ./{gguf_file.name}", ""]
    else:
        base = os.path.relpath(gguf_file.resolve(), adapter.resolve().parent)
        lines = [f"FROM {base if base.startswith('..') else './' + base}", f"ADAPTER ./{adapter.name}", ""]
    if fmt.name != "chat":  # a chat template stays in the GGUF, where Ollama reads it itself
        # The format's own rendering of one message, the message replaced by Ollama's placeholder:
        # the template is ours byte for byte (single-turn: Ollama's .Prompt is the last message).
        marker = "\x00prompt\x00"
        template = fmt.render([Message("user", marker)]).replace(marker, "{{ .Prompt }}")
        lines += ['TEMPLATE """' + template + '"""', ""]
    if fmt.system:
        lines += ['SYSTEM """' + fmt.system + '"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in fmt.stop_strings]
    lines += [f"PARAMETER temperature {chosen.temperature}"]
    if chosen.top_p is not None:
        lines += [f"PARAMETER top_p {chosen.top_p}"]
    lines += [f"PARAMETER repeat_penalty {chosen.repetition_penalty}", ""]
    return "\n".join(lines)
