"""The base GGUF a LoRA adapter file is applied to (`export gguf --adapter --base-gguf`): llama.cpp
loads the adapter onto it, so it must be the adapter's base in three ways, each checked before any
work: the architecture llama.cpp compares at load, every adapted matrix in the adapter's shape, and
the chat template, since llama.cpp prompts through the base file's template, not the adapter's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import UserError


def check_base_gguf(path: Path, arch: str, pairs: Sequence[Any], fmt: Any, tokenizer: Any) -> None:
    """The base GGUF the adapter is for, read once: the architecture llama.cpp checks at load,
    every adapted matrix in the adapter's shape (llama.cpp's own check, made before any work) and
    the chat template."""
    reader = _read(path)
    fields = {
        k: reader.fields[k].contents() for k in ("general.architecture", "general.type") if k in reader.fields
    }
    if fields.get("general.type") == "adapter":
        raise UserError(f"--base-gguf {path}: an adapter, not a model", "name the base model's .gguf file")
    if fields.get("general.architecture") != arch:
        raise UserError(
            f"--base-gguf {path}: a {fields.get('general.architecture')} model; the adapter is for {arch}",
            "name the GGUF of the base given as --model",
        )
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # (in, out), as ggml
    for pair in pairs:
        want = (pair.a.shape[1], pair.b.shape[0])
        if shapes.get(pair.gguf_name, ())[:2] != want:
            there = f"is {shapes[pair.gguf_name]}" if pair.gguf_name in shapes else "is missing"
            raise UserError(
                f"--base-gguf {path}: {pair.gguf_name} {there} there; the adapter's {pair.module} needs {want} (in, out)",
                "name the GGUF of the base given as --model",
            )
    _check_template(path, reader, fmt, tokenizer)


def _read(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise UserError(
            f"--base-gguf {path}: no such file", "write it first: alpaca-forge export gguf --model BASE"
        )
    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError) as e:  # IndexError: a file cut off in its header
        raise UserError(
            f"--base-gguf {path}: not a GGUF file, or one cut off ({type(e).__name__}: {e})",
            "name the base model's .gguf file, or write it again: alpaca-forge export gguf --model BASE",
        ) from e


def _check_template(path: Path, reader: Any, fmt: Any, tokenizer: Any) -> None:
    """llama.cpp applies an adapter to a base file and prompts through the BASE file's chat
    template: a base written for another format (a model as published carries its own, e.g.
    ChatML) would prompt the adapted model in a format it was never trained on."""
    from ..core.chat_template import chat_template_for

    want = chat_template_for(fmt, tokenizer) or getattr(tokenizer, "chat_template", None)
    field = reader.fields.get("tokenizer.chat_template")
    there = field.contents() if field is not None else None
    if want and there != want:
        raise UserError(
            f"--base-gguf {path}: its chat template is not the adapter's prompt format ({fmt.name}), so "
            "llama.cpp's server (and Ollama without the Modelfile) would prompt the adapted model in a "
            "format it was never trained on",
            f"write the base for this format: alpaca-forge export gguf --model BASE --format {fmt.name} "
            f"--quant f16 --output {path.name}",
        )
