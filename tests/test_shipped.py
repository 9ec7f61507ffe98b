"""Files shipped with alpaca-forge, read as `package:NAME` by every command that reads a data
file; outputs refuse the prefix. Real files, the real CLI, a tiny random model, a fake teacher
on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from alpaca_forge import UserError
from alpaca_forge.core.config_fields import leaves
from alpaca_forge.core.errors import ValidationError
from alpaca_forge.core.files import check_output, refuse_existing
from alpaca_forge.core.records import read_records
from alpaca_forge.core.shipped import SHIPPED, input_path, shipped_folder
from alpaca_forge.data.config import ConvertConfig, StatsConfig, TokenizeConfig, ValidateConfig
from alpaca_forge.eval.config import LeaderboardConfig, PairwiseConfig
from alpaca_forge.eval.safety.config import SafetyConfig
from alpaca_forge.eval.safety.prompts import load_prompts
from alpaca_forge.generate.config import GenerateConfig
from alpaca_forge.infer.config import InferConfig
from alpaca_forge.train.config import TrainConfig

from conftest import REPO, assert_user_error, run_cli
from fake_teacher import FakeTeacher, Script

UNKNOWN = "package:nope.jsonl"


# ---------------------------------------------------------------------------------------------
# The shipped folder


@pytest.mark.unit
def test_the_table_names_every_shipped_file_and_counts_its_lines():
    folder = shipped_folder()
    assert sorted(p.name for p in folder.iterdir()) == sorted(SHIPPED)
    for name, what in SHIPPED.items():
        lines = [line for line in (folder / name).read_text().splitlines() if line.strip()]
        assert what.startswith(f"{len(lines)} "), (name, what, len(lines))


@pytest.mark.unit
def test_the_wheel_ships_the_folder():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["alpaca_forge"]
    rel = shipped_folder().relative_to(REPO / "src" / "alpaca_forge")
    assert all(any(Path(rel, name).match(g) for g in globs) for name in SHIPPED)


@pytest.mark.unit
def test_every_input_flag_says_which_shipped_files_it_reads():
    wanted = {
        GenerateConfig: ("seeds", "package:demo-seeds.jsonl"),
        TrainConfig: ("data", "package:demo-seeds.jsonl"),
        InferConfig: ("input", "package:demo-eval.jsonl"),
        PairwiseConfig: ("set", "package:demo-eval.jsonl"),
        LeaderboardConfig: ("set", "package:demo-eval.jsonl"),
        SafetyConfig: ("prompts", "package:redteam.jsonl"),
        ValidateConfig: ("files", "package:demo-seeds.jsonl"),
        StatsConfig: ("file", "package:demo-seeds.jsonl"),
        ConvertConfig: ("file", "package:demo-seeds.jsonl"),
        TokenizeConfig: ("file", "package:demo-seeds.jsonl"),
    }
    for cls, (field, name) in wanted.items():
        leaf = next(leaf for leaf in leaves(cls) if leaf.path == (field,))
        assert name in leaf.help, (cls.__name__, leaf.help)


# ---------------------------------------------------------------------------------------------
# Reading and refusing


@pytest.mark.unit
def test_records_read_from_a_shipped_file_keep_its_name_in_messages():
    assert len(read_records("package:demo-seeds.jsonl")) == 32
    assert len(read_records("package:demo-eval.jsonl", require_output=False)) == 12
    with pytest.raises(ValidationError) as e:
        read_records("package:redteam.jsonl")  # prompts, not records
    assert e.value.problems[0].where == "package:redteam.jsonl:1"


@pytest.mark.unit
def test_an_unknown_name_is_refused_with_the_list_of_shipped_ones():
    for read in (lambda: input_path(UNKNOWN), lambda: read_records(UNKNOWN)):
        with pytest.raises(UserError) as e:
            read()
        assert "ships no file of that name" in str(e.value)
        assert all(f"package:{name}" in e.value.fix for name in SHIPPED)


@pytest.mark.unit
def test_the_red_team_set_is_the_shipped_file_by_default():
    default, named = load_prompts(), load_prompts("package:redteam.jsonl")
    assert len(default) == 60 and default == named
    assert default[0].where == "package:redteam.jsonl:1"


@pytest.mark.unit
def test_an_output_never_writes_into_the_package(tmp_path):
    for name in ("package:demo-seeds.jsonl", "package:new.jsonl"):
        with pytest.raises(UserError, match=r"--output package:.*only read, never written"):
            check_output(name)
        with pytest.raises(UserError, match="--output package:"):
            refuse_existing(name, force=True, folder=True)
    assert sorted(p.name for p in shipped_folder().iterdir()) == sorted(SHIPPED)


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.integration
def test_cli_data_validate_a_shipped_file():
    done = run_cli("data", "validate", "package:demo-seeds.jsonl")
    assert done.returncode == 0, done.stderr
    assert "32" in done.stdout + done.stderr


@pytest.mark.integration
def test_cli_infer_reads_the_shipped_eval_set(tiny_model_dir, tmp_path):
    out = tmp_path / "pred.jsonl"
    done = run_cli(
        "infer", "--model", str(tiny_model_dir), "--input", "package:demo-eval.jsonl", "--output", str(out),
        "--max-new-tokens", "2", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    shipped = read_records("package:demo-eval.jsonl", require_output=False)
    assert [r["instruction"] for r in rows] == [r.instruction for r in shipped] and len(rows) == 12


@pytest.mark.integration
def test_cli_generate_from_the_shipped_seeds(tmp_path):
    script = Script()
    seeds = {r.instruction for r in read_records("package:demo-seeds.jsonl")}
    with FakeTeacher(script) as url:
        done = run_cli(
            "generate", "--seeds", "package:demo-seeds.jsonl", "--output", str(tmp_path / "gen.jsonl"),
            "--engine", "openai", "--base-url", url, "--model", "fake", "--num-instructions", "5",
            "--max-retries", "1", "--timeout-s", "10",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 5
    prompt = script.seen[0]["messages"][0]["content"]
    assert sum(s in prompt for s in seeds) == 3  # the demonstrations are shipped seed tasks


@pytest.mark.integration
def test_cli_an_unknown_name_lists_the_shipped_files(tmp_path):
    for args in (
        ("data", "validate", UNKNOWN),
        ("data", "stats", UNKNOWN, "--plot", str(tmp_path / "p.png")),
        ("infer", "--input", UNKNOWN, "--output", str(tmp_path / "p.jsonl")),
    ):
        assert_user_error(run_cli(*args), UNKNOWN, "package:demo-seeds.jsonl (32 seed tasks)")


@pytest.mark.integration
def test_cli_an_output_in_the_package_is_refused(tmp_path):
    done = run_cli(
        "data", "convert", "package:demo-seeds.jsonl", "--to", "alpaca", "--output", "package:x.jsonl"
    )
    assert_user_error(done, "--output package:x.jsonl", "only read", "--output x.jsonl")
    assert not (shipped_folder() / "x.jsonl").exists()
    converted = tmp_path / "seeds.alpaca.jsonl"
    ok = run_cli("data", "convert", "package:demo-seeds.jsonl", "--to", "alpaca", "--output", str(converted))
    assert ok.returncode == 0, ok.stderr
    assert len(converted.read_text().splitlines()) == 32
