"""Careless input, tried as a new user would: a sweep over every command.

Each case is one mistake (a missing or damaged file, an output that cannot be written, a model
that is not one, a device the machine lacks, a server that is not there, a config file that is not
one, a number that is not a number, a misspelt flag) run through the real CLI. Every one must exit
with status 2 and a message that names the culprit (its path, line, field or flag) and a fix,
never a traceback, and must leave the user's own files as they were. Nothing slow loads: where a
model is needed it is the tiny one, and servers are a closed loopback port.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli

CLOSED_PORT = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: refused at once
FAIL_FAST = ("--max-retries", "0", "--timeout-s", "2")
RECORD = {"instruction": "Name a primary colour.", "input": "", "output": "Blue."}


@dataclass(frozen=True)
class Attempt:
    """One careless command line and what its error message must name."""

    args: list[str]
    needles: list[str]
    stdin: str | None = None
    untouched: tuple[Path, ...] = ()  # the user's files, byte for byte the same afterwards


class Workspace:
    """A temporary folder with the files a case writes, and the tiny model when one is needed
    (requested lazily, so cases without a model build none)."""

    def __init__(self, root: Path, request: pytest.FixtureRequest):
        self.root, self._request = root, request

    @property
    def model(self) -> str:
        return str(self._request.getfixturevalue("tiny_model_dir"))

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return p

    def records(self, name: str = "data.jsonl", n: int = 5) -> Path:
        rows = [{**RECORD, "instruction": f"Name primary colour number {i + 1}."} for i in range(n)]
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def folder(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def train(self, *extra: str, data: Path | None = None) -> list[str]:
        """A `train` command line on the tiny model (or `--model` as given in `extra`)."""
        model = [] if "--model" in extra else ["--model", self.model]
        data_path = data or self.records("train.jsonl")
        return ["train", *model, "--data", str(data_path), "--output", str(self.path("run")), *extra]

    def infer(self, *extra: str, input: Path | None = None) -> list[str]:
        source = input or self.records("questions.jsonl")
        output = [] if "--output" in extra else ["--output", str(self.path("answers.jsonl"))]
        return ["infer", "--input", str(source), *output, *extra]

    def generate(self, *extra: str, seeds: Path | None = None, count: str | None = "5") -> list[str]:
        """A `generate` command line whose teacher is a server nobody runs: a case that got as
        far as asking it fails there, never loading a model."""
        source = seeds or self.records("seeds.jsonl")
        teacher = (
            [] if "--engine" in extra else ["--engine", "openai", "--base-url", CLOSED_PORT, "--model", "m"]
        )
        target = ["--num-instructions", count] if count is not None else []
        return [
            "generate", "--seeds", str(source), "--output", str(self.path("gen.jsonl")),
            *target, *teacher, *FAIL_FAST, *extra,
        ]  # fmt: skip


def _skip_with_cuda(why: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip(f"this machine has a CUDA GPU, so {why} is no mistake here")


CASES: dict[str, Callable[[Workspace], Attempt]] = {}


def case(fn: Callable[[Workspace], Attempt]) -> Callable[[Workspace], Attempt]:
    CASES[fn.__name__.replace("_", "-")] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# Input files: missing, not files, empty, not JSON, not UTF-8, cut off


@case
def input_missing(w: Workspace) -> Attempt:
    missing = w.path("alpaca_data.json")
    return Attempt(["data", "validate", str(missing)], [f"{missing}: no such file"])


@case
def input_is_a_directory(w: Workspace) -> Attempt:
    folder = w.folder("data")
    return Attempt(["data", "stats", str(folder)], [f"{folder}: is a directory"])


@case
def input_empty(w: Workspace) -> Attempt:
    empty = w.write("empty.jsonl", "")
    return Attempt(["data", "quality", str(empty)], [f"{empty}: the file is empty"])


@case
def seeds_only_blank_lines(w: Workspace) -> Attempt:
    blank = w.write("seeds.jsonl", "\n\n   \n")
    return Attempt(w.generate(seeds=blank), [f"{blank}: the file is empty"])


@case
def input_not_json(w: Workspace) -> Attempt:
    notes = w.write("notes.txt", "Some instructions I want to try:\nname three colours\n")
    return Attempt(
        ["data", "clean", str(notes), "--output", str(w.path("clean.jsonl"))],
        [f"{notes}:1: not valid JSON", f"{notes}:2: not valid JSON"],
        untouched=(notes,),
    )


@case
def input_binary_garbage(w: Workspace) -> Attempt:
    garbage = w.write("model.bin", bytes(range(256)) * 8)
    return Attempt(
        ["data", "dedupe", str(garbage), "--output", str(w.path("kept.jsonl"))],
        [f"{garbage}:", "not valid UTF-8"],
        untouched=(garbage,),
    )


@case
def input_latin_1(w: Workspace) -> Attempt:
    text = json.dumps({**RECORD, "output": "Bleu, comme le café."}, ensure_ascii=False) + "\n"
    latin = w.write("latin1.jsonl", text.encode("latin-1"))
    return Attempt(
        ["data", "split", str(latin), "--output-dir", str(w.path("splits"))],
        [f"{latin}:1: not valid UTF-8 (byte 0xe9", "iconv"],
    )


@case
def input_utf_16(w: Workspace) -> Attempt:  # what Windows Notepad saves as "Unicode"
    wide = w.write("questions.jsonl", (json.dumps(RECORD) + "\n").encode("utf-16"))
    return Attempt(w.infer(input=wide), [f"{wide}:1: not valid UTF-8 (byte 0xff"])


@case
def json_array_cut_off(w: Workspace) -> Attempt:
    cut = w.write("alpaca_data.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "Name a')
    return Attempt(
        ["data", "convert", str(cut), "--to", "messages", "--output", str(w.path("chat.jsonl"))],
        [f"{cut}[1]", "cut off"],
    )


@case
def json_array_trailing_comma(w: Workspace) -> Attempt:
    rows = ",\n".join(json.dumps(RECORD) for _ in range(2))
    comma = w.write("alpaca_data.json", f"[\n{rows},\n]\n")
    return Attempt(["data", "validate", str(comma)], [f"{comma}[2]", "not valid JSON"])


@case
def gzip_cut_off(w: Workspace) -> Attempt:  # a download or copy interrupted half way
    rows = "".join(json.dumps({**RECORD, "instruction": f"Task number {i}."}) + "\n" for i in range(2000))
    whole = gzip.compress(rows.encode("utf-8"))
    cut = w.write("data.jsonl.gz", whole[: len(whole) // 2])
    return Attempt(["data", "stats", str(cut), "--plot", str(w.path("lengths.png"))], [str(cut), "cut off"])


@case
def gzip_name_on_a_plain_file(w: Workspace) -> Attempt:
    plain = w.write("train.jsonl.gz", json.dumps(RECORD) + "\n")
    return Attempt(w.train(data=plain), [f"{plain}: cannot be read"])


# ---------------------------------------------------------------------------------------------
# Records: fields missing or of the wrong kind


@case
def record_missing_instruction(w: Workspace) -> Attempt:
    data = w.write("train.jsonl", json.dumps(RECORD) + "\n" + json.dumps({"input": "", "output": "x"}) + "\n")
    return Attempt(w.train(data=data), [f"{data}:2: field 'instruction' is missing"])


@case
def record_instruction_a_number(w: Workspace) -> Attempt:
    data = w.write("train.jsonl", json.dumps({**RECORD, "instruction": 42}) + "\n")
    return Attempt(
        ["data", "tokenize", str(data), "--model", w.model, "--show", "1"],
        [f"{data}:1: field 'instruction' must be a string"],
    )


@case
def records_are_plain_strings(w: Workspace) -> Attempt:
    strings = w.write("questions.json", json.dumps(["What is 2 + 2?", "Name a colour."]))
    return Attempt(w.infer(input=strings), [f"{strings}[0]", "expected a JSON object, got str"])


@case
def seeds_without_records(w: Workspace) -> Attempt:
    none = w.write("seed_tasks.json", "[]\n")
    return Attempt(w.generate(seeds=none), [f"{none}: holds no records"])


# ---------------------------------------------------------------------------------------------
# Outputs: a folder, under a file, the input itself, somebody else's file


@case
def output_is_a_directory(w: Workspace) -> Attempt:
    folder = w.folder("out")
    data = w.records()
    return Attempt(["data", "clean", str(data), "--output", str(folder)], [f"--output {folder}: is a folder"])


@case
def output_under_a_regular_file(w: Workspace) -> Attempt:
    afile = w.write("results", "not a folder\n")
    data = w.records()
    return Attempt(
        ["data", "dedupe", str(data), "--output", str(afile / "kept.jsonl")],
        [f"{afile} is a file, so nothing can be written under it"],
        untouched=(afile,),
    )


@case
def output_is_the_input(w: Workspace) -> Attempt:
    data = w.records()
    return Attempt(
        ["data", "convert", str(data), "--to", "alpaca", "--output", str(data)],
        [f"--output {data}: is the input file"],
        untouched=(data,),
    )


@case
def output_dir_holds_the_input(w: Workspace) -> Attempt:  # splitting the training half again
    train = w.records("splits/train.jsonl")
    return Attempt(
        ["data", "split", str(train), "--output-dir", str(train.parent)],
        [f"--output-dir {train}: is the input file"],
        untouched=(train,),
    )


@case
def output_empty_string(w: Workspace) -> Attempt:
    return Attempt(w.infer("--output", ""), ["--output", "is a folder"])


@case
def output_is_an_unrelated_file(w: Workspace) -> Attempt:
    notes = w.write("notes.txt", "shopping:\n- eggs\n- milk")  # no newline at the end
    return Attempt(
        w.infer("--model", w.model, "--output", str(notes)),
        [f"{notes}:1: not a line that `alpaca-forge infer` wrote"],
        untouched=(notes,),
    )


@case
def dropped_file_is_the_output(w: Workspace) -> Attempt:
    data = w.records()
    out = str(w.path("kept.jsonl"))
    return Attempt(["data", "dedupe", str(data), "--output", out, "--dropped", out], ["--dropped", out])


@case
def decontaminate_against_a_folder(w: Workspace) -> Attempt:
    data, folder = w.records(), w.folder("eval")
    return Attempt(
        ["data", "decontaminate", str(data), "--against", str(folder), "--output", str(w.path("kept.jsonl"))],
        [str(folder)],
        untouched=(data,),
    )


@case
def score_output_is_the_input(w: Workspace) -> Attempt:
    data = w.records()
    return Attempt(
        ["data", "score", str(data), "--output", str(data), "--judge-model", "rule:longer"],
        [f"--output {data}"],
        untouched=(data,),
    )


@case
def score_with_a_rule_that_is_not_one(w: Workspace) -> Attempt:
    data = w.records()
    return Attempt(
        ["data", "score", str(data), "--output", str(w.path("s.jsonl")), "--judge-model", "rule:nicest"],
        ["rule:nicest", "rule:longer"],
        untouched=(data,),
    )


@case
def train_output_is_the_data_file(w: Workspace) -> Attempt:
    data = w.records("train.jsonl")
    args = ["train", "--model", w.model, "--data", str(data), "--output", str(data)]
    return Attempt(args, [f"--output {data}: is a file, not a folder"], untouched=(data,))


# ---------------------------------------------------------------------------------------------
# Models: not a model, unknown, incomplete


@case
def model_empty_folder(w: Workspace) -> Attempt:
    empty = w.folder("my-model")
    return Attempt(["prompt", "--model", str(empty), "--instruction", "Hi"], [f"{empty}: no model weights"])


@case
def model_a_text_file(w: Workspace) -> Attempt:
    txt = w.write("model.txt", "SmolLM2-135M-Instruct\n")
    return Attempt(w.infer("--model", str(txt)), [f"{txt}: not a model"])


@case
def model_unknown_name(w: Workspace) -> Attempt:
    return Attempt(["chat", "--model", "smollm-135m"], ["unknown model 'smollm-135m'"], stdin="Hi\n")


@case
def model_folder_without_tokenizer(w: Workspace) -> Attempt:  # weights copied, tokenizer forgotten
    folder = w.folder("weights-only")
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((Path(w.model) / name).read_bytes())
    return Attempt(w.train("--model", str(folder)), [str(folder)])


@case
def model_weights_cut_off(w: Workspace) -> Attempt:  # a copy interrupted half way
    folder = w.folder("half-copied")
    for f in Path(w.model).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Attempt(w.infer("--model", str(folder)), [str(folder)])


@case
def model_gguf_that_is_not_one(w: Workspace) -> Attempt:
    fake = w.write("model.gguf", "<html>404 Not Found</html>\n")  # a failed download, saved
    data = w.records()
    return Attempt(["data", "tokenize", str(data), "--model", str(fake), "--show", "1"], [str(fake)])


# ---------------------------------------------------------------------------------------------
# Devices and precision the machine does not have


@case
def device_cuda_without_a_gpu(w: Workspace) -> Attempt:
    _skip_with_cuda("--device cuda")
    return Attempt(w.infer("--model", w.model, "--device", "cuda"), ["'cuda'", "--device cpu"])


@case
def device_unknown(w: Workspace) -> Attempt:
    return Attempt(["chat", "--model", w.model, "--device", "gpu"], ["unknown device 'gpu'"], stdin="Hi\n")


@case
def dtype_float16_training_on_cpu(w: Workspace) -> Attempt:
    _skip_with_cuda("float16 training")
    return Attempt(w.train("--dtype", "float16"), ["float16", "--dtype"])


@case
def qlora_on_cpu(w: Workspace) -> Attempt:
    _skip_with_cuda("QLoRA")
    return Attempt(w.train("--method", "qlora"), ["CUDA", "--method lora"])


# ---------------------------------------------------------------------------------------------
# Engines: a server half named, or not there


@case
def openai_engine_without_base_url(w: Workspace) -> Attempt:
    return Attempt(w.infer("--engine", "openai", "--model", "m"), ["--engine openai needs --base-url"])


@case
def openai_engine_without_model(w: Workspace) -> Attempt:
    args = w.generate("--engine", "openai", "--base-url", CLOSED_PORT)
    return Attempt(args, ["--engine openai needs --model"])


@case
def base_url_without_openai_engine(w: Workspace) -> Attempt:
    return Attempt(
        ["chat", "--base-url", "http://127.0.0.1:8000/v1"],
        ["--base-url is for --engine openai"],
        stdin="Hi\n",
    )


@case
def base_url_without_scheme(w: Workspace) -> Attempt:
    args = w.infer("--engine", "openai", "--model", "m", "--base-url", "127.0.0.1:8000/v1")
    return Attempt(args, ["--base-url '127.0.0.1:8000/v1'", "http"])


@case
def base_url_with_a_bad_port(w: Workspace) -> Attempt:
    args = w.infer("--engine", "openai", "--model", "m", "--base-url", "http://127.0.0.1:80a/v1", *FAIL_FAST)
    return Attempt(args, ["--base-url", "http://127.0.0.1:80a/v1"])


@case
def base_url_closed_port_infer(w: Workspace) -> Attempt:
    args = w.infer("--engine", "openai", "--model", "m", "--base-url", CLOSED_PORT, *FAIL_FAST)
    return Attempt(args, [CLOSED_PORT, "cannot connect", "--base-url"])


@case
def base_url_closed_port_chat(w: Workspace) -> Attempt:
    args = ["chat", "--engine", "openai", "--model", "m", "--base-url", CLOSED_PORT, *FAIL_FAST]
    return Attempt(args, [CLOSED_PORT, "cannot connect", "--base-url"], stdin="Hi\n")


@case
def base_url_closed_port_generate(w: Workspace) -> Attempt:
    return Attempt(w.generate(), [CLOSED_PORT, "cannot connect", "--base-url"])


# ---------------------------------------------------------------------------------------------
# --config files: missing, not YAML, not a mapping, unknown keys, wrong types, not UTF-8


@case
def config_missing(w: Workspace) -> Attempt:
    missing = w.path("configs/smollm2-cpu.yaml")
    return Attempt(["train", "--config", str(missing)], [f"{missing}: cannot read the config"])


@case
def config_a_directory(w: Workspace) -> Attempt:
    folder = w.folder("configs")
    return Attempt(["data", "stats", str(w.records()), "--config", str(folder)], [f"{folder}: cannot read"])


@case
def config_not_yaml(w: Workspace) -> Attempt:
    bad = w.write("infer.yaml", 'batch_size: 4\nstop: ["###"\nmax_new_tokens: 64\n')
    return Attempt(w.infer("--config", str(bad)), [f"{bad}:", "not valid YAML"])


@case
def config_a_list(w: Workspace) -> Attempt:
    listed = w.write("generate.yaml", "- num_instructions: 5\n- concurrency: 4\n")
    return Attempt(w.generate("--config", str(listed)), [f"{listed}: a config is a mapping"])


@case
def config_unknown_key(w: Workspace) -> Attempt:
    cfg = w.write("train.yaml", "method: lora\nepochs: 1\nlerning_rate: 0.0001\n")
    return Attempt(w.train("--config", str(cfg)), [f"{cfg}:3: unknown setting 'lerning_rate'"])


@case
def config_wrong_type(w: Workspace) -> Attempt:
    cfg = w.write("infer.yaml", "max_new_tokens: 64\nbatch_size: four\n")
    return Attempt(w.infer("--config", str(cfg)), [f"{cfg}:2: 'batch_size' must be a whole number"])


@case
def config_not_utf_8(w: Workspace) -> Attempt:
    cfg = w.write(
        "train.yaml", "epochs: 1\nsystem: Tu es un assistant serviable, café compris.\n".encode("latin-1")
    )
    return Attempt(w.train("--config", str(cfg)), [f"{cfg}:2", "UTF-8"])


# ---------------------------------------------------------------------------------------------
# Settings that cannot work together, or do nothing


@case
def lora_target_not_in_the_model(w: Workspace) -> Attempt:
    args = w.train("--method", "lora", "--lora-targets", "nonexistent_proj")
    return Attempt(args, ["--lora-targets", "nonexistent_proj", "q_proj"])


@case
def global_batch_not_a_multiple(w: Workspace) -> Attempt:
    args = w.train("--global-batch-size", "3", "--batch-size", "2")
    return Attempt(args, ["--global-batch-size 3", "--batch-size"])


@case
def split_val_size_beyond_the_data(w: Workspace) -> Attempt:
    data = w.records(n=5)
    args = ["data", "split", str(data), "--output-dir", str(w.path("splits")), "--val-size", "1000"]
    return Attempt(args, ["--val-size 1000", "of 5 records"])


@case
def clean_unknown_check(w: Workspace) -> Attempt:
    args = ["data", "clean", str(w.records()), "--output", str(w.path("c.jsonl")), "--checks", "nonsense"]
    return Attempt(args, ["--checks", "nonsense", "refusal"])


@case
def tokenize_with_nothing_to_do(w: Workspace) -> Attempt:
    return Attempt(["data", "tokenize", str(w.records()), "--model", w.model], ["--output", "--show"])


@case
def prompt_empty_instruction(w: Workspace) -> Attempt:
    return Attempt(["prompt", "--format", "alpaca", "--instruction", ""], ["--instruction", "empty"])


@case
def prompt_without_instruction(w: Workspace) -> Attempt:
    return Attempt(["prompt", "--format", "alpaca", "--input", "Some text."], ["--instruction: is required"])


@case
def generate_without_num_instructions(w: Workspace) -> Attempt:
    return Attempt(w.generate(count=None), ["--num-instructions: is required"])


# ---------------------------------------------------------------------------------------------
# Numbers that are not numbers, or out of range


@case
def batch_size_not_a_number(w: Workspace) -> Attempt:
    return Attempt(w.infer("--batch-size", "abc"), ["--batch-size: must be a whole number", "abc"])


@case
def learning_rate_not_a_number(w: Workspace) -> Attempt:
    return Attempt(w.train("--learning-rate", "fast"), ["--learning-rate: must be a number", "fast"])


@case
def temperature_negative(w: Workspace) -> Attempt:
    args = ["chat", "--model", w.model, "--temperature", "-1"]
    return Attempt(args, ["--temperature: must be at least 0"], stdin="Hi\n")


# ---------------------------------------------------------------------------------------------
# The command line itself: a misspelt flag or command, a flag without its value


@case
def misspelt_flag(w: Workspace) -> Attempt:
    return Attempt(w.infer("--batchsize", "4"), ["--batchsize", "alpaca-forge infer --help"])


@case
def misspelt_command(w: Workspace) -> Attempt:
    return Attempt(["trian", "--data", str(w.records())], ["'trian'", "alpaca-forge --help"])


@case
def flag_without_its_value(w: Workspace) -> Attempt:
    return Attempt(
        ["data", "clean", str(w.records()), "--output"], ["--output", "alpaca-forge data clean --help"]
    )


# ---------------------------------------------------------------------------------------------
# serve: settings that would make an unsafe or broken server fail before anything listens


@case
def serve_public_without_a_key(w: Workspace) -> Attempt:
    return Attempt(
        ["serve", "--host", "0.0.0.0", "--port", "0"], ["--host 0.0.0.0", "--api-key", "--insecure-no-auth"]
    )


@case
def serve_keys_file_without_ids(w: Workspace) -> Attempt:
    keys = w.write("keys.txt", "# who: key\nsk-alice-1\n")
    return Attempt(
        ["serve", "--api-keys-file", str(keys), "--port", "0"],
        [f"{keys}:2", "client-id: key"],
        untouched=(keys,),
    )


@case
def serve_rules_with_a_bad_pattern(w: Workspace) -> Attempt:
    rules = w.write("rules.yaml", "categories:\n  secrets:\n    - 'password('\n")
    return Attempt(
        ["serve", "--filter-rules", str(rules), "--port", "0"],
        [f"{rules}:3", "not a valid regular expression"],
        untouched=(rules,),
    )


@case
def export_gguf_over_an_existing_file(w: Workspace) -> Attempt:
    mine = w.write("model.gguf", "my earlier export")
    return Attempt(
        ["export", "gguf", "--model", w.model, "--output", str(mine), "--no-verify"],
        [f"--output {mine}: already exists", "--force"],
        untouched=(mine,),
    )


@case
def export_merge_of_a_model_not_an_adapter(w: Workspace) -> Attempt:
    return Attempt(
        ["export", "merge", "--adapter", w.model, "--output", str(w.path("merged"))],
        ["not a LoRA adapter folder", "train --method lora"],
    )


@case
def export_recover_from_a_folder_without_weights(w: Workspace) -> Attempt:
    empty = w.folder("diff")
    notes = w.write("diff/README.txt", "the diff will go here")
    return Attempt(
        ["export", "recover", "--base", w.model, "--diff", str(empty), "--output", str(w.path("out"))],
        [f"--diff {empty}", "no model weights"],
        untouched=(notes,),
    )


def _eval_set(w: Workspace, n: int = 3) -> Path:
    rows = [{"id": f"q{k}", "instruction": f"Question {k}?"} for k in range(n)]
    return w.write("set.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _predictions(w: Workspace, name: str, ids: list[int]) -> Path:
    rows = [{"instruction": f"Question {k}?", "input": "", "response": f"{name}'s answer {k}."} for k in ids]
    return w.write(name, "".join(json.dumps(r) + "\n" for r in rows))


@case
def eval_system_missing_an_instruction(w: Workspace) -> Attempt:
    s = _eval_set(w)
    a, b = _predictions(w, "a.jsonl", [0, 1, 2]), _predictions(w, "b.jsonl", [0, 2])
    return Attempt(
        ["eval", "pairwise", "--set", str(s), "--a", str(a), "--b", str(b), "--output", str(w.path("ev"))],
        [f"b ({b}) has no answer for 1 of the set's 3 instructions", "q1", "infer"],
        untouched=(a, b),
    )


@case
def eval_predictions_without_an_answer_field(w: Workspace) -> Attempt:
    s = _eval_set(w, 1)
    a = _predictions(w, "a.jsonl", [0])
    b = w.write("b.jsonl", json.dumps({"instruction": "Question 0?", "answer": "x"}) + "\n")
    return Attempt(
        ["eval", "pairwise", "--set", str(s), "--a", str(a), "--b", str(b), "--output", str(w.path("ev"))],
        [f"{b}:1", "no answer field", "--answer-field"],
    )


@case
def eval_judge_nobody_runs(w: Workspace) -> Attempt:
    s = _eval_set(w, 1)
    a, b = _predictions(w, "a.jsonl", [0]), _predictions(w, "b.jsonl", [0])
    args = [
        "eval", "pairwise", "--set", str(s), "--a", str(a), "--b", f"other={b}", "--output", str(w.path("ev")),
        "--judge-engine", "openai", "--judge-base-url", CLOSED_PORT, "--judge-model", "m",
        "--judge-max-retries", "0", "--judge-timeout-s", "2",
    ]  # fmt: skip
    return Attempt(args, ["127.0.0.1:9"])


@case
def prefer_from_a_folder_nobody_rated_in(w: Workspace) -> Attempt:
    s = _eval_set(w, 1)
    a, b = _predictions(w, "a.jsonl", [0]), _predictions(w, "b.jsonl", [0])
    args = [
        "prefer", "--from-ratings", str(w.folder("rate")), "--input", str(s), "--a", str(a),
        "--b", f"other={b}", "--output", str(w.path("pairs.jsonl")),
    ]  # fmt: skip
    return Attempt(args, ["ratings.jsonl", "nobody has rated"])


@case
def eval_leaderboard_with_one_system(w: Workspace) -> Attempt:
    s = _eval_set(w, 1)
    a = _predictions(w, "a.jsonl", [0])
    return Attempt(
        ["eval", "leaderboard", "--set", str(s), str(a), "--output", str(w.path("b"))],
        ["two or more systems"],
    )


@case
def eval_safety_prompts_missing_a_field(w: Workspace) -> Attempt:
    bad = w.write("redteam.jsonl", '{"id": "a", "prompt": "Hi"}\n{"category": "weapons"}\n')
    args = [
        "eval", "safety", "--prompts", str(bad), "--output", str(w.path("safety")),
        "--engine", "openai", "--base-url", CLOSED_PORT, "--model", "m", *FAIL_FAST,
    ]  # fmt: skip
    return Attempt(args, [f"{bad}:2", "field 'prompt' is missing"])


@case
def eval_output_is_the_set(w: Workspace) -> Attempt:
    s = _eval_set(w, 1)
    a, b = _predictions(w, "a.jsonl", [0]), _predictions(w, "b.jsonl", [0])
    return Attempt(
        ["eval", "pairwise", "--set", str(s), "--a", str(a), "--b", str(b), "--output", str(s)],
        [f"--output {s}"],
        untouched=(s,),
    )


@case
def run_recipe_with_a_typo_and_a_missing_seed_file(w: Workspace) -> Attempt:
    recipe = w.write(
        "recipe.yaml",
        "name: r\nrun_dir: run\nstages:\n  generate:\n    seeds: nowhere.jsonl\n    num_instructions: 5\n"
        "  data: {}\n  train:\n    epocs: 2\n",
    )
    return Attempt(
        ["run", str(recipe), "--dry-run"],
        [f"{recipe}:9 (stages.train.epocs): unknown setting 'epocs'", "nowhere.jsonl does not exist"],
        untouched=(recipe,),
    )


@case
def run_recipe_whose_run_dir_sits_under_a_file(w: Workspace) -> Attempt:
    blocker = w.write("notes.txt", "mine\n")
    recipe = w.write("recipe.yaml", "name: r\nrun_dir: notes.txt/run\nstages:\n  data: {input: notes.txt}\n")
    return Attempt(
        ["run", str(recipe), "--dry-run"],
        [f"{recipe} (run_dir)", f"{blocker} is a file, so nothing can be written under it"],
        untouched=(blocker,),
    )


@case
def run_recipe_that_is_not_a_mapping(w: Workspace) -> Attempt:
    recipe = w.write("recipe.yaml", "- generate\n- train\n")
    return Attempt(["run", str(recipe)], [f"{recipe}: a recipe is a mapping"])


@case
def serve_port_in_use(w: Workspace) -> Attempt:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    w._request.addfinalizer(taken.close)
    port = str(taken.getsockname()[1])
    return Attempt(["serve", "--port", port, "--no-filter"], [f"--port {port}: already in use"])


# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", list(CASES))
def test_a_careless_input_is_a_clear_user_error(name, tmp_path, request):
    attempt = CASES[name](Workspace(tmp_path, request))
    before = {p: p.read_bytes() for p in attempt.untouched}
    result = run_cli(*attempt.args, input=attempt.stdin)
    assert_user_error(result, *attempt.needles)
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was changed"


@pytest.mark.unit
def test_the_sweep_covers_every_command(tmp_path, request):
    from alpaca_forge.cli import STAGES
    from alpaca_forge.data.cli import TOOLS

    tried: set[str] = set()
    for name, make in CASES.items():
        try:
            args = make(Workspace(tmp_path / name, request)).args
        except pytest.skip.Exception:  # a mistake only on a machine without a GPU
            continue
        tried.add(" ".join(args[:2]) if args[0] == "data" else args[0])
    commands = {s for s in STAGES if s != "data"} | {f"data {name}" for name, *_ in TOOLS}
    assert commands <= tried, commands - tried
    assert len(CASES) >= 30
