"""Self-instruct's pure steps: the teacher prompt, parsing what teachers write, the filters,
and the settings that pick the teacher's endpoint and sampling."""

import importlib.util
import logging
import random
import sys

import pytest

from alpaca_forge import EngineConfig, Record, ValidationError
from alpaca_forge.core.config import build_config
from alpaca_forge.engines import cut_at_stop
from alpaca_forge.generate import FilterConfig, GenerateConfig
from alpaca_forge.generate.config import TeacherEngineConfig, TeacherSampling
from alpaca_forge.generate.steps import FILTERS, filter_reason, parse_tasks
from alpaca_forge.generate.teacher_prompt import MAX_TASKS_PER_REPLY, TEACHER_STOP, build_prompt, sample_demos

from fake_teacher import tasks_text

pytestmark = pytest.mark.unit

SEEDS = [
    Record(f"Seed instruction number {i}.", "" if i % 2 else f"input {i}", f"output {i}") for i in range(10)
]


def test_prompt_shows_three_numbered_demos_and_stops_at_the_next_instruction():
    demos = sample_demos(SEEDS, request_number=0, seed=42)
    prompt = build_prompt(demos)
    assert len(demos) == 3 and prompt.endswith("###\n4. Instruction:")
    for n, d in enumerate(demos, start=1):
        assert (
            f"###\n{n}. Instruction: {d.instruction}\n{n}. Input:\n{d.input or '<noinput>'}\n{n}. Output:\n{d.output}\n"
            in prompt
        )
    assert "20 new tasks" in prompt


def test_demo_sampling_is_a_function_of_seed_and_request():
    assert sample_demos(SEEDS, 7, seed=1) == sample_demos(SEEDS, 7, seed=1)
    assert len({tuple(r.instruction for r in sample_demos(SEEDS, k, seed=1)) for k in range(20)}) > 10
    assert sample_demos(SEEDS, 7, seed=1) != sample_demos(SEEDS, 7, seed=2)


CONTINUATION = """ Summarise the paragraph in one sentence.
4. Input:
The council voted on Tuesday to extend the library's opening hours to 9 pm on weekdays.
4. Output:
The council extended the library's weekday hours to 9 pm.
###
5. Instruction:   List three uses of baking soda around the house.
5. Input:
<No Input>
5. Output:
Cleaning ovens, deodorising fridges and softening water.

###
7. Instruction: Is the sentence in the past tense?
7. Input:
She walked home.
7. Output:
Yes.
###
8. Instruction: Give a synonym for "happy".
8. Input:
<noinput>
8. Output:
Joyful
###
9. Instruction: Translate "good night" into Spanish.
9. Input:
<noinput>
9. Output:
Buenas no"""


def test_parses_a_plain_continuation_with_skipped_numbers_and_noinput_variants():
    parsed = parse_tasks(CONTINUATION, first_number=4)
    assert [r.instruction for r in parsed.records] == [
        "Summarise the paragraph in one sentence.",
        "List three uses of baking soda around the house.",
        "Is the sentence in the past tense?",
        'Give a synonym for "happy".',
        'Translate "good night" into Spanish.',
    ]
    assert parsed.records[0].input.startswith("The council voted")
    assert parsed.records[1].input == "" and parsed.records[3].input == ""
    assert parsed.records[2] == Record("Is the sentence in the past tense?", "She walked home.", "Yes.")


def test_a_completion_cut_by_the_length_limit_loses_its_last_task():
    parsed = parse_tasks(CONTINUATION, first_number=4, finish_reason="length")
    assert len(parsed.records) == 4 and parsed.truncated == 1
    assert parsed.records[-1].instruction == 'Give a synonym for "happy".'


def test_chat_style_answers_with_preamble_and_bold_labels():
    reply = (
        "Sure! Here are some more tasks for you:\n\n"
        "**4. Instruction:** Name the largest planet in the solar system.\n"
        "**4. Input:** <noinput>\n"
        "**4. Output:** Jupiter.\n\n"
        "5) Instruction: Sort the numbers in ascending order.\n"
        "5) Input: 5, 2, 9\n"
        "5) Output: 2, 5, 9\n"
        "6. Instruction: Explain recursion.\n"  # no output: dropped, counted
    )
    parsed = parse_tasks(reply, first_number=4)
    assert parsed.records == [
        Record("Name the largest planet in the solar system.", "", "Jupiter."),
        Record("Sort the numbers in ascending order.", "5, 2, 9", "2, 5, 9"),
    ]
    assert parsed.unparseable == 1


def test_a_short_separator_line_is_not_part_of_the_output():
    parsed = parse_tasks(
        "Name a colour.\n4. Input:\n<noinput>\n4. Output:\nRed, as in C#\n#\n5. Instruction: x",
        first_number=4,
    )
    assert parsed.records == [Record("Name a colour.", "", "Red, as in C#")]


def test_garbage_yields_nothing_and_does_not_raise():
    for junk in ["", "I cannot help with that.", "###\n###", "Output: 42", "4. Input: x\n4. Output: y"]:
        assert parse_tasks(junk, first_number=4).records == []


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("Say hi now", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the picture of the sunset.", "blacklisted"),
        ("Please GO TO the shop and buy milk.", "blacklisted"),
        ("Summarise the attached FILES for me.", "blacklisted"),
        ("Write a program that sorts a list.", "banned_prefix"),
        ("- List three fruits that are red.", "starts_with_punctuation"),
        ("Éxplique la photosynthèse en une phrase.", "starts_non_ascii"),
        ("Explain the mapping between keys and values.", None),  # "map" is a whole word only
        ("Give three tips for staying healthy.", None),
    ],
)
def test_filters(instruction, reason):
    assert filter_reason(instruction, FilterConfig()) == reason
    assert reason is None or reason in FILTERS


def test_filters_are_configurable():
    config = FilterConfig(min_words=2, blacklist=("banana",), banned_prefixes=())
    assert filter_reason("Say hi", config) is None
    assert filter_reason("Peel a banana quickly.", config) == "blacklisted"
    assert filter_reason("Write a program that sorts.", config) is None


def test_an_empty_blacklist_drops_nothing():
    assert filter_reason("Give three tips for staying healthy.", FilterConfig(blacklist=())) is None


def test_filter_settings_are_checked_together():
    with pytest.raises(ValidationError) as e:
        FilterConfig(min_words=0, rouge_threshold=1.5)
    assert {p.where for p in e.value.problems} == {"--min-words", "--rouge-threshold"}
    with pytest.raises(ValidationError, match="below --min-words 10"):
        FilterConfig(min_words=10, max_words=5)


# ---------------------------------------------------------------------------------------------
# The cap: the stop strings end a reply before task 20


def test_the_stop_strings_keep_at_most_16_new_tasks_per_reply():
    """The prompt asks for 20 tasks after 3 demonstrations, but "\n20" (and "20.", "20 .") end
    the reply where task 20 would begin: tasks 4 to 19, 16 at most, as in the original."""
    assert MAX_TASKS_PER_REPLY == 16 and TEACHER_STOP == ("\n20", "20.", "20 .")
    written = tasks_text(4, random.Random(0), count=25)  # a teacher that runs on to task 28
    assert len(parse_tasks(written, first_number=4).records) == 25
    text, stopped = cut_at_stop(written, TEACHER_STOP)
    parsed = parse_tasks(text, first_number=4)
    assert stopped and len(parsed.records) == MAX_TASKS_PER_REPLY and parsed.unparseable == 0
    assert GenerateConfig(seeds="s", output="o", num_instructions=1).generation.stop == TEACHER_STOP


# ---------------------------------------------------------------------------------------------
# Which endpoint and sampling a request gets


def _config(**kw):
    return GenerateConfig(seeds="s.jsonl", output="o.jsonl", num_instructions=5, **kw)


def test_teacher_api_and_repetition_penalty_follow_the_engine():
    server = EngineConfig(engine="openai", base_url="http://127.0.0.1:9/v1", model="m")
    local, remote = _config(), _config(engine=server)
    assert local.api == "completions" and remote.api == "chat"
    assert _config(teacher_api="chat").api == "chat"
    # In-process a small model loops without a penalty; a server gets none (1.0 is not sent).
    assert local.sampling(7).repetition_penalty == 1.1 and remote.sampling(7).repetition_penalty == 1.0
    assert _config(repetition_penalty=1.3).sampling(0).repetition_penalty == 1.3
    s, r = local.sampling(12), remote.sampling(12)
    assert (s.seed, s.max_new_tokens, s.temperature, s.top_p, s.stop) == (12, 768, 0.7, 1.0, TEACHER_STOP)
    assert (r.seed, r.max_new_tokens, r.temperature, r.top_p, r.stop) == (12, 3072, 1.0, 1.0, TEACHER_STOP)


# ---------------------------------------------------------------------------------------------
# The teacher's defaults: by where it runs; an explicit value always wins


class _Lines(logging.Handler):
    """The alpaca_forge logger's messages (the CLI turns its propagation off)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def said():
    handler, logger = _Lines(), logging.getLogger("alpaca_forge")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def _llama_cpp_imports():
    return importlib.util.find_spec("llama_cpp") is not None


def test_an_in_process_teacher_defaults_to_768_tokens_at_0_7_in_llama_cpp(said):
    c = _config()
    assert (c.engine.engine, c.generation.max_new_tokens, c.generation.temperature) == (None, None, None)
    want = "llamacpp" if _llama_cpp_imports() else "transformers"
    assert (c.teacher.engine, c.settings.max_new_tokens, c.settings.temperature) == (want, 768, 0.7)
    recorded = c.to_dict()  # what the run manifest records: the values used
    assert recorded["engine"]["engine"] == want
    assert (recorded["generation"]["max_new_tokens"], recorded["generation"]["temperature"]) == (768, 0.7)
    explicit = _config(engine=EngineConfig(engine="transformers"))
    assert (explicit.teacher.engine, explicit.settings.max_new_tokens, explicit.settings.temperature) == (
        "transformers",
        768,
        0.7,
    )
    assert len(said) == (0 if _llama_cpp_imports() else 1), said


def test_a_server_teacher_keeps_alpacas_3072_tokens_at_1_0():
    c = _config(engine=EngineConfig(engine="openai", base_url="http://127.0.0.1:9/v1", model="m"))
    assert (c.teacher.engine, c.settings.max_new_tokens, c.settings.temperature, c.settings.top_p) == (
        "openai",
        3072,
        1.0,
        1.0,
    )
    assert c.to_dict()["generation"]["max_new_tokens"] == 3072


def test_explicit_settings_win_from_python_flags_and_yaml(tmp_path):
    server = EngineConfig(engine="openai", base_url="http://127.0.0.1:9/v1", model="m")
    given = _config(engine=server, generation=TeacherSampling(max_new_tokens=64, temperature=0.0))
    assert (given.settings.max_new_tokens, given.settings.temperature) == (64, 0.0)
    flags = {
        "seeds": "s",
        "output": "o",
        "num_instructions": 2,
        "max_new_tokens": 4000,
        "engine": "transformers",
    }
    c = build_config(GenerateConfig, flags)
    assert (c.teacher.engine, c.settings.max_new_tokens, c.settings.temperature) == (
        "transformers",
        4000,
        0.7,
    )
    recipe = tmp_path / "gen.yaml"  # as recipes/demo.yaml writes them
    recipe.write_text("seeds: s\noutput: o\nnum_instructions: 2\nengine: openai\nbase_url: http://h/v1\n"
                      "model: m\ntemperature: 0.2\n")  # fmt: skip
    c = build_config(GenerateConfig, {}, recipe)
    assert (c.teacher.engine, c.settings.max_new_tokens, c.settings.temperature) == ("openai", 3072, 0.2)
    assert c.resolved.resolved is c.resolved, "resolving twice changes nothing"


def test_which_models_run_in_llama_cpp_when_no_engine_is_named(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    gguf = "llamacpp" if _llama_cpp_imports() else "transformers"
    assert _config(engine=TeacherEngineConfig(model=str(tmp_path / "m.gguf"))).teacher.engine == gguf
    assert _config(engine=TeacherEngineConfig(model="smollm2-135m-instruct")).teacher.engine == gguf
    assert _config(engine=TeacherEngineConfig(model=str(folder))).teacher.engine == "transformers"
    # A name that resolves to nothing is left to transformers, whose loader says what is wrong.
    assert _config(engine=TeacherEngineConfig(model="no/such-model")).teacher.engine == "transformers"


def test_without_llama_cpp_the_teacher_falls_back_to_transformers_and_says_so_once(monkeypatch, said):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what the import machinery does with it
    c = _config()
    assert (c.teacher.engine, c.settings.max_new_tokens, c.settings.temperature) == ("transformers", 768, 0.7)
    c.to_dict()
    assert len(said) == 1 and "\n" not in said[0], said
    assert "llama-cpp-python is not installed" in said[0] and "make llamacpp" in said[0]
    assert _config(engine=TeacherEngineConfig(engine="transformers")).teacher.engine == "transformers"
    assert _config(engine=TeacherEngineConfig(engine="llamacpp")).teacher.engine == "llamacpp"
    assert len(said) == 1, "a named engine is no fallback: nothing more is said"


def test_a_base_url_without_engine_openai_is_refused():
    with pytest.raises(ValidationError, match="--base-url is for --engine"):
        _config(engine=TeacherEngineConfig(base_url="http://127.0.0.1:9/v1"))
