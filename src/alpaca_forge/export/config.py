"""Settings of `alpaca-forge export merge | diff | recover | gguf`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.config import REQUIRED, Config, setting
from ..core.prompts import FORMATS

DiffKind = Literal["add", "xor"]

# The GGUF quantisation types `export gguf` writes. The first seven are written by the `gguf`
# package's own quantisers (pure numpy, no compiler); the K-quants by llama.cpp's quantizer,
# through llama-cpp-python (`pip install 'alpaca-forge[llamacpp]'`).
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# What `export gguf --adapter` writes a LoRA adapter's tensors as (K-quants are made by llama.cpp's
# whole-model quantizer, which takes no adapters).
LORA_QUANTS = ("f32", "f16", "bf16", "q8_0")
GGUF_K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QuantName = Literal[GGUF_QUANTS + GGUF_K_QUANTS]  # type: ignore[valid-type]
# What --base names: a folder as it is, a name as the weights every `--model` loads.
BASE_MODEL = (
    "a model folder (safetensors or .bin shards), a built-in name or .gguf file (its dense float32 "
    "copy, as train starts from), or a cached Hugging Face id"
)


@dataclass(frozen=True)
class MergeConfig(Config):
    adapter: str = setting(
        REQUIRED, "a LoRA/QLoRA adapter folder, as `train --method lora` wrote it", metavar="DIR"
    )
    output: str = setting(
        REQUIRED, "the merged model's folder (safetensors, tokenizer, prompt format)", metavar="DIR"
    )
    model: str | None = setting(
        None,
        "the base model the adapter was trained on (default: the one the adapter records); a built-in "
        "name, a model folder, a .gguf file or a cached Hugging Face id",
    )
    force: bool = setting(False, "replace --output if it exists")


@dataclass(frozen=True)
class DiffConfig(Config):
    base: str = setting(REQUIRED, "the raw base model: " + BASE_MODEL, metavar="MODEL")
    tuned: str = setting(REQUIRED, "the fine-tuned model's folder", metavar="DIR")
    output: str = setting(REQUIRED, "the diff's folder", metavar="DIR")
    kind: DiffKind = setting(
        "add",
        "add: tuned - base in float32, the original Alpaca release's scheme (recovers within float "
        "rounding); xor: the raw bytes XORed, recovers bit for bit",
    )
    shard_size_mb: int = setting(
        1024, "largest weight file of the output; also about the most memory held at once", ge=16
    )
    force: bool = setting(False, "replace --output if it exists")


@dataclass(frozen=True)
class RecoverConfig(Config):
    base: str = setting(
        REQUIRED, "the same raw base model the diff was made from: " + BASE_MODEL, metavar="MODEL"
    )
    diff: str = setting(
        REQUIRED, "a diff folder: ours, or one the original Alpaca weight_diff.py wrote", metavar="DIR"
    )
    output: str = setting(REQUIRED, "the recovered model's folder", metavar="DIR")
    shard_size_mb: int = setting(
        1024, "largest weight file of the output; also about the most memory held at once", ge=16
    )
    force: bool = setting(False, "replace --output if it exists")


@dataclass(frozen=True)
class GgufConfig(Config):
    model: str = setting(
        REQUIRED,
        "the model to export: a model folder (e.g. `export merge`'s output), a built-in name or a cached "
        "Hugging Face id; with --adapter, the adapter's base",
    )
    output: str = setting(REQUIRED, "the .gguf file to write", metavar="FILE.gguf")
    quant: QuantName = setting(  # type: ignore[valid-type]
        "q8_0",
        "weights type: f16/bf16 (lossless-ish), q8_0 (near-lossless, half of f16), q4_0/q4_1/q5_0/q5_1, "
        "or K-quants such as q4_k_m (needs llama-cpp-python)",
    )
    pre_tokenizer: str | None = setting(
        None,
        "llama.cpp's name for the tokenizer's pre-tokenizer (e.g. smollm, llama-bpe, qwen2), when it "
        "is not recognised from tokenizer.json",
        metavar="NAME",
    )
    format: Literal[tuple(FORMATS)] | None = setting(  # type: ignore[valid-type]
        None,
        "the prompt format the model reads, written into the file as its chat template: alpaca, "
        "user-assistant, or chat (the model's own template); needed for a model folder without "
        "prompt_format.json, which alpaca-forge writes beside every model it trains",
    )
    verify: bool = setting(
        True, "load the file in llama.cpp and compare its next-token choices with transformers'"
    )
    verify_prompts: int = setting(100, "prompts the parity check runs", ge=1)
    ollama: bool = setting(
        False,
        "also write an Ollama Modelfile beside the file (template, stop strings; with --adapter: "
        "FROM --base-gguf, ADAPTER the file)",
    )
    adapter: str | None = setting(
        None,
        "write this LoRA adapter folder (as `train --method lora` or peft wrote it) as a GGUF LoRA "
        "adapter for --model, its base, instead of the model: llama.cpp applies it at load "
        f"(llama-server -m BASE.gguf --lora FILE.gguf); --quant {'/'.join(LORA_QUANTS)}",
        metavar="DIR",
    )
    base_gguf: str | None = setting(
        None,
        "with --adapter: the base's own GGUF file (`export gguf --model BASE`), checked to fit the "
        "adapter and named as FROM in the --ollama Modelfile",
        metavar="FILE.gguf",
    )
    force: bool = setting(False, "replace --output if it exists")

    def check(self):
        if self.adapter is None:
            if self.base_gguf:
                yield (
                    "base_gguf",
                    "--base-gguf goes with --adapter",
                    "add --adapter DIR, or leave --base-gguf out",
                )
            return
        if self.quant not in LORA_QUANTS:
            yield (
                "quant",
                f"--quant {self.quant} is not written for LoRA adapters",
                f"use --quant {', '.join(LORA_QUANTS)} (an adapter is small: f16 costs little)",
            )
        if self.ollama and not self.base_gguf:
            yield (
                "base_gguf",
                "--ollama with --adapter needs the base's GGUF file for the Modelfile's FROM line",
                "add --base-gguf BASE.gguf (write it with `alpaca-forge export gguf --model BASE`)",
            )
