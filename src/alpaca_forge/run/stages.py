"""The stages of a recipe, each as the work it plans and the stage command it runs.

    generate -> data (quality, clean, dedupe) -> train (preflight first) -> [prefer (pairs from the
    fine-tuned model's samples, judged) -> align (DPO & co. from the fine-tuned model)] -> infer
    (base, fine-tuned [, aligned]) -> eval (fine-tuned vs base [, aligned vs fine-tuned], blind,
    both orders) -> export (the last model trained: merge, GGUF, parity, llama.cpp speed)

`plan(recipe)` lists, for each stage, the configs the recipe built for it (their joining fields
filled from the wiring table), what it reads (hashed into its fingerprint) and what it writes. `execute(work, ...)` runs a stage through its own `run(config)`
and returns the figures the report and the manifest show. Each stage resumes as its command does
(generate, infer and eval from their appended files and caches, train from its last complete
checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import read_appended_jsonl, write_json_atomic, write_text_atomic
from ..data.config import CleanConfig
from .recipe import Recipe
from .wiring import run_file

log = logging.getLogger("alpaca_forge")


@dataclass
class StageWork:
    name: str
    folder: Path  # removed when the stage starts over
    configs: dict[str, Any]  # the stage commands' configs, every path filled in
    inputs: dict[str, Path]  # what the stage reads, by role: hashed into its fingerprint
    outputs: list[Path]  # what it leaves for later stages: hashed when it is done
    extra: dict[str, Any] = field(default_factory=dict)  # settings of the recipe's own (include_seeds)

    def settings(self) -> dict[str, Any]:
        return {"configs": {k: v.to_dict() for k, v in self.configs.items()}, **self.extra}


def plan(recipe: Recipe) -> list[StageWork]:
    """Each stage's work: the configs the loader built (wired from the table), what it reads
    (hashed into its fingerprint) and what it leaves for later stages."""
    run = recipe.run_dir
    s, c = recipe.stages, recipe.configs
    works: list[StageWork] = []
    if "generate" in s:
        g = s["generate"]
        inputs = {"seeds": Path(g.seeds)} if g.seeds else {}  # magpie reads none
        works.append(StageWork("generate", run / "generate", c["generate"], inputs, [Path(g.output)]))
    if "data" in s:
        d = s["data"]
        source = Path(s["generate"].output) if "generate" in s else Path(d.input)
        inputs = {"records": source}
        if d.include_seeds:
            inputs["seeds"] = Path(s["generate"].seeds)
        configs = {"quality": d.quality, "clean": d.clean, "dedupe": d.dedupe}
        train_data = run_file(run, "data", "train data")
        if d.decontaminate and "infer" in s:  # the set the recipe evaluates on stays out of training
            inputs["evaluation set"] = Path(s["infer"].input)
            configs["decontaminate"] = dataclasses.replace(d.decontamination, against=(s["infer"].input,))
        if d.min_score is not None:
            configs["score"] = d.score
            configs["keep"] = CleanConfig(
                file=d.score.output, output=str(train_data), checks=("none",), min_score=d.min_score
            )
        extra = {"include_seeds": d.include_seeds, "decontaminate": d.decontaminate, "min_score": d.min_score}
        works.append(StageWork("data", run / "data", configs, inputs, [train_data], extra))
    if "train" in s:
        t = s["train"]
        launch = recipe.launch
        inputs = {"data": Path(t.data)}
        if t.val:
            inputs["val"] = Path(t.val)
        if Path(t.model).exists():  # a local base model: its files, not only its name
            inputs["base_model"] = Path(t.model)
        if launch.accelerate_config:
            inputs["accelerate_config"] = Path(launch.accelerate_config)
        extra = {"processes": launch.processes, "accelerate_config": launch.accelerate_config}
        works.append(StageWork("train", run / "train", c["train"], inputs, [Path(t.output)], extra))
    if "prefer" in s:
        p = s["prefer"]
        inputs = {"instructions": Path(p.input), "policy": Path(p.engine.model)}
        if p.reward_model:
            inputs["reward_model"] = Path(p.reward_model)
        works.append(StageWork("prefer", run / "prefer", c["prefer"], inputs, [Path(p.output)]))
    if "align" in s:
        a = s["align"]
        inputs = {"pairs": Path(a.data), "model": Path(a.model)}
        if a.val:
            inputs["val"] = Path(a.val)
        extra = {"processes": recipe.launch.processes, "accelerate_config": recipe.launch.accelerate_config}
        works.append(StageWork("align", run / "align", c["align"], inputs, [Path(a.output)], extra))
    if "infer" in s:
        roles = c["infer"]
        inputs = {"set": Path(roles["before"].input), "model": Path(roles["after"].engine.model)}
        if "aligned" in roles:
            inputs["aligned model"] = Path(roles["aligned"].engine.model)
        extra = {"train_format": s["train"].format, "train_system": s["train"].system}
        outputs = [Path(config.output) for config in roles.values()]
        works.append(StageWork("infer", run / "infer", roles, inputs, outputs, extra))
    if "eval" in s:
        answered = s["infer"].limit  # infer answered only the set's first N: judge those
        configs = {role: _judge_answered(e, answered) for role, e in c["eval"].items()}
        answers = {role: Path(config.output) for role, config in c["infer"].items()}
        inputs = {"set": Path(configs["eval"].set), **answers}
        reports = [Path(e.output) / "report.json" for e in configs.values()]
        works.append(StageWork("eval", run / "eval", configs, inputs, reports))
    if "export" in s:
        gguf = s["export"]
        final = s["align"] if "align" in s else s["train"]  # the last model trained
        works.append(
            StageWork(
                "export", run / "export", c["export"], {"model": Path(final.output)}, [Path(gguf.output)]
            )
        )
    return works


def _judge_answered(e: Any, answered: int | None) -> Any:
    """An eval config judging only the items infer answered (its `limit`)."""
    if answered and (e.judging.limit is None or e.judging.limit > answered):
        return dataclasses.replace(e, judging=dataclasses.replace(e.judging, limit=answered))
    return e


# ---------------------------------------------------------------------------------------------
# Running one stage


def execute(work: StageWork, recipe: Recipe, *, resume: bool, progress: bool) -> dict[str, Any]:
    """Runs the stage; returns its figures. `resume`: a killed run left this stage in flight."""
    work.folder.mkdir(parents=True, exist_ok=True)
    return {
        "generate": _generate,
        "data": _data,
        "train": _train,
        "prefer": _prefer,
        "align": _align,
        "infer": _infer,
        "eval": _eval,
        "export": _export,
    }[work.name](work, recipe, resume, progress)


def _generate(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    from ..generate.runner import run

    r = run(work.configs["generate"], progress=progress)
    if r.accepted == 0:
        raise UserError(
            f"generate: the teacher yielded no records ({r.stop_detail}; dropped: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items()))
            + ")",
            "use a stronger teacher (stages.generate.engine: openai, base_url, model), or allow more max_requests",
        )
    return {**r.to_dict(), "teacher": r.teacher}


def _data(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    from ..core.records import read_records, write_records
    from ..data.config import StatsConfig
    from ..data.decontaminate import run_decontaminate
    from ..data.runner import run_clean, run_dedupe, run_quality, run_stats
    from ..data.score import run_score

    c = work.configs
    teacher = read_records(work.inputs["records"], require_output=True)
    seeds = read_records(work.inputs["seeds"]) if "seeds" in work.inputs else []
    combined = Path(c["quality"].file)
    write_records(combined, [*seeds, *teacher])
    quality = run_quality(c["quality"], progress=progress)
    clean = run_clean(c["clean"], progress=progress)
    dedupe = run_dedupe(c["dedupe"], progress=progress)
    figures: dict[str, Any] = {}
    last = dedupe.output
    if "decontaminate" in c:
        found = run_decontaminate(c["decontaminate"])
        last = found.output
        figures["decontamination"] = {
            "against": found.against,
            "checked": found.records,
            "dropped": found.dropped,
            "by_method": found.by_method,
            "matched_items": found.matched_items,
            "dropped_file": str(found.dropped_path),
            "elapsed_s": round(found.elapsed_s, 3),
        }
    train_data = work.outputs[0]
    if "score" in c:
        scored = run_score(c["score"], progress=progress)
        kept = run_clean(c["keep"], progress=False)
        figures["score"] = {
            "judge": scored.judge,
            "rated": scored.rated,
            "unreadable": scored.unreadable,
            "mean_overall": scored.mean_overall,
            "overall_counts": {str(k): v for k, v in sorted(scored.overall_counts.items())},
            "min_score": work.extra["min_score"],
            "scored_out": kept.removed,
            "prompt_tokens": scored.prompt_tokens,
            "completion_tokens": scored.completion_tokens,
            "plot": str(scored.plot) if scored.plot else None,
        }
        final = read_records(train_data)
    else:  # the last step's records are the training data
        final = read_records(last, require_output=True)
        write_records(train_data, final)
    seed_keys = {(r.instruction, r.input, r.output) for r in seeds}
    from_seeds = sum(1 for r in final if (r.instruction, r.input, r.output) in seed_keys)
    folder = work.folder
    stats = run_stats(
        StatsConfig(
            file=str(train_data), plot=str(folder / "lengths.png"), json_path=str(folder / "stats.json")
        )
    )
    return {
        "from_teacher_in": len(teacher),
        "from_seeds_in": len(seeds),
        "quality": {name: check["count"] for name, check in quality.report["checks"].items()},
        "cleaned_out": clean.removed,
        "clean_checks": list(c["clean"].checks),
        "deduped_out": dedupe.dropped,
        **figures,
        "records": len(final),
        "from_teacher": len(final) - from_seeds,
        "from_seeds": from_seeds,
        "stats": stats.numbers,
        "lengths_plot": str(stats.plot) if stats.plot else None,
    }


def _train(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    from ..core.records import read_records
    from . import preflight

    config = work.configs["train"]
    records = read_records(config.data)
    pre = preflight.check(config, records, f"{recipe.path} (stages.train)")
    kept = recipe.run_dir / "preflight.txt"
    write_text_atomic(kept, pre.text())
    write_json_atomic(recipe.run_dir / "preflight.json", pre.to_dict())
    log.info("%s", pre.text().rstrip())
    preflight.require_eos(pre, f"{recipe.path} (stages.train)", kept)
    summary = _train_model(config, work, resume, progress)
    return {"summary": summary, "preflight": pre.to_dict(), "processes": work.extra["processes"]}


def _train_model(config: Any, work: StageWork, resume: bool, progress: bool) -> dict[str, Any]:
    """`train` as the stage's config says (under accelerate for several processes); its summary.
    A model saved before a kill is not trained again."""
    from ..train.checkpoints import CONFIG_FILE

    processes = work.extra["processes"]
    if resume and (Path(config.output) / CONFIG_FILE).is_file():
        log.info("%s: the model was saved before the run was stopped; not trained again", work.name)
    elif processes > 1:
        _launch_train(config, work, processes, resume)
    else:
        from ..train.runner import run

        run(config, resume=resume, progress=progress)
    return json.loads((Path(config.output) / "train_summary.json").read_text())


def _prefer(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    from ..prefer.runner import run

    config = work.configs["prefer"]
    r = run(config, progress=progress)
    if r.pairs == 0:
        raise UserError(
            f"prefer: no preference pair was kept ({_drops(r.summary)})",
            "sample more answers (stages.prefer.samples), use more instructions, or a judge that decides "
            "(see RUN/prefer/pairs.summary.json)",
        )
    return {"pairs": r.pairs, "summary": r.summary, "judge": config.judge.model}


def _drops(summary: dict[str, Any]) -> str:
    dropped = summary.get("dropped") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "nothing to compare"


def _align(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    config = work.configs["align"]
    summary = _train_model(config, work, resume, progress)
    return {"summary": summary, "processes": work.extra["processes"]}


def launch_command(
    config_file: Path, processes: int, accelerate_config: str | None, resume: bool
) -> list[str]:
    """The train stage under accelerate: one process per GPU, the stage's config as a file."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    # A config file says how (DDP, FSDP, DeepSpeed); without one, plain data parallel: one
    # process per GPU, or gloo processes on a machine without GPUs.
    cmd += ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
    cmd += ["-m", "alpaca_forge", "train", "--config", str(config_file)]
    return cmd + (["--resume"] if resume else [])


def _launch_train(config: Any, work: StageWork, processes: int, resume: bool) -> None:
    import yaml

    config_file = work.folder.parent / f"{work.name}.launch.yaml"
    write_text_atomic(config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
    cmd = launch_command(config_file, processes, work.extra["accelerate_config"], resume)
    log.info("train: %s", " ".join(cmd))
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise UserError(
            f"train under accelerate launch ({processes} processes) failed with exit status {done.returncode}",
            "see its output above; run the recipe again to resume from the last checkpoint",
        )


INFER_ROLES = {"before": "base", "after": "fine-tuned", "aligned": "aligned"}


def _infer(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    from ..core.models import load_tokenizer, model_format
    from ..infer.runner import run

    before = work.configs["before"]
    if before.engine.format is None:  # the base answers in the prompt format it is trained in
        tokenizer = load_tokenizer(before.engine.model)
        fmt = model_format(
            before.engine.model,
            work.extra["train_format"],
            work.extra["train_system"],
            tokenizer,
            for_training=True,
        )
        before = dataclasses.replace(before, engine=dataclasses.replace(before.engine, format=fmt.name))
    figures = {}
    for role, config in {**work.configs, "before": before}.items():
        log.info("infer: the %s model answers the set", INFER_ROLES[role])
        r = run(config, progress=progress)
        figures[role] = {
            "model": config.engine.model,
            "answers": r.written + r.already_done,
            "tokens": r.tokens,
            "tokens_per_s": round(r.tokens_per_s, 2),
            "elapsed_s": round(r.elapsed_s, 2),
        }
    return figures


def _eval(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    figures = _pairwise(work.configs["eval"], progress)
    if "aligned" in work.configs:
        log.info("eval: the aligned model against the fine-tuned one, by the same judge")
        figures["aligned"] = _pairwise(work.configs["aligned"], progress)
    return figures


def _pairwise(config: Any, progress: bool) -> dict[str, Any]:
    from ..eval.report import read_pairwise_report
    from ..eval.runner import run_pairwise

    r = run_pairwise(config, progress=progress)
    fix = "run the recipe with --from eval to judge again"
    report = read_pairwise_report(r.output, flag="the eval stage's report", fix=fix)
    prompt_tokens = completion_tokens = 0
    for _line, row in read_appended_jsonl(r.cache, ("key", "reply"), "run", fix) if r.cache.is_file() else ():
        prompt_tokens += int(row.get("prompt_tokens") or 0)
        completion_tokens += int(row.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt_tokens,  # every judgement in the cache, asked by this stage
        "completion_tokens": completion_tokens,
        "asked": r.asked,
        "elapsed_s": round(r.elapsed_s, 2),
        # the headline, for state.json; report.html reads report.json itself
        "report": {k: v for k, v in dataclasses.asdict(report).items() if k not in ("path", "per_item")},
        "files": [str(f) for f in r.files],
    }


SPEED_PROMPTS = ("Give three tips for staying healthy.", "Explain what a prime number is.")
SPEED_TOKENS = 64


def _export(work: StageWork, recipe: Recipe, resume: bool, progress: bool) -> dict[str, Any]:
    from ..export.runner import run_gguf, run_merge

    figures: dict[str, Any] = {}
    if "merge" in work.configs:
        m = run_merge(work.configs["merge"])
        figures["merge"] = {
            "output": str(m.output),
            "parameters": m.parameters,
            "elapsed_s": round(m.elapsed_s, 2),
        }
    g = run_gguf(work.configs["gguf"], progress=progress)
    figures["gguf"] = {
        "output": str(g.output),
        "quant": g.quant,
        "bytes": g.bytes,
        "export_s": round(g.export_s, 2),
        "parity": g.parity.to_dict() if g.parity else None,
    }
    source = Path(work.configs["gguf"].model)
    figures["source_bytes"] = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    figures["speed"] = _llamacpp_speed(g.output)
    return figures


def _llamacpp_speed(gguf: Path) -> dict[str, Any] | None:
    """Greedy decode speed of the exported file in llama.cpp (None where it is not installed)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from ..core.prompts import Message
    from ..engines import EngineConfig, GenerationSettings, using_engine

    settings = GenerationSettings(max_new_tokens=SPEED_TOKENS, temperature=0.0)
    with using_engine(EngineConfig(engine="llamacpp", model=str(gguf))) as engine:
        start = time.perf_counter()
        done = engine.chat([[Message("user", p)] for p in SPEED_PROMPTS], settings)
        elapsed = time.perf_counter() - start
    tokens = sum(c.completion_tokens for c in done)
    return {
        "tokens": tokens,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2) if elapsed else None,
    }
