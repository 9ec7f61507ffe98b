"""The config machinery every stage uses: flags from the dataclass, YAML with file:line, every
problem at once, ranges checked before any work. The sweep at the end goes through every numeric
flag of every command with an out-of-range value."""

import argparse
import dataclasses

import pytest

from alpaca_forge import GenerationSettings, ValidationError
from alpaca_forge.cli import build_parser
from alpaca_forge.core.config import REQUIRED, Config, build_config, nested, setting
from alpaca_forge.core.config_fields import base_type, leaves
from alpaca_forge.engines import EngineConfig

from conftest import run_cli


@dataclasses.dataclass(frozen=True)
class Inner(Config):
    size: int = setting(3, "how many", ge=1)
    name: str | None = setting(None, "a name")


@dataclasses.dataclass(frozen=True)
class Outer(Config):
    data: str = setting(REQUIRED, "the data")
    rate: float = setting(0.5, "a share", gt=0, lt=1)
    tags: tuple[str, ...] = setting(("a",), "labels", sep=",")
    inner: Inner = nested(Inner, "inner")

    def check(self):
        if self.inner.size > 5 and self.rate > 0.9:
            yield "rate", "a large size needs a small rate", "lower --rate"


@pytest.mark.unit
def test_python_construction_is_checked_and_coerced():
    assert Inner(size="4").size == 4
    with pytest.raises(ValidationError) as e:
        Inner(size=0)
    assert "--size" in str(e.value) and "at least 1" in str(e.value)


@pytest.mark.unit
def test_every_problem_at_once_with_its_flag():
    with pytest.raises(ValidationError) as e:
        build_config(Outer, {"rate": "2", "size": "zero"})
    text = str(e.value)
    assert (
        "--data: is required" in text
        and "--rate: must be below 1" in text
        and "--size: must be a whole number" in text
    )
    assert "3 problems" in text


@pytest.mark.unit
def test_yaml_flat_and_nested_with_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: x.jsonl\ntags: [b, c]\ninner:\n  size: 4\n")
    got = build_config(Outer, {"rate": 0.25}, cfg)
    assert (got.data, got.rate, got.tags, got.inner.size) == ("x.jsonl", 0.25, ("b", "c"), 4)
    assert build_config(Outer, {}, cfg).rate == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nrat: 0.3\nsize: -1\ninner:\n  nmae: q\n")
    with pytest.raises(ValidationError) as e:
        build_config(Outer, {}, bad)
    text = str(e.value)
    assert f"{bad}:2: unknown setting 'rat'" in text and "rate" in text  # the close name is suggested
    assert f"{bad}:5: unknown setting 'nmae'" in text
    assert f"{bad}:3: 'size' must be at least 1" in text


@pytest.mark.unit
def test_flags_win_over_the_file_and_cross_field_checks_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: x\nrate: 0.95\n")
    with pytest.raises(ValidationError, match=r"c.yaml:2: a large size needs a small rate"):
        build_config(Outer, {"size": 9}, cfg)
    assert build_config(Outer, {"size": 9, "rate": 0.1}, cfg).rate == 0.1


@dataclasses.dataclass(frozen=True)
class Judged(Config):
    rate: float = setting(0.5, "a share", gt=0, lt=1)
    judge: EngineConfig = nested(EngineConfig, "judge", prefix="judge")


@pytest.mark.unit
def test_a_check_names_the_settings_as_the_user_gave_them(tmp_path):
    """EngineConfig.check says --engine and --base-url; under the judge prefix they are
    --judge-engine and --judge-base-url on the command line, judge_base_url in YAML."""
    server = {"judge_engine": "openai", "judge_model": "m"}
    for flags in (server, {**server, "rate": 2}):  # also beside a problem pydantic finds first
        with pytest.raises(ValidationError) as e:
            build_config(Judged, flags)
        text = str(e.value)
        assert (
            "--judge-base-url: --judge-engine openai needs --judge-base-url (the server's API base)" in text
        )
        assert "fix: e.g. --judge-base-url http://127.0.0.1:8000/v1" in text
        assert "--base-url" not in text.replace("--judge-base-url", "")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("judge_engine: openai\njudge_model: m\njudge_base_url: ftp://host\n")
    with pytest.raises(ValidationError) as e:
        build_config(Judged, {}, cfg)
    text = str(e.value)
    assert f"{cfg}:3: judge_base_url 'ftp://host' is not an http(s) URL" in text
    assert "fix: e.g. judge_base_url: http://127.0.0.1:8000/v1" in text and "--" not in text
    cfg.write_text("judge_base_url: http://127.0.0.1:9/v1\n")
    with pytest.raises(ValidationError) as e:
        build_config(Judged, {}, cfg)
    assert f"{cfg}:1: judge_base_url is for judge_engine: openai" in str(e.value)
    assert "fix: add judge_engine: openai, or drop judge_base_url" in str(e.value)
    # Built in Python, a config has no prefix: its own flags.
    with pytest.raises(ValidationError, match="--base-url: --engine openai needs --base-url"):
        EngineConfig(engine="openai", model="m")


@pytest.mark.integration
def test_a_missing_server_url_is_named_by_the_commands_own_flag():
    judged = run_cli("eval", "pairwise", "--set", "s.jsonl", "--a", "a.jsonl", "--b", "b.jsonl",
                     "--output", "o", "--judge-engine", "openai", "--judge-model", "m")  # fmt: skip
    assert judged.returncode == 2 and "Traceback" not in judged.stderr, judged.stderr
    assert "--judge-engine openai needs --judge-base-url" in judged.stderr, judged.stderr
    assert "e.g. --judge-base-url http://" in judged.stderr, judged.stderr
    generated = run_cli("generate", "--seeds", "s.jsonl", "--output", "o.jsonl", "--num-instructions", "1",
                        "--engine", "openai", "--model", "m")  # fmt: skip
    assert generated.returncode == 2 and "--engine openai needs --base-url" in generated.stderr, (
        generated.stderr
    )


@pytest.mark.unit
def test_settings_record_as_json():
    assert GenerationSettings(stop=("a",)).to_dict()["stop"] == ["a"]
    assert EngineConfig().to_dict()["engine"] == "transformers"


# ---------------------------------------------------------------------------------------------
# Every command: every numeric flag's range, every flag's help


def _commands():
    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}".strip())
        cls = parser.get_default("config_class")
        if cls is not None:
            yield name, cls

    return dict(walk(build_parser(), ""))


def _out_of_range(bounds: dict, t: type) -> str:
    if "ge" in bounds:
        v = bounds["ge"] - 1
    elif "gt" in bounds:
        v = bounds["gt"] - (1 if t is int else 0)
    elif "le" in bounds:
        v = bounds["le"] + 1
    else:
        v = bounds["lt"]
    return str(int(v) if t is int else float(v))


def _required_args(cls) -> list[str]:
    args = []
    for leaf in leaves(cls):
        if leaf.default is REQUIRED:
            if leaf.field.metadata.get("positional"):
                args.append("x")
            else:
                args += [leaf.flag, "x"]
    return args


COMMANDS = _commands()


@pytest.mark.unit
def test_every_stage_registers_a_config():
    assert {
        "generate",
        "data validate",
        "data stats",
        "data tokenize",
        "train",
        "prompt",
        "chat",
        "infer",
        "serve",
        "export merge",
        "export diff",
        "export recover",
        "export gguf",
    } <= set(COMMANDS)


@pytest.mark.integration
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_numeric_flag_rejects_an_out_of_range_value(tmp_path, command):
    """All of a command's out-of-range numbers in one run: exit 2, every flag named with its
    range, no traceback, nothing loaded or written."""
    cls = COMMANDS[command]
    numeric = [
        leaf
        for leaf in leaves(cls)
        if leaf.bounds and base_type(leaf.type) in (int, float) and leaf.field.metadata.get("cli", True)
    ]
    if not numeric:
        pytest.skip(f"{command} has no numeric settings")
    bad = []
    for leaf in numeric:
        bad += [f"{leaf.flag}={_out_of_range(leaf.bounds, base_type(leaf.type))}"]
    r = run_cli(*command.split(), *_required_args(cls), *bad)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "loading" not in r.stderr
    for leaf in numeric:
        assert f"{leaf.flag}: must be" in r.stderr, (leaf.flag, r.stderr)
    assert f"{len(numeric)} problem" in r.stderr


@pytest.mark.integration
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_has_help_and_a_config_file_flag(command):
    for leaf in leaves(COMMANDS[command]):
        assert leaf.help, f"{command}: {leaf.flag} has no help line"
    assert run_cli(*command.split(), "--help").returncode == 0


# The engine + generation block of the commands that make text, declared once in engines.config.
TEXT_STAGES = {  # command: (required settings, the stage's own default temperature)
    "chat": ({}, 0.7),
    "infer": ({"input": "i.jsonl", "output": "o.jsonl"}, 0.0),
    "prefer": ({"input": "i.jsonl", "output": "o.jsonl"}, 0.7),
    "eval safety": ({"output": "out"}, 0.0),
    "generate": ({"seeds": "s.jsonl", "output": "o.jsonl", "num_instructions": 1}, 0.7),  # in-process
}


@pytest.mark.unit
def test_every_command_that_makes_text_takes_the_one_engine_block():
    from alpaca_forge.engines.config import TextStageConfig

    with_generation = {
        command
        for command, cls in COMMANDS.items()
        if any(f.name == "generation" for f in dataclasses.fields(cls))
    }
    assert with_generation == set(TEXT_STAGES)
    assert all(issubclass(COMMANDS[command], TextStageConfig) for command in TEXT_STAGES)


@pytest.mark.unit
@pytest.mark.parametrize("command", sorted(TEXT_STAGES))
def test_the_engine_block_keeps_its_paths_flags_and_per_stage_defaults(command):
    cls, (required, temperature) = COMMANDS[command], TEXT_STAGES[command]
    paths = {leaf.name: leaf.path for leaf in leaves(cls)}
    # Paths the recipe and the runners read; the penalty is one flag outside the generation group.
    assert paths["model"] == ("engine", "model") and paths["temperature"] == ("generation", "temperature")
    assert paths["repetition_penalty"] == ("repetition_penalty",)
    assert ("generation", "repetition_penalty") not in paths.values()
    server = EngineConfig(engine="openai", base_url="http://127.0.0.1:9/v1", model="m")
    local, remote = cls(**required), cls(**required, engine=server)
    assert not local.on_server and remote.on_server
    assert (local.settings.repetition_penalty, remote.settings.repetition_penalty) == (1.1, 1.0)
    assert cls(**required, repetition_penalty=1.3).settings.repetition_penalty == 1.3
    assert local.settings.temperature == temperature
    # generate leaves it unset (None) until it knows where the teacher runs (generate/teacher.py)
    assert local.generation.temperature == (None if command == "generate" else temperature)
    with pytest.raises(ValidationError, match="--repetition-penalty"):
        cls(**required, repetition_penalty=0)
