"""`alpaca-forge run`: recipes end to end on a tiny random model, a scripted teacher and judge on
loopback, and llama.cpp for the export; skipping, --from, kill -9 and resume; the dry run's
forecast against a hand computation; every shipped recipe loads and dry-runs; bad recipes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fake_judge import FakeJudge

from conftest import CLI, VENDORED_DATA, assert_user_error, run_cli
from fake_teacher import FakeTeacher, Script

REPO = Path(__file__).resolve().parent.parent
SEEDS = VENDORED_DATA / "seed_tasks.jsonl"
EVAL_SET = VENDORED_DATA / "eval" / "user_oriented_instructions.jsonl"
NOWHERE = "http://127.0.0.1:9/v1"  # a server never reached: these runs stop before any request


def _prefer_longer(ask) -> str:
    return "A" if len(ask.a) >= len(ask.b) else "B"


@dataclass(frozen=True)
class Servers:
    teacher: str  # the scripted teacher's API base
    judge: str
    script: Script  # what the teacher was asked


@pytest.fixture(scope="module")
def servers():
    script = Script()
    with FakeTeacher(script) as teacher, FakeJudge(_prefer_longer) as judge:
        yield Servers(teacher, judge, script)


def write_recipe(
    folder: Path, model: Path, teacher: str, judge: str, *, name: str = "tiny", **changes
) -> Path:
    """A whole recipe in seconds: the scripted teacher, a tiny Llama, the scripted judge."""
    recipe = {
        "name": name,
        "run_dir": "run",
        "description": "the tiny test recipe",
        "forecast": {"teacher_records_per_request": 10, "gpu": "cpu", "parameters": 1.0e5},
        "stages": {
            "generate": {
                "seeds": str(SEEDS),
                "num_instructions": 12,
                "engine": "openai",
                "base_url": teacher,
                "model": "fake-teacher",
                "concurrency": 2,
                "price_prompt_per_1m": 1.0,
                "price_completion_per_1m": 2.0,
            },
            "data": {"include_seeds": True, "clean": {"checks": ["empty_output", "refusal"]}},
            "train": {
                "model": str(model),
                "method": "full",
                "format": "alpaca",
                "learning_rate": 5.0e-3,  # a visible change in a few steps: answers differ, so they are judged
                "max_seq_len": 512,
                "epochs": 1,
                "batch_size": 4,
                "save_steps": 2,
                "logging_steps": 1,
            },
            "infer": {"input": str(EVAL_SET), "limit": 4, "max_new_tokens": 8, "batch_size": 4},
            "eval": {
                "judge_engine": "openai",
                "judge_base_url": judge,
                "judge_model": "fake-judge",
                "bootstrap_samples": 200,
            },
            "export": {"quant": "f32", "verify_prompts": 4},
        },
    }
    for path, value in changes.items():
        node = recipe
        *parents, last = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = folder / "recipe.yaml"
    path.write_text("# alpaca-forge run recipe.yaml\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def _actions(result) -> dict[str, str]:
    """The plan lines, `  STAGE     ACTION   why`, as {stage: action}."""
    from alpaca_forge.run.recipe import STAGES

    lines = [line for line in result.stdout.splitlines() if line[2:11].strip() in STAGES]
    return {line[2:11].strip(): line[12:20].strip() for line in lines}


@pytest.mark.integration
@pytest.mark.llamacpp
def test_a_tiny_recipe_end_to_end_then_skipped_then_rerun_from_a_change(tmp_path, tiny_model_dir, servers):
    teacher, judge = servers.teacher, servers.judge
    # the evaluation set holds one seed task, reworded a little: the data stage keeps it out of training
    leaked = json.loads(SEEDS.read_text().splitlines()[3])
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(
        json.dumps({"instruction": leaked["instruction"].replace(".", "!"), "input": leaked["instances"][0]["input"]})
        + "\n"
        + EVAL_SET.read_text()
    )
    def tiny(**changes):
        return write_recipe(
            tmp_path, tiny_model_dir, teacher, judge, stages__infer__input="eval.jsonl",  # beside the recipe
            stages__data__min_score=3, stages__data__judge_model="rule:longer", **changes,
        )  # fmt: skip

    recipe = tiny()
    first = run_cli("run", str(recipe))
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "run"
    assert set(_actions(first).values()) == {"run"}
    state = _state(run_dir)
    assert all(s["status"] == "done" for s in state["stages"].values())
    data = state["stages"]["data"]["figures"]
    found = data["decontamination"]
    assert found["dropped"] == 1 and found["checked"] == 36 and found["matched_items"] == 1
    (dropped,) = [json.loads(line) for line in (run_dir / "data" / "contaminated.jsonl").read_text().splitlines()]
    assert leaked["instruction"] in json.dumps(dropped)
    # the judge (a rule: longer outputs rate higher) rated the 35 left; those under 3 are out
    scored = [json.loads(line) for line in (run_dir / "data" / "scored.jsonl").read_text().splitlines()]
    best = [r for r in scored if r["score"] and r["score"]["overall"] >= 3]
    assert len(scored) == 35 and data["score"]["rated"] == 35 and 0 < len(best) < 35
    assert data["records"] == len(best) == data["from_teacher"] + data["from_seeds"]
    assert data["score"]["scored_out"] == 35 - len(best)
    html = (run_dir / "report.html").read_text()
    assert "overlapping the evaluation set" in html and "rule:longer" in html
    # every stage's product is where the recipe put it
    for rel in ("generate/records.jsonl", "data/train.jsonl", "train/config.json", "infer/before.jsonl",
                "infer/after.jsonl", "eval/report.json", "export/model.f32.gguf", "preflight.txt",
                "manifest.json", "report.html", "forecast.json", "recipe.yaml"):  # fmt: skip
        assert (run_dir / rel).exists(), rel
    assert "⟦" in (run_dir / "preflight.txt").read_text()  # the masked prompt is shown
    pre = json.loads((run_dir / "preflight.json").read_text())
    assert pre["ok"] and pre["eos_trained"] == pre["examples"] == data["records"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["versions"]["alpaca-forge"] and manifest["versions"]["torch"]
    assert manifest["tokens"]["teacher_completion"] > 0 and manifest["cost"]["teacher_usd"] > 0
    assert (
        manifest["licences"]["teacher"]["engine"] == "openai" and "terms" in manifest["licences"]["teacher"]
    )
    assert manifest["stages"]["train"]["settings"]["configs"]["train"]["data"].endswith("data/train.jsonl")
    weights = str(run_dir / "train")
    assert len(manifest["hashes"][weights]) == 64  # the weights' content hash
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["judgements"] == 8  # 4 items x both orders
    judged = state["stages"]["eval"]["figures"]
    assert judged["prompt_tokens"] > 0 and judged["completion_tokens"] > 0  # the judge's actual cost

    # nothing changed: every stage is skipped, and nothing is asked of the teacher again
    asked = len(servers.script.seen)
    again = run_cli("run", str(recipe))
    assert again.returncode == 0, again.stderr
    assert set(_actions(again).values()) == {"skipped"}
    assert len(servers.script.seen) == asked

    # a training setting changes: train and everything after it rerun; generate and data do not
    recipe = tiny(stages__train__learning_rate=1e-2)
    changed = run_cli("run", str(recipe))
    assert changed.returncode == 0, changed.stderr
    assert _actions(changed) == {
        "generate": "skipped", "data": "skipped", "train": "run", "infer": "run", "eval": "run", "export": "run",
    }  # fmt: skip

    # --from reruns the stage named and all after it, whatever the state says
    forced = run_cli("run", str(recipe), "--from", "eval")
    assert forced.returncode == 0, forced.stderr
    assert _actions(forced) == {
        "generate": "skipped", "data": "skipped", "train": "skipped", "infer": "skipped", "eval": "run", "export": "run",
    }  # fmt: skip

    # a data setting changes but its output does not: data reruns, and what follows is skipped
    recipe = tiny(stages__train__learning_rate=1e-2, stages__data__quality={"examples": 5})
    same = run_cli("run", str(recipe))
    assert same.returncode == 0, same.stderr
    assert _actions(same) == {
        "generate": "skipped", "data": "run", "train": "skipped", "infer": "skipped", "eval": "skipped",
        "export": "skipped",
    }  # fmt: skip

    # an output edited by hand is noticed: its stage reruns
    (run_dir / "data" / "train.jsonl").write_text(
        (run_dir / "data" / "train.jsonl").read_text().replace("a", "b", 1)
    )
    edited = run_cli("run", str(recipe))
    assert _actions(edited)["data"] == "run" and _actions(edited)["generate"] == "skipped"
    _check_report_in_a_browser(run_dir / "report.html")

    # the project moves (a new clone, another machine): the recipe and its run directory together
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(run_dir), str(elsewhere / "run"))
    shutil.move(str(recipe), str(elsewhere / "recipe.yaml"))
    shutil.move(str(eval_set), str(elsewhere / "eval.jsonl"))
    moved = run_cli("run", str(elsewhere / "recipe.yaml"))
    assert moved.returncode == 0, moved.stderr
    assert set(_actions(moved).values()) == {"skipped"}


def _check_report_in_a_browser(report: Path) -> None:
    """The report in headless Chromium: it loads from the file alone, every section is there,
    every chart is drawn, and the console stays clean."""
    from browser import open_chromium

    text = report.read_text()
    # nothing to fetch: every chart inlined, no stylesheet, script or font from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:|//)|url\(|<script|<link""", text, re.IGNORECASE)
    driver = open_chromium()
    try:
        driver.get(report.as_uri())
        from selenium.webdriver.common.by import By

        from alpaca_forge.run.report import SECTIONS

        for key in SECTIONS:
            section = driver.find_element(By.ID, key)
            assert section.is_displayed() and section.find_element(By.TAG_NAME, "h2").text
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 3  # data lengths, loss curve, win rate
        for img in images:
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        samples = driver.find_element(By.ID, "samples").text
        assert "before" in samples and "after" in samples
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()


@pytest.mark.integration
@pytest.mark.llamacpp
def test_a_run_killed_in_training_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, servers):
    teacher, judge = servers.teacher, servers.judge
    recipe = write_recipe(
        tmp_path, tiny_model_dir, teacher, judge,
        stages__train__epochs=None, stages__train__max_steps=300, stages__train__save_steps=5,
        stages__eval=None, stages__export=None, stages__infer=None,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(CLI), "-q", "run", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if (
                list((run_dir / "train").glob("checkpoint-*/.complete"))
                if (run_dir / "train").is_dir()
                else []
            ):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    state = _state(run_dir)
    assert state["stages"]["train"]["status"] == "running"
    assert state["stages"]["generate"]["status"] == "done"
    requests_log = (run_dir / "generate" / "records.requests.jsonl").read_text()
    resumed = run_cli("run", str(recipe))
    assert resumed.returncode == 0, resumed.stderr
    assert _actions(resumed) == {"generate": "skipped", "data": "skipped", "train": "resumed"}
    assert (
        run_dir / "generate" / "records.requests.jsonl"
    ).read_text() == requests_log  # the teacher was not asked again
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 300
    # this run trained only the steps after the checkpoint, not all 300 again
    assert summary["tokens_seen_this_run"] < summary["tokenized"]["tokens"] * summary["epochs_done"]


@pytest.mark.integration
def test_the_dry_run_forecast_matches_a_hand_computation(tmp_path):
    """Teacher: ceil(100 / 8) = 13 requests x 500 completion tokens at $2/M; training: max_steps
    x global batch x max_seq_len tokens, 6 x params x tokens FLOPs at 40% MFU of an H100 (989
    TFLOP/s), priced at $3/h; the judge: 5 items x 2 orders x 32 completion tokens at $10/M."""
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(
        "".join(json.dumps({"instruction": f"Say {w}.", "input": ""}) + "\n" for w in "abcde")
    )
    recipe = tmp_path / "big.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "big",
                "run_dir": "run",
                "forecast": {
                    "teacher_records_per_request": 8,
                    "teacher_completion_tokens_per_request": 500,
                    "gpu": "h100",
                    "mfu": 0.4,
                    "gpu_usd_per_hour": 3.0,
                    "parameters": 7.0e9,
                    "judge_price_prompt_per_1m": 0,
                    "judge_price_completion_per_1m": 10.0,
                },
                "launch": {"processes": 8},
                "stages": {
                    "generate": {
                        "seeds": str(SEEDS),
                        "num_instructions": 100,
                        "engine": "openai",
                        "base_url": "http://127.0.0.1:9/v1",
                        "model": "teacher",
                        "price_prompt_per_1m": 0,
                        "price_completion_per_1m": 2.0,
                    },
                    "data": {},
                    "train": {
                        "model": "not-cached/llama-7b",
                        "max_steps": 10,
                        "global_batch_size": 128,
                        "max_seq_len": 512,
                    },
                    "infer": {"input": str(eval_set), "max_new_tokens": 100},
                    "eval": {
                        "judge_engine": "openai",
                        "judge_base_url": "http://127.0.0.1:9/v1",
                        "judge_model": "j",
                    },
                },
            }
        )
    )
    r = run_cli("run", str(recipe), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert _actions(r) == {s: "to run" for s in ("generate", "data", "train", "infer", "eval")}
    from alpaca_forge.run.recipe import load_recipe
    from alpaca_forge.run.runner import make_forecast

    f = make_forecast(load_recipe(recipe))
    assert f.teacher.requests == 13 == math.ceil(100 / 8)
    assert f.teacher.completion_tokens == 13 * 500
    assert f.teacher.cost_usd == pytest.approx(13 * 500 * 2.0 / 1e6)
    tokens = 10 * 128 * 512
    assert f.train.tokens == tokens
    assert f.train.flops == pytest.approx(6 * 7e9 * tokens)
    hours = 6 * 7e9 * tokens / (0.4 * 989e12) / 3600
    assert f.train.accelerator_hours == pytest.approx(hours)
    assert f.train.wall_hours == pytest.approx(hours / 8)
    assert f.train.cost_usd == pytest.approx(hours * 3.0)
    assert f.judge.judgements == 10 and f.judge.completion_tokens == 10 * 32
    assert f.judge.cost_usd == pytest.approx(10 * 32 * 10.0 / 1e6)
    assert f.judge.prompt_tokens_per_judgement > 2 * 100  # both answers at max_new_tokens, and the prompt
    assert f.inference_tokens == 2 * 5 * 100
    assert f"${f.cost_usd:.2f}" in r.stdout and "GPU-hours" in r.stdout
    assert "the EOS check runs when the train stage starts" in r.stdout  # the 7B model is not here

    # the same as batches: a half-price teacher and judge; then evol (two requests a record, at
    # most seeds x rounds x 2) and magpie (one conversation a record, no seeds)
    from alpaca_forge.core.records import read_records

    batch = ("stages.generate.batch_dir=batch", "stages.generate.max_requests=40", "stages.eval.judge_batch_dir=jb")
    priced = make_forecast(load_recipe(recipe, batch))
    assert priced.teacher.requests == 13 and priced.teacher.cost_usd == pytest.approx(f.teacher.cost_usd / 2)
    assert priced.judge.cost_usd == pytest.approx(f.judge.cost_usd / 2)
    assert any("(batch: 0.5 x the list price)" in line for line in priced.lines())
    evol = make_forecast(load_recipe(recipe, ("stages.generate.method=evol", "stages.generate.evol_rounds=1")))
    seeds = len(read_records(SEEDS))
    assert evol.teacher.method == "evol" and evol.teacher.requests == min(math.ceil(100 / 0.5), seeds * 1 * 2)
    magpie = make_forecast(
        load_recipe(recipe, ("stages.generate.method=magpie", "stages.generate.seeds=null"))
    )
    assert magpie.teacher.requests == 100 and magpie.teacher.method == "magpie"


@pytest.mark.integration
@pytest.mark.parametrize("shipped", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_dry_runs(tmp_path, shipped):
    text = shipped.read_text()
    assert text.startswith(f"# alpaca-forge run recipes/{shipped.name}\n")  # headed by its command
    folder = tmp_path / "recipes"
    folder.mkdir()
    copy = folder / shipped.name
    shutil.copy(shipped, copy)
    # the user's own files a recipe names (the 175 seeds and the 252 instructions are not ours to ship)
    for name, stage in (yaml.safe_load(text)["stages"] or {}).items():
        for key in ("seeds", "input"):
            value = (stage or {}).get(key)
            if value and not str(value).startswith("package:"):
                target = folder / value
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(EVAL_SET if name == "infer" else SEEDS, target)
    (tmp_path / "configs" / "accelerate").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "accelerate" / "fsdp.yaml", tmp_path / "configs" / "accelerate")
    r = run_cli("run", str(copy), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "cost forecast:" in r.stdout and "training:" in r.stdout and "total:" in r.stdout


@pytest.mark.integration
def test_a_train_stage_asking_for_two_processes_runs_under_accelerate_launch(tmp_path, tiny_model_dir):
    """Two gloo processes on this CPU, as eight GPUs would be on a cluster: one model, trained by both."""
    recipe = write_recipe(
        tmp_path, tiny_model_dir, NOWHERE, NOWHERE,
        stages__generate=None, stages__data={"input": str(SEEDS)},
        stages__train__epochs=None, stages__train__max_steps=4,
        stages__infer=None, stages__eval=None, stages__export=None, launch={"processes": 2},
    )  # fmt: skip
    r = run_cli("run", str(recipe))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "train" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert (
        tmp_path / "run" / "train.launch.yaml"
    ).is_file()  # the stage's config, as the launched command read it


@pytest.mark.unit
def test_the_launch_command_for_several_processes():
    from alpaca_forge.run.stages import launch_command

    cmd = launch_command(Path("/r/train.launch.yaml"), 8, "configs/accelerate/fsdp.yaml", resume=True)
    assert cmd[1:] == [
        "-m", "accelerate.commands.launch", "--num_processes", "8", "--config_file", "configs/accelerate/fsdp.yaml",
        "-m", "alpaca_forge", "train", "--config", "/r/train.launch.yaml", "--resume",
    ]  # fmt: skip
    assert "--multi_gpu" in launch_command(Path("c.yaml"), 2, None, resume=False)  # no config: plain DDP


# ---------------------------------------------------------------------------------------------
# Bad recipes: clear errors before any compute


@pytest.mark.integration
def test_unknown_keys_and_wrong_types_are_all_listed_with_their_yaml_path(tmp_path, tiny_model_dir):
    recipe = write_recipe(
        tmp_path, tiny_model_dir, "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1",
        stages__train__epochs="three", stages__train__learnig_rate=1e-4, stages__generate__num_instructions=-5,
        stages__train__data="mine.jsonl", stages__bake={}, forecast__mfu=2,
    )  # fmt: skip
    r = run_cli("run", str(recipe), "--dry-run")
    assert_user_error(
        r,
        "(stages.train.epochs): 'epochs' must be a number",
        "(stages.train.learnig_rate): unknown setting 'learnig_rate'",
        "learning_rate",  # the close name is offered
        "(stages.generate.num_instructions): 'num_instructions' must be at least 1",
        "(stages.train.data): 'data' is set by the recipe",
        "(stages.bake): unknown stage 'bake'",
        "(forecast.mfu): 'mfu' must be at most 1",
        "6 problems in the recipe",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_stage_whose_input_is_missing(tmp_path, tiny_model_dir):
    missing = write_recipe(
        tmp_path, tiny_model_dir, NOWHERE, NOWHERE, stages__generate__seeds="nowhere/seeds.jsonl"
    )
    assert_user_error(
        run_cli("run", str(missing)), "(stages.generate.seeds)", "nowhere/seeds.jsonl does not exist"
    )
    no_source = write_recipe(
        tmp_path, tiny_model_dir, NOWHERE, NOWHERE, stages__generate=None, stages__data__include_seeds=None
    )
    assert_user_error(
        run_cli("run", str(no_source)), "(stages.data.input)", "the data stage has nothing to read"
    )
    uneven = write_recipe(
        tmp_path,
        tiny_model_dir,
        NOWHERE,
        NOWHERE,
        stages__train__global_batch_size=10,
        launch={"processes": 3},
    )
    assert_user_error(
        run_cli("run", str(uneven), "--dry-run"), "(stages.train.global_batch_size)", "is not a multiple of"
    )
    no_train = write_recipe(tmp_path, tiny_model_dir, NOWHERE, NOWHERE, stages__train=None)
    assert_user_error(run_cli("run", str(no_train)), "stage 'infer' reads the output of a 'train' stage")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_missing_server_url_is_named_by_the_key_the_recipe_would_have(tmp_path, tiny_model_dir):
    """EngineConfig.check says --base-url; in a recipe the user writes judge_base_url (eval's
    judge) and base_url (generate), so the problem says those, at the stage's line."""
    recipe = write_recipe(
        tmp_path,
        tiny_model_dir,
        NOWHERE,
        NOWHERE,
        stages__eval__judge_base_url=None,
        stages__generate__base_url=None,
    )
    lines = recipe.read_text().splitlines()
    generate, evaluate = lines.index("  generate:") + 1, lines.index("  eval:") + 1
    r = run_cli("run", str(recipe), "--dry-run")
    assert_user_error(
        r,
        f"{recipe}:{evaluate} (stages.eval.judge_base_url): judge_engine: openai needs judge_base_url",
        "fix: e.g. judge_base_url: http://127.0.0.1:8000/v1",
        f"{recipe}:{generate} (stages.generate.base_url): engine: openai needs base_url",
        "fix: e.g. base_url: http://127.0.0.1:8000/v1",
        "2 problems in the recipe",
    )
    assert "--" not in r.stderr, r.stderr


# The README's recipe, as a user saves it as recipes/mine.yaml in a clone: it must dry-run
# offline, with no API key set (a note says the key is missing, since a local server needs none).
README_RECIPE = """\
name: mine
run_dir: ../runs/mine
forecast: {gpu: h100, mfu: 0.35, gpu_usd_per_hour: 2.5, parameters: 6.7e9,
           judge_price_prompt_per_1m: 2.5, judge_price_completion_per_1m: 10}
launch: {processes: 8, accelerate_config: ../configs/accelerate/fsdp.yaml}
stages:
  generate: {seeds: package:demo-seeds.jsonl, num_instructions: 52000, engine: openai,
             base_url: https://api.openai.com/v1, model: gpt-4o-mini,
             price_prompt_per_1m: 0.15, price_completion_per_1m: 0.6}
  data: {clean: {checks: [empty_output, refusal]}, dedupe: {threshold: 0.7}}
  train: {model: huggyllama/llama-7b, epochs: 3, learning_rate: 2.0e-5, global_batch_size: 128}
  infer: {input: package:demo-eval.jsonl, max_new_tokens: 512}
  eval: {judge_engine: openai, judge_base_url: https://api.openai.com/v1, judge_model: gpt-4o}
  export: {quant: q4_k_m}
"""


@pytest.mark.integration
def test_the_readme_recipe_dry_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "configs" / "accelerate").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "accelerate" / "fsdp.yaml", tmp_path / "configs" / "accelerate")
    recipe = tmp_path / "recipes" / "mine.yaml"
    recipe.write_text(README_RECIPE)
    r = run_cli("run", str(recipe), "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "runs").exists()
    assert _actions(r) == {s: "to run" for s in ("generate", "data", "train", "infer", "eval", "export")}
    from alpaca_forge.run.recipe import load_recipe
    from alpaca_forge.run.runner import make_forecast

    f = make_forecast(load_recipe(recipe))
    assert f.teacher.requests == math.ceil(52000 / 8)  # 8 records asked per request, by default
    assert f.train.parameters == 6.7e9 and f.train.wall_hours == pytest.approx(f.train.accelerator_hours / 8)
    assert min(f.teacher.cost_usd, f.train.cost_usd, f.judge.cost_usd) > 0
    assert f"total: ${f.cost_usd:.2f}" in r.stdout and "no price set" not in r.stdout
    assert "$OPENAI_API_KEY is not set, so the generate and eval stages will send no API key" in r.stdout
    # Without forecast.parameters the size of a model not on this machine is asked for by its key.
    recipe.write_text(README_RECIPE.replace(" parameters: 6.7e9,", ""))
    assert_user_error(
        run_cli("run", str(recipe), "--dry-run"), "(forecast.parameters)", "set forecast.parameters: 6.7e9"
    )


@pytest.mark.integration
def test_a_run_directory_from_a_different_recipe_is_refused(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(
        json.dumps({"recipe_name": "other", "recipe_path": "/x/other.yaml", "stages": {}})
    )
    recipe = write_recipe(tmp_path, tiny_model_dir, NOWHERE, NOWHERE)
    assert_user_error(run_cli("run", str(recipe)), "belongs to recipe 'other'", "its own run_dir")
    (run_dir / "state.json").unlink()
    (run_dir / "notes.txt").write_text("mine")
    assert_user_error(run_cli("run", str(recipe)), "not a run directory")


@pytest.mark.integration
def test_a_recipe_whose_eos_check_fails_stops_before_any_compute(tmp_path, servers):
    """A tokenizer without an EOS token: the model could never learn to stop. The run stops at
    once, before the teacher is asked anything."""
    from alpaca_forge import get_format, save_model

    from conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    folder = save_model(model, tokenizer, tmp_path / "no-eos", get_format("alpaca"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    teacher, judge = servers.teacher, servers.judge
    before = len(servers.script.seen)
    recipe = write_recipe(tmp_path, folder, teacher, judge)
    r = run_cli("run", str(recipe))
    assert_user_error(r, "(stages.train)", "EOS")
    assert not (tmp_path / "run" / "generate").exists()
    assert len(servers.script.seen) == before


# ---------------------------------------------------------------------------------------------
# The wiring table


@pytest.mark.unit
def test_every_wire_joins_a_real_output_to_a_real_field_going_forward():
    from alpaca_forge.core.config import leaf_paths
    from alpaca_forge.run.wiring import CONDITIONS, OUTPUTS, ROLES, STAGES, WIRES

    for w in WIRES:
        assert w.output in OUTPUTS[w.from_stage], w
        fields = leaf_paths(ROLES[w.to_stage][w.into]).values()
        # a setting, or a nested config whole (the prefer stage's judge into eval's aligned role)
        assert any(f[: len(w.field)] == w.field for f in fields), w
        assert STAGES.index(w.from_stage) <= STAGES.index(w.to_stage), w  # data flows forward
        assert not w.when or w.when in CONDITIONS, w


@pytest.mark.unit
def test_every_wired_field_set_by_hand_is_listed_and_the_plan_holds_the_tables_paths(tmp_path):
    from alpaca_forge.core.errors import ValidationError
    from alpaca_forge.run.recipe import load_recipe
    from alpaca_forge.run.stages import plan

    model = "not-cached/model"
    recipe = write_recipe(tmp_path, Path(model), NOWHERE, NOWHERE)
    works = {w.name: w for w in plan(load_recipe(recipe))}
    run_dir = tmp_path / "run"
    assert works["generate"].configs["generate"].output == str(run_dir / "generate" / "records.jsonl")
    assert works["data"].configs["clean"].file == works["data"].configs["quality"].file
    assert works["data"].configs["dedupe"].file == works["data"].configs["clean"].output
    assert works["data"].configs["decontaminate"].file == works["data"].configs["dedupe"].output
    assert works["data"].configs["decontaminate"].against == (before_set := works["infer"].configs["before"].input,)
    assert works["data"].inputs["evaluation set"] == Path(before_set)  # a new eval set reruns the data stage
    assert works["train"].configs["train"].data == str(run_dir / "data" / "train.jsonl") == str(works["data"].outputs[0])
    before, after = works["infer"].configs["before"], works["infer"].configs["after"]
    assert before.engine.model == model and after.engine.model == str(run_dir / "train")
    judged = works["eval"].configs["eval"]
    assert (judged.a, judged.b) == (f"fine-tuned={after.output}", f"base={before.output}")
    assert judged.set == before.input and judged.judging.limit == 4  # infer answered the first 4
    assert works["export"].configs["gguf"].model == str(run_dir / "train")  # full: nothing to merge
    assert works["export"].configs["gguf"].output == str(run_dir / "export" / "model.f32.gguf")
    assert "merge" not in works["export"].configs

    lora = write_recipe(tmp_path, Path(model), NOWHERE, NOWHERE, stages__train__method="lora")
    export = {w.name: w for w in plan(load_recipe(lora))}["export"].configs
    assert export["merge"].adapter == str(run_dir / "train")
    assert export["gguf"].model == export["merge"].output == str(run_dir / "export" / "merged")

    by_hand = {
        "generate": {"output": "x.jsonl"},
        "data": {"quality": {"report": "q.json"}, "clean": {"file": "a"}, "dedupe": {"dropped": "d"}},
        "train": {"output": "out"},
        "infer": {"output": "o.jsonl", "model": "m"},
        "eval": {"set": "s", "a": "a", "b": "b", "output": "o"},
        "export": {"model": "m", "output": "o.gguf"},
    }
    changes = {
        f"stages__{stage}__{key}": value for stage, keys in by_hand.items() for key, value in keys.items()
    }
    changes["stages__data__clean"] = {**by_hand["data"]["clean"], "checks": ["empty_output"]}
    with pytest.raises(ValidationError) as raised:
        load_recipe(write_recipe(tmp_path, Path(model), NOWHERE, NOWHERE, **changes))
    listed = [p.where.split(" (")[-1].rstrip(")") for p in raised.value.problems]
    assert all("is set by the recipe" in p.message for p in raised.value.problems)
    assert sorted(listed) == sorted(
        [
            "stages.generate.output", "stages.data.quality.report", "stages.data.clean.file",
            "stages.data.dedupe.dropped", "stages.train.output", "stages.infer.output", "stages.infer.model",
            "stages.eval.set", "stages.eval.a", "stages.eval.b", "stages.eval.output", "stages.export.model",
            "stages.export.output",
        ]
    )  # fmt: skip


@pytest.mark.unit
def test_the_run_report_shows_evals_report_as_the_typed_reader_reads_it(tmp_path):
    """report.html's evaluation rows and sample tags come from eval's report.json read back
    through eval's typed reader: every headline figure there is the comparison's own."""
    from types import SimpleNamespace

    from alpaca_forge.eval.compare import compare
    from alpaca_forge.eval.report import read_pairwise_report, write_pairwise_report
    from alpaca_forge.judging.items import Item, System
    from alpaca_forge.judging.judge import Judgement
    from alpaca_forge.run.report import _evaluation

    items = [Item(f"t{k}", f"Say {k}.") for k in range(4)]
    tuned = System("tuned", "after.jsonl", {i.id: f"a good answer {i.id}" for i in items})
    base = System("base", "before.jsonl", {**{i.id: f"bad {i.id}" for i in items}, "t2": ""})
    orders = (("tuned", "base"), ("base", "tuned"))
    judged = [Judgement(i.id, a, b, "A" if a == "tuned" else "B", "") for i in items[:3] for a, b in orders]
    judged += [Judgement("t3", a, b, None, "no verdict here") for a, b in orders]  # unreadable both ways
    r = compare(items, tuned, base, judged, judge="fake-judge", samples=50)
    write_pairwise_report(r, tmp_path, title="tuned vs base", notes=["a note"])

    report = read_pairwise_report(tmp_path, flag="--report", fix="f")
    assert (report.a, report.b, report.judge) == ("tuned", "base", "fake-judge")
    assert (report.items, report.judged) == (4, 3)
    assert (report.wins, report.ties, report.losses) == (r.wins, r.ties, r.losses) == (3, 0, 0)
    assert (report.judgements, report.unreadable_verdicts) == (r.judgements, r.unreadable) == (8, 2)
    assert report.win_rate == r.win_rate and report.sign_test_p == r.sign_test_p
    assert report.position_consistency == r.position_consistency
    assert report.empty_answers == (0, 1) and report.mean_chars == (r.mean_chars_a, r.mean_chars_b)
    assert report.identical_answers == 0 and report.notes == ("a note",)
    outcomes = {o.id: o.outcome for o in report.per_item}
    assert outcomes == {"t0": "win", "t1": "win", "t2": "win", "t3": "unjudged"}

    state = SimpleNamespace(stages={"eval": SimpleNamespace(figures={"files": []})})
    shown = _evaluation(state, report)
    for cell in ("tuned", "base", "fake-judge", "3 / 4", "3 / 0 / 0", "2 of 8", "0 / 1", "<li>a note</li>"):
        assert cell in shown, cell
    assert "report.json is gone" in _evaluation(state, None)


@pytest.mark.unit
def test_set_writes_over_the_recipe_and_names_itself_in_problems(tmp_path):
    """`run --set KEY=VALUE`: one change for one run, the file untouched; what it wrote is named
    by the flag, not by a line of the file."""
    from alpaca_forge.core.errors import UserError, ValidationError
    from alpaca_forge.run import load_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(REPO / "recipes" / "demo.yaml", folder / "demo.yaml")
    before = (folder / "demo.yaml").read_text()
    recipe = load_recipe(
        folder / "demo.yaml",
        ("stages.train.max_steps=2", "stages.train.learning_rate=2e-4", "stages.infer.limit=4", "name=other"),
    )
    train = recipe.stages["train"]
    assert (train.max_steps, train.learning_rate, recipe.configs["infer"]["before"].limit, recipe.name) == (
        2, 2e-4, 4, "other",
    )  # fmt: skip
    assert train.epochs == 3  # the rest as the file says
    assert (folder / "demo.yaml").read_text() == before
    with pytest.raises(ValidationError) as bad:
        load_recipe(folder / "demo.yaml", ("stages.train.epochs=abc", "stages.train.epoch=1"))
    text = str(bad.value)
    assert "--set stages.train.epochs: must be a number" in text and "--set stages.train.epoch" in text
    for wrong in ("stages.train.epochs", "stages.train.epochs.x=1", "=1"):
        with pytest.raises(UserError, match="--set"):
            load_recipe(folder / "demo.yaml", (wrong,))
