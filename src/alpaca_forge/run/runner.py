"""`alpaca-forge run recipe.yaml`: the whole Alpaca recipe as one reproducible, resumable run.

    load_recipe (every problem at once) -> plan (paths joining the stages) -> checks before any
    compute (inputs, the EOS check on the first records) -> forecast -> for each stage: its
    fingerprint -> skip | resume | start over -> the stage's own run(config) -> state.json ->
    manifest.json -> report.html

A stage is skipped when its fingerprint (settings + content hashes of what it reads) is the one it
finished with and its outputs are intact; `--from STAGE` reruns that stage and every later one. A
run killed in a stage resumes it: generate, infer and eval from what they appended, train from its
last complete checkpoint; data and export are quick and start over.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import check_output, write_json_atomic, write_text_atomic
from ..core.shipped import shipped_folder
from . import forecast as fc
from .config import RunConfig
from .recipe import STAGES, Recipe, load_recipe
from .stages import StageWork, execute, plan
from .state import RunState, fingerprint, relative_settings, remove_tree

log = logging.getLogger("alpaca_forge")
FORECAST_FILE = "forecast.json"


@dataclass(frozen=True)
class StageOutcome:
    name: str
    action: str  # "run", "resumed", "skipped", "to run" (dry run), "skip" (dry run)
    reason: str
    wall_s: float = 0.0


@dataclass(frozen=True)
class RunResult:
    recipe: Path
    run_dir: Path
    dry_run: bool
    stages: list[StageOutcome]
    forecast: fc.Forecast
    report: Path | None = None
    manifest: Path | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def plan_lines(self) -> list[str]:
        return [f"  {s.name:<9} {s.action:<8} {s.reason}" for s in self.stages]


def run(config: RunConfig, *, progress: bool = True) -> RunResult:
    started = time.perf_counter()
    _tokenizer.cache_clear()  # read afresh by each run: a model folder may have changed since
    _records.cache_clear()
    recipe = load_recipe(config.recipe, config.overrides)
    if config.from_stage and not recipe.has(config.from_stage):
        raise UserError(
            f"--from {config.from_stage}: the recipe {recipe.path} has no such stage",
            f"its stages are: {', '.join(recipe.stages)}",
        )
    works = plan(recipe)
    state = RunState.open(recipe.run_dir, recipe.name, recipe.path)
    keys = missing_api_keys(recipe)
    notes = early_checks(recipe) + keys
    forecast = make_forecast(recipe)
    if config.dry_run:
        outcomes = dry_plan(works, state, recipe, config.from_stage)
        return RunResult(recipe.path, recipe.run_dir, True, outcomes, forecast, notes=notes)
    check_output(recipe.run_dir, flag="run_dir", folder=True)  # made here, or a clear error
    for note in keys:  # said now: the judge's server is first asked hours from now
        log.warning("run: note: %s", note)
    write_text_atomic(recipe.run_dir / "recipe.yaml", recipe.path.read_text())
    write_json_atomic(recipe.run_dir / FORECAST_FILE, forecast.to_dict())
    outcomes = []
    changed_upstream = False
    for work in works:
        forced = _forced(work.name, config.from_stage)
        fp = _fingerprint(work, state, recipe)
        if not forced and not changed_upstream and state.done_and_intact(work.name, fp):
            outcomes.append(StageOutcome(work.name, "skipped", "settings and inputs unchanged"))
            log.info("run: %s skipped (settings and inputs unchanged)", work.name)
            continue
        resume = not forced and state.in_flight(work.name, fp)
        previous = state.stages.get(work.name)  # read before `started` replaces it
        before_hashes = dict(previous.outputs) if previous else {}
        if not resume:
            remove_tree(work.folder)
        state.started(work.name, fp)
        log.info("run: %s %s", work.name, "resumed" if resume else "started")
        t0 = time.perf_counter()
        figures = execute(work, recipe, resume=resume, progress=progress)
        wall = time.perf_counter() - t0
        state.finished(work.name, fp, work.outputs, wall, figures)
        # A stage rerun to the same outputs (same hashes) leaves later stages skippable.
        changed_upstream = changed_upstream or forced or before_hashes != state.stages[work.name].outputs
        outcomes.append(StageOutcome(work.name, "resumed" if resume else "run", _why(forced, resume), wall))
    from .manifest import write_manifest
    from .report import write_report

    wall = time.perf_counter() - started
    manifest = write_manifest(recipe, works, state, forecast, wall)
    report = write_report(recipe, state, forecast, manifest)
    return RunResult(recipe.path, recipe.run_dir, False, outcomes, forecast, report, manifest, wall, notes)


def _forced(stage: str, from_stage: str | None) -> bool:
    return from_stage is not None and STAGES.index(stage) >= STAGES.index(from_stage)


def _why(forced: bool, resume: bool) -> str:
    if forced:
        return "--from"
    return "killed in this stage: resumed" if resume else "new or changed settings or inputs"


def _fingerprint(work: StageWork, state: RunState, recipe: Recipe) -> str:
    inputs = {role: state.hash_of(path) for role, path in work.inputs.items()}
    return fingerprint(work.name, relative_settings(work.settings(), path_roots(recipe)), inputs)


def path_roots(recipe: Recipe) -> dict[str, str]:
    """Folders written as names in fingerprints, so a project cloned or installed elsewhere keeps
    them (the files themselves are content-hashed as inputs)."""
    return {
        str(recipe.run_dir): "RUN",
        str(shipped_folder()): "PACKAGE",
        str(recipe.path.parent.resolve()): "RECIPE",
    }


def dry_plan(
    works: list[StageWork], state: RunState, recipe: Recipe, from_stage: str | None
) -> list[StageOutcome]:
    """What a run would do now: each stage skipped (same fingerprint, outputs intact) or run."""
    out = []
    upstream: str | None = None
    for work in works:
        if _forced(work.name, from_stage):
            out.append(StageOutcome(work.name, "to run", "--from"))
            upstream = upstream or work.name
            continue
        if upstream is not None:
            out.append(StageOutcome(work.name, "to run", f"after {upstream}, if its outputs change"))
            continue
        fp = _fingerprint(work, state, recipe)
        if state.done_and_intact(work.name, fp):
            out.append(StageOutcome(work.name, "skip", "settings and inputs unchanged"))
        elif state.in_flight(work.name, fp):
            out.append(StageOutcome(work.name, "resume", "killed in this stage"))
            upstream = work.name
        else:
            reason = "changed settings or inputs" if work.name in state.stages else "not run yet"
            out.append(StageOutcome(work.name, "to run", reason))
            upstream = work.name
    return out


# ---------------------------------------------------------------------------------------------
# Checks before compute


def _sample_records(recipe: Recipe) -> list[Any]:
    if recipe.has("generate"):
        seeds = recipe.stages["generate"].seeds  # none for magpie: its records are not known before
        return _records(seeds) if seeds else []
    if recipe.has("data"):
        return _records(recipe.stages["data"].input)
    return []


# The checks and the forecast look at the same tokenizers and files: each is read once a run.
@functools.lru_cache(maxsize=8)
def _tokenizer(spec: str) -> Any:
    from ..core.models import load_tokenizer

    return load_tokenizer(spec)


@functools.lru_cache(maxsize=8)
def _records(path: str, require_output: bool = True) -> list[Any]:
    from ..core.records import read_records

    return read_records(path, require_output=require_output)


def early_checks(recipe: Recipe) -> list[str]:
    """The EOS check on the records at hand (the seeds, or the data file), before any compute.
    Returns notes on checks that could not run here (a model not on this machine)."""
    if not recipe.has("train"):
        return []
    from . import preflight

    records = _sample_records(recipe)[:64]
    where = recipe.where["train"]
    try:
        train = recipe.stages["train"]
        pre = preflight.check(train, records, where, shown=0, tokenizer=_tokenizer(train.model))
    except UserError as e:
        if "not in the local Hugging Face cache" in e.message or "is not installed" in e.message:
            return [f"the EOS check runs when the train stage starts: {e.message}"]
        raise UserError(f"{where}: {e.message}", e.fix) from e
    preflight.require_eos(pre, where)
    return []


def missing_api_keys(recipe: Recipe) -> list[str]:
    """A note for each API key variable a server stage reads that is not set. Not an error: a
    local server (vLLM, llama.cpp) may take requests without a key; a hosted API refuses them."""
    stages: dict[str, list[str]] = {}
    for name, roles in recipe.configs.items():
        for config in roles.values():
            for engine in _engines(config):
                if engine.engine == "openai" and not os.environ.get(engine.api_key_env):
                    stages.setdefault(engine.api_key_env, [])
                    if name not in stages[engine.api_key_env]:
                        stages[engine.api_key_env].append(name)
    return [
        f"${var} is not set, so the {' and '.join(names)} stage{'s' if len(names) > 1 else ''} will send "
        "no API key: set it before the real run, unless the server takes requests without one"
        for var, names in stages.items()
    ]


def _engines(config: Any) -> Iterator[Any]:
    """The engine settings (an `engine` and an `api_key_env`) anywhere inside a stage's config."""
    if not dataclasses.is_dataclass(config):
        return
    if hasattr(config, "engine") and hasattr(config, "api_key_env"):
        yield config
    for f in dataclasses.fields(config):
        yield from _engines(getattr(config, f.name))


# ---------------------------------------------------------------------------------------------
# The forecast


def _token_counter(spec: str | None) -> tuple[Callable[[str], int], str]:
    """The model's own tokenizer where it is on this machine, else 4 characters per token."""
    if spec:
        try:
            tok = _tokenizer(spec)
            return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), "tokenizer"
        except (UserError, OSError, ValueError):
            pass
    return (
        lambda text: math.ceil(len(text) / fc.CHARS_PER_TOKEN)
    ), f"{fc.CHARS_PER_TOKEN} characters per token"


def count_parameters(spec: str) -> int | None:
    """Parameters of a model on this machine, from its files' headers (nothing is loaded)."""
    from ..core.models import adapter_base, resolve_model

    try:
        source = resolve_model(spec)
    except UserError:
        return None
    if source.kind == "adapter":
        return count_parameters(adapter_base(Path(source.location)))
    if source.kind in ("gguf", "builtin"):
        from gguf import GGUFReader

        return int(sum(t.n_elements for t in GGUFReader(source.location).tensors))
    if source.kind == "dir":
        from safetensors import safe_open

        total = 0
        for f in Path(source.location).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    total += math.prod(st.get_slice(k).get_shape())
        return total or None
    return None


def _local_engine_model(engine: Any) -> str | None:
    from ..core.models import DEFAULT_MODEL

    return None if engine.engine == "openai" else (engine.model or DEFAULT_MODEL)


def make_forecast(recipe: Recipe) -> fc.Forecast:
    from ..engines.batch import price_factor

    s = recipe.stages
    f = recipe.forecast
    teacher = train = judge = None
    records_expected = 0
    if "generate" in s:
        g = s["generate"]
        seeds = _records(g.seeds) if g.seeds else []
        count, how = _token_counter(_local_engine_model(g.engine))
        per_prompt, completion, per_request, most = _teacher_requests(g, seeds, f, count)
        teacher = fc.teacher(
            per_prompt,
            how,
            num_instructions=g.num_instructions,
            records_per_request=per_request,
            max_requests=most,
            completion_tokens_per_request=completion,
            price_prompt_per_1m=g.price_prompt_usd_per_1m,
            price_completion_per_1m=g.price_completion_usd_per_1m,
            max_cost_usd=g.max_cost_usd,
            price_factor=price_factor(g.teacher),
            method=g.method,
        )
        expected_from_teacher = min(g.num_instructions, math.floor(teacher.requests * per_request))
        include = "data" in s and s["data"].include_seeds
        records_expected = expected_from_teacher + (len(seeds) if include else 0)
    elif "data" in s:
        records_expected = len(_records(s["data"].input))
    if "train" in s:
        t = s["train"]
        tokens_per_example, how = _tokens_per_example(t, _sample_records(recipe))
        parameters = int(f.parameters) if f.parameters else count_parameters(t.model)
        if parameters is None:
            raise UserError(
                f"{recipe.path} (forecast.parameters): the size of {t.model!r} cannot be read on this machine",
                "set forecast.parameters: 6.7e9 (a 7B model's count; give your model's), or fetch the model first",
            )
        val = t.val_size if t.val_size >= 1 else round(records_expected * t.val_size)
        rows = t.global_batch_size or (t.batch_size * t.gradient_accumulation * recipe.launch.processes)
        train = fc.training(
            records=max(0, records_expected - int(val)),
            tokens_per_example=tokens_per_example,
            epochs=t.epochs,
            max_steps=t.max_steps,
            rows_per_step=rows,
            max_seq_len=t.max_seq_len,
            packed=t.batching == "packed",
            parameters=parameters,
            method=t.weights,
            gpu=f.gpu,
            peak_tflops=f.peak_tflops,
            mfu=f.mfu,
            processes=recipe.launch.processes,
            usd_per_hour=f.gpu_usd_per_hour,
            counted_with=how,
        )
    inference_tokens = 0
    if "infer" in s:
        i = s["infer"]
        items = _records(i.input, require_output=False)
        n = min(len(items), i.limit or len(items))
        inference_tokens = 2 * n * i.generation.max_new_tokens
        if "eval" in s:
            e = s["eval"]
            judged = min(n, e.judging.limit or n)
            count, how = _token_counter(_local_engine_model(e.judging.judge))
            per = _judge_prompt_tokens(items[:judged], count, i.generation.max_new_tokens)
            judge = fc.judge(
                per,
                how,
                items=judged,
                both_orders=not e.judging.one_order,
                completion_tokens=e.judging.judge_generation.max_new_tokens,
                price_prompt_per_1m=f.judge_price_prompt_per_1m,
                price_completion_per_1m=f.judge_price_completion_per_1m,
                price_factor=price_factor(e.judging.judge),
            )
    return fc.Forecast(teacher, train, judge, inference_tokens)


def _teacher_requests(
    g: Any, seeds: list[Any], f: Any, count: Callable[[str], int]
) -> tuple[float, int, float, int | None]:
    """What one teacher request of the recipe's method looks like: its prompt tokens (the mean of
    sample prompts), completion tokens (an upper bound), records it can yield, and the most
    requests it may send (max_requests; evol's chains are finite too).

    self-instruct: one numbered 20-task prompt, up to forecast.teacher_records_per_request records.
    evol: a rewrite and then its answer, two requests for at most one record, seeds x rounds x 2 at
    most. magpie: one conversation a request (turns x (query + answer) calls, each prompt the
    conversation so far, counted here as its generated text), at most one record."""
    completion = f.teacher_completion_tokens_per_request or g.settings.max_new_tokens
    per_request = f.teacher_records_per_request
    if g.method == "evol":
        from ..generate.evol_steps import answer_prompt, choose_operation, evolve_prompt, parent_text

        ops = g.evol.operations
        texts = [parent_text(r) for r in seeds[:8]]
        prompts = [evolve_prompt(choose_operation(g.seed, str(k), 1, ops), t) for k, t in enumerate(texts)]
        prompts += [answer_prompt(t) for t in texts]
        chains = len(seeds) * g.evol.rounds * 2
        return _mean(prompts, count), completion, min(per_request, 0.5), min(g.max_requests or chains, chains)
    if g.method == "magpie":
        m = g.magpie
        so_far = (m.query_max_new_tokens + g.settings.max_new_tokens) * m.turns  # the conversation, at most
        return so_far, (completion + m.query_max_new_tokens) * m.turns, min(per_request, 1.0), g.max_requests
    from ..generate.teacher_prompt import build_prompt, sample_demos

    prompts = [build_prompt(sample_demos(seeds, k, g.seed)) for k in range(8)]
    return _mean(prompts, count), completion, per_request, g.max_requests


def _mean(prompts: list[str], count: Callable[[str], int]) -> float:
    return sum(count(p) for p in prompts) / len(prompts)


def _tokens_per_example(t: Any, records: list[Any]) -> tuple[float, str]:
    """Mean tokens of an example (prompt + answer + EOS, cut at max_seq_len) over the records at
    hand, tokenised as `train` does; else 4 characters per token of the Alpaca prompt."""
    from ..core.prompts import get_format

    if not records:
        return float(t.max_seq_len), "max_seq_len (no records at hand)"
    try:
        from ..core.examples import tokenize_records
        from ..core.models import model_format

        tok = _tokenizer(t.model)
        fmt = model_format(t.model, t.format, t.system, tok, for_training=True)
        examples, _ = tokenize_records(
            records, tok, fmt, t.max_seq_len, t.train_on_inputs, assistant_turns=t.assistant_turns
        )
        if examples:
            return sum(len(e.input_ids) for e in examples) / len(examples), "tokenizer"
    except (UserError, OSError, ValueError):
        pass
    alpaca = get_format("alpaca")
    chars = [len(alpaca.prompt(r.instruction, r.input)) + len(r.output) for r in records]
    mean = min(t.max_seq_len, sum(chars) / len(chars) / fc.CHARS_PER_TOKEN + 1)
    return mean, f"{fc.CHARS_PER_TOKEN} characters per token"


def _judge_prompt_tokens(items: list[Any], count: Callable[[str], int], answer_tokens: int) -> float:
    """The judge's prompt with both answers at the infer stage's max_new_tokens (an upper bound)."""
    from ..judging.judge import JUDGE_PROMPT

    if not items:
        return 0.0
    sizes = []
    for r in items:
        block = f"\n### Input:\n{r.input}\n" if r.input else ""
        sizes.append(count(JUDGE_PROMPT.format(instruction=r.instruction, input_block=block, a="", b="")))
    return sum(sizes) / len(sizes) + 2 * answer_tokens
