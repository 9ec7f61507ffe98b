"""`alpaca-forge export merge | diff | recover | gguf` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_tool_group, say
from . import config as c

TOOLS = [
    (
        "merge",
        "a LoRA adapter merged into its base: a plain model folder",
        """\
Merge a LoRA/QLoRA adapter into its base model in full precision and save the result with its
tokenizer and prompt format: a plain safetensors folder that transformers and vLLM load (the same
merge `train --merge` runs). An adapter made for another base is refused.

example:
  alpaca-forge export merge --adapter runs/my-alpaca --output runs/my-alpaca-merged""",
        c.MergeConfig,
    ),
    (
        "diff",
        "a weight diff (tuned - base, or XOR): publish a model without its base's weights",
        """\
Write TUNED as a diff against BASE, tensor by tensor (never two whole models in memory):
  --kind add  tuned - base in float32, the original Alpaca release's scheme and folder layout;
              recovery is within float rounding (the largest deviation is measured and stored)
  --kind xor  the raw bytes XORed: recovery is bit for bit
Checksums of the base and of the recovered tensors go into the diff, so `recover` proves it
rebuilt the right weights and refuses a wrong base.

example:
  alpaca-forge export diff --base smollm2-135m-instruct --tuned runs/my-alpaca-merged --output runs/my-alpaca-diff""",
        c.DiffConfig,
    ),
    (
        "recover",
        "the tuned model back from BASE + DIFF, verified tensor by tensor",
        """\
Rebuild a tuned model from its raw base and a diff (ours, of either kind, or one the original
Alpaca weight_diff.py wrote) and check every tensor against the checksums in the diff.

example:
  alpaca-forge export recover --base llama-7b --diff alpaca-7b-diff --output alpaca-7b""",
        c.RecoverConfig,
    ),
    (
        "gguf",
        "one GGUF file for llama.cpp / Ollama, checked against transformers",
        """\
Write the model as one GGUF file (architecture, tokenizer, prompt format and stop strings
included) with the `gguf` package's own quantisers: no llama.cpp build needed for
f32/f16/bf16/q8_0/q4_0/q4_1/q5_0/q5_1. K-quants (q4_k_m ...) go through llama.cpp's quantizer
(llama-cpp-python). The file's chat template is the prompt format the model was trained on, so
llama.cpp's server and Ollama prompt it as training did. Then the parity check: the file is
loaded in llama.cpp, fed the same tokens as transformers, and their next-token choices are
compared (the figures also go to FILE.parity.json). Llama 1/2/3.x (linear or llama3 RoPE),
Mistral, SmolLM, Qwen2, Qwen3 (linear or yarn RoPE), Phi-3 (LongRoPE too), Gemma 2 and Gemma 3
(text).

With --adapter, the file is a GGUF LoRA adapter for --model (its base) instead, which llama.cpp
applies at load: megabytes per fine-tune, one base GGUF for all. Its parity check loads --model's
f16 GGUF with the adapter applied and compares it with transformers running the merged model.
llama.cpp prompts through the base file's template, so write the base with the adapter's
--format.

examples:
  alpaca-forge export gguf --model runs/my-alpaca-merged --output runs/my-alpaca.q8_0.gguf --quant q8_0 --ollama
  alpaca-forge chat --engine llamacpp --model runs/my-alpaca.q8_0.gguf
  # a LoRA adapter as a 10 MB file, applied to a base GGUF written for its prompt format
  alpaca-forge export gguf --model smollm2-135m-instruct --format alpaca --output runs/smollm2-alpaca.f16.gguf --quant f16
  alpaca-forge export gguf --model smollm2-135m-instruct --adapter runs/my-alpaca --quant f16 --output runs/my-alpaca.lora.gguf --base-gguf runs/smollm2-alpaca.f16.gguf --ollama
  llama-server -m runs/smollm2-alpaca.f16.gguf --lora runs/my-alpaca.lora.gguf""",
        c.GgufConfig,
    ),
]


def register(sub: Any) -> None:
    add_tool_group(
        sub,
        "export",
        "merged models, weight diffs, GGUF files for llama.cpp",
        "Export a trained model: merge an adapter, publish a weight diff, write GGUF for llama.cpp. "
        "Run `alpaca-forge export TOOL --help`.",
        TOOLS,
        HANDLERS,
    )


def _merge(config: c.MergeConfig, args: Any) -> int:
    from .runner import run_merge

    r = run_merge(config)
    print(
        f"merged model: {r.output} ({r.parameters / 1e6:.1f}M parameters, base {r.base}, {r.elapsed_s:.1f} s)"
    )
    return 0


def _diff(config: c.DiffConfig, args: Any) -> int:
    from .diff_runner import run_diff

    r = run_diff(config, progress=not args.quiet)
    exact = f"{r.bit_exact} of {r.tensors} tensors recover bit for bit"
    if r.max_deviation_tensor:
        exact += f"; the largest deviation is {r.max_abs_deviation:.3g} ({r.max_deviation_tensor})"
    print(f"diff ({r.kind}): {r.output}, {r.bytes_written / 1e6:.1f} MB in {r.shards} file(s); {exact}")
    return 0


def _recover(config: c.RecoverConfig, args: Any) -> int:
    from .diff_runner import run_recover

    r = run_recover(config, progress=not args.quiet)
    if r.verified:
        check = (
            f"verified: {r.tensors_verified} of {r.tensors} tensors sha256-equal to what the diff promised"
        )
        if r.bit_exact is not None:
            check += f", {r.bit_exact} bit-exact with the tuned weights"
        if r.max_deviation_tensor:
            check += f" (largest deviation {r.max_abs_deviation:.3g}, {r.max_deviation_tensor})"
    else:
        check = f"NOT verified ({r.verification.value})"
    print(f"recovered model: {r.output} ({r.kind}); {check}")
    return 0


def _gguf(config: c.GgufConfig, args: Any) -> int:
    from .parity import describe
    from .runner import run_gguf

    r = run_gguf(config, progress=not args.quiet)
    kind = f"LoRA adapter for {config.model}, " if config.adapter else ""
    print(f"{r.output}: {kind}{r.quant}, {r.bytes / 1e6:.1f} MB, written in {r.export_s:.1f} s")
    if r.parity:
        for line in describe(r.parity, r.quant):
            print(line)
        say("parity figures: %s", r.report)
    if config.adapter:
        say("llama.cpp: llama-server -m %s --lora %s", config.base_gguf or "BASE.gguf", r.output)
    if r.modelfile:
        say("Ollama: ollama create NAME -f %s", r.modelfile)
    return 0


HANDLERS = {"merge": _merge, "diff": _diff, "recover": _recover, "gguf": _gguf}
