"""The provenance manifest, `RUN/manifest.json`: what this run was made of and from.

Versions of the package and its libraries, the resolved settings of every stage, content hashes
of the seeds, data, weights and outputs, the teacher and judge, the licences or terms of the base
model, teacher and data where they can be read (Alpaca's weights were research-only because of
its teacher's terms and LLaMA's licence), tokens and dollars, compute hours and wall time per
stage.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from pathlib import Path
from typing import Any

from ..core.files import write_json_atomic
from ..core.shipped import shipped_folder
from .forecast import Forecast
from .recipe import Recipe
from .stages import StageWork
from .state import RunState

MANIFEST_FILE = "manifest.json"
LIBRARIES = (
    "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "datasets",
    "llama_cpp_python", "gguf", "pydantic", "rapidfuzz", "numpy", "scipy",
)  # fmt: skip
PACKAGE_DATA_LICENCE = "Apache-2.0 (written for alpaca-forge, shipped with it)"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("alpaca-forge", *LIBRARIES):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _front_matter_licence(readme: Path) -> str | None:
    """`license:` from a model card's YAML front matter."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return None
    head = re.match(r"---\n(.*?)\n---", text, re.DOTALL)
    found = re.search(r"^license:\s*(\S+)", head.group(1), re.MULTILINE) if head else None
    return found.group(1) if found else None


def model_licence(spec: str) -> str:
    """The licence a model states where it can be read here (GGUF metadata, a model card)."""
    from ..core.errors import UserError
    from ..core.models import adapter_base, resolve_model

    try:
        source = resolve_model(spec)
    except UserError:
        return "not readable here (the model is not on this machine)"
    if source.kind == "adapter":
        return f"as its base: {model_licence(adapter_base(Path(source.location)))}"
    if source.kind in ("gguf", "builtin"):
        from gguf import GGUFReader

        field = GGUFReader(source.location).fields.get("general.license")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        return "not stated in the GGUF file"
    if source.kind == "dir":
        found = _front_matter_licence(Path(source.location) / "README.md")
        if found:
            return found
        saved = Path(source.location) / "alpaca_forge_train.json"
        if saved.is_file():
            return "a fine-tune: see its base model's licence"
        return "not stated in the model folder (no README.md with a license)"
    return "not readable offline: see the model card on the Hub"


def engine_identity(engine: Any) -> dict[str, Any]:
    """A teacher or judge: its model and where it runs, with its licence or terms."""
    if engine.engine == "openai":
        return {
            "model": engine.model,
            "engine": "openai",
            "base_url": engine.base_url,
            "terms": f"the provider's terms of use ({engine.base_url}): not readable from here; "
            "they may restrict training models on its outputs",
        }
    from ..core.models import DEFAULT_MODEL

    model = engine.model or DEFAULT_MODEL
    return {"model": model, "engine": engine.engine, "licence": model_licence(model)}


def data_licence(path: Path) -> str:
    if path.resolve().parent == shipped_folder().resolve():
        return PACKAGE_DATA_LICENCE
    for name in ("LICENSE", "LICENCE", "README.md"):
        if (path.parent / name).is_file():
            return f"see {path.parent / name}"
    return "not stated (no licence file beside it)"


def build_manifest(
    recipe: Recipe, works: list[StageWork], state: RunState, forecast: Forecast, wall_s: float
) -> dict[str, Any]:
    s = recipe.stages
    stages: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    for work in works:
        rec = state.stages.get(work.name)
        stages[work.name] = {
            "status": rec.status if rec else "not run",
            "fingerprint": rec.fingerprint if rec else None,
            "wall_s": rec.wall_s if rec else None,
            "settings": work.settings(),
            "inputs": {role: str(p) for role, p in work.inputs.items()},
            "outputs": rec.outputs if rec else {},
        }
        for role, p in work.inputs.items():
            hashes[f"{work.name}.{role}: {p}"] = state.hash_of(p)
        if rec:
            for p, h in rec.outputs.items():
                hashes[str(state.output_path(p))] = h
    figures = {name: (state.stages[name].figures if name in state.stages else {}) for name in s}
    gen = figures.get("generate", {})
    train_summary = figures.get("train", {}).get("summary", {})
    processes = figures.get("train", {}).get("processes", 1)
    train_s = state.stages["train"].wall_s if "train" in state.stages else 0.0
    licences: dict[str, Any] = {}
    if "train" in s:
        licences["base_model"] = {"model": s["train"].model, "licence": model_licence(s["train"].model)}
    if "generate" in s:
        licences["teacher"] = engine_identity(s["generate"].teacher)  # the engine that runs it
        if s["generate"].seeds:  # magpie reads none
            licences["seeds"] = {"file": s["generate"].seeds, "licence": data_licence(Path(s["generate"].seeds))}
    if "data" in s and s["data"].input:
        licences["data"] = {"file": s["data"].input, "licence": data_licence(Path(s["data"].input))}
    if "prefer" in s:
        licences["preference_judge"] = engine_identity(s["prefer"].judge)
        licences["preference_instructions"] = {
            "file": s["prefer"].input,
            "licence": data_licence(Path(s["prefer"].input)),
        }
    if "eval" in s:
        licences["judge"] = engine_identity(s["eval"].judging.judge)
        licences["eval_set"] = {"file": s["infer"].input, "licence": data_licence(Path(s["infer"].input))}
    return {
        "manifest_version": 1,
        "recipe": {"name": recipe.name, "path": str(recipe.path), "sha256": state.hash_of(recipe.path)},
        "run_dir": str(recipe.run_dir),
        "command": " ".join(sys.argv),
        "platform": {
            "system": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "versions": versions(),
        "stages": stages,
        "hashes": hashes,
        "licences": licences,
        "tokens": {
            "teacher_prompt": gen.get("prompt_tokens"),
            "teacher_completion": gen.get("completion_tokens"),
            "trained": train_summary.get("trained_tokens_this_run"),
            "training_seen": train_summary.get("tokens_seen_this_run"),
        },
        "cost": {
            "teacher_usd": gen.get("cost_usd"),  # at the batch price where the teacher was a batch
            "teacher_price_factor": (gen.get("teacher_settings") or {}).get("price_factor", 1.0),
            "compute_hours": round(train_s * processes / 3600, 4),
            "compute_kind": "GPU" if recipe.forecast.gpu != "cpu" else "CPU",
            "forecast_usd": round(forecast.cost_usd, 4),
        },
        "wall_s": {"total_this_invocation": round(wall_s, 1), **{k: v["wall_s"] for k, v in stages.items()}},
    }


def write_manifest(
    recipe: Recipe, works: list[StageWork], state: RunState, forecast: Forecast, wall_s: float
) -> Path:
    path = recipe.run_dir / MANIFEST_FILE
    write_json_atomic(path, build_manifest(recipe, works, state, forecast, wall_s))
    return path
