"""The real `alpaca-forge` CLI on the tiny model: infer (resume, kill -9), chat (Ctrl-C), --help."""

import argparse
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from alpaca_forge import get_format, save_model
from alpaca_forge.cli import build_parser

from conftest import CLI, assert_user_error, build_tiny_model, build_tiny_tokenizer, run_cli, sigint_default


def _instructions(path, n):
    rows = [
        {
            "instruction": f"Question number {i}: what is the capital of France?",
            "input": "" if i % 3 else f"ctx {i}",
        }
        for i in range(n)
    ]
    rows.append(dict(rows[0]))  # the same question twice: both must be answered
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _keys(rows):
    return Counter((r["instruction"], r["input"]) for r in rows)


def _infer(model_dir, input_path, output_path, *extra: str) -> list[str]:
    """The argument list of an `infer` run."""
    return [
        "infer",
        "--model",
        str(model_dir),
        "--input",
        str(input_path),
        "--output",
        str(output_path),
        *extra,
    ]


@pytest.mark.integration
def test_infer_writes_predictions_and_resumes(tmp_path, tiny_model_dir):
    rows = _instructions(tmp_path / "in.jsonl", 7)
    out = tmp_path / "out" / "pred.jsonl"
    args = _infer(tiny_model_dir, tmp_path / "in.jsonl", out)
    r = run_cli(*args, "--max-new-tokens", "12", "--limit", "3")
    assert r.returncode == 0, r.stderr
    first = _lines(out)
    assert len(first) == 3
    row = first[0]
    assert row["model"] == str(tiny_model_dir) and row["prompt_format"] == "alpaca"
    assert row["generation"]["max_new_tokens"] == 12 and row["generation"]["temperature"] == 0.0
    assert set(row) >= {"instruction", "input", "output", "finish_reason", "num_tokens"}

    r = run_cli(*args, "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "5 answers written" in r.stderr and "(3 were already there)" in r.stderr
    done = _lines(out)
    assert done[:3] == first
    assert _keys(done) == _keys(rows)

    r = run_cli(*args, "--max-new-tokens", "12")
    assert "0 answers written" in r.stderr and len(_lines(out)) == len(rows)


@pytest.mark.integration
def test_infer_survives_kill_9_and_resumes_to_the_same_result(tmp_path, tiny_model_dir):
    rows = _instructions(tmp_path / "in.jsonl", 40)
    common = [
        "--model",
        str(tiny_model_dir),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--batch-size",
        "1",
        "--max-new-tokens",
        "48",
    ]
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([str(CLI), "infer", *common, "--output", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_bytes()
    assert 5 <= before.count(b"\n") < len(rows), "killed mid-run"

    r = run_cli("infer", *common, "--output", str(out))
    assert r.returncode == 0, r.stderr
    resumed = _lines(out)
    assert _keys(resumed) == _keys(rows), "nothing lost, nothing duplicated"
    assert out.read_bytes().startswith(before[: before.rfind(b"\n") + 1])

    straight = tmp_path / "straight.jsonl"
    assert run_cli("infer", *common, "--output", str(straight)).returncode == 0
    by_key = {(r["instruction"], r["input"]): r["output"] for r in _lines(straight)}
    assert {(r["instruction"], r["input"]): r["output"] for r in resumed} == by_key


@pytest.mark.integration
def test_infer_drops_a_line_cut_by_a_kill(tmp_path, tiny_model_dir):
    rows = _instructions(tmp_path / "in.jsonl", 3)
    out = tmp_path / "pred.jsonl"
    args = _infer(tiny_model_dir, tmp_path / "in.jsonl", out, "--max-new-tokens", "8")
    assert run_cli(*args, "--limit", "2").returncode == 0
    with open(out, "ab") as f:
        f.write(b'{"instruction": "Question number 2: wha')  # a write cut off by a kill
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert _keys(_lines(out)) == _keys(rows)


@pytest.mark.integration
def test_infer_refuses_to_mix_settings(tmp_path, tiny_model_dir):
    _instructions(tmp_path / "in.jsonl", 2)
    args = _infer(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "o.jsonl")
    assert run_cli(*args, "--max-new-tokens", "8").returncode == 0
    assert_user_error(run_cli(*args, "--max-new-tokens", "9"), "different settings", "--overwrite")
    r = run_cli(*args, "--max-new-tokens", "9", "--overwrite")
    assert r.returncode == 0 and {
        row["generation"]["max_new_tokens"] for row in _lines(tmp_path / "o.jsonl")
    } == {9}


@pytest.mark.integration
def test_infer_reads_seed_and_evaluation_tasks(tmp_path, tiny_model_dir, dataset):
    for path, first_id in [(dataset.seed_file, "seed_task_0"), (dataset.eval_file, "user_oriented_task_0")]:
        out = tmp_path / f"{first_id}.jsonl"
        r = run_cli(*_infer(tiny_model_dir, path, out, "--limit", "3", "--max-new-tokens", "4", "--print"))
        assert r.returncode == 0, r.stderr
        rows = _lines(out)
        assert next(row["id"] for row in rows) == first_id and len(rows) == 3
        assert rows[0]["instruction"] in r.stdout, "--print shows each instruction"


@pytest.mark.integration
def test_infer_rejects_an_unwritable_output(tmp_path, tiny_model_dir):
    _instructions(tmp_path / "in.jsonl", 1)
    (tmp_path / "file").write_text("")
    r = run_cli(*_infer(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "file" / "o.jsonl"))
    assert_user_error(r, "nothing can be written under it", str(tmp_path / "file"))


@pytest.mark.integration
@pytest.mark.parametrize("case", ["a folder", "under a file", "the input", "missing folders"])
def test_infer_checks_its_output_before_any_work(tmp_path, tiny_model_dir, case):
    """Output paths a careless user gives: each a clear error naming the path, before the model
    loads; missing folders are simply made."""
    src = tmp_path / "in.jsonl"
    _instructions(src, 1)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    out = {
        "a folder": tmp_path / "a-folder",
        "under a file": tmp_path / "a-file" / "o.jsonl",
        "the input": src,
        "missing folders": tmp_path / "new" / "deeper" / "o.jsonl",
    }[case]
    before = src.read_bytes()
    r = run_cli(*_infer(tiny_model_dir, src, out, "--max-new-tokens", "2"))
    if case == "missing folders":
        assert r.returncode == 0, r.stderr
        assert len(_lines(out)) == 2
        return
    assert_user_error(
        r,
        str(out),
        {"a folder": "is a folder", "under a file": "is a file", "the input": "is the input file"}[case],
    )
    assert "loading" not in r.stderr, "the model is not loaded for a command that cannot finish"
    assert src.read_bytes() == before


# --- chat ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_chat_answers_each_piped_line(tiny_model_dir):
    r = run_cli(
        "chat",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "10",
        input="Hello\n/reset\n\nWhat is 2+2?\n",
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2, r.stdout
    assert "(conversation forgotten)" in r.stderr
    assert r.stderr.count(" tok/s, ") == 2


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory):
    """A tiny model that never emits EOS, so only Ctrl-C or the length limit ends an answer."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    model.generation_config.suppress_tokens = [tok.eos_token_id, tok.pad_token_id]
    return save_model(model, tok, tmp_path_factory.mktemp("endless"), get_format("user-assistant"))


@pytest.mark.integration
def test_ctrl_c_stops_the_answer_not_the_chat(endless_model_dir):
    proc = subprocess.Popen(
        [
            str(CLI),
            "chat",
            "--model",
            str(endless_model_dir),
            "--max-new-tokens",
            "4000",
            "--repetition-penalty",
            "1",
        ],
        preexec_fn=sigint_default,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out = bytearray()
    reader = threading.Thread(
        target=lambda: [out.extend(b) for b in iter(lambda: os.read(proc.stdout.fileno(), 4096), b"")]
    )
    reader.start()

    def ask_and_interrupt(question: bytes) -> None:
        seen = len(out)
        proc.stdin.write(question)
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while len(out) <= seen + 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        while b"[stopped]" not in out[seen:] and time.monotonic() < deadline:
            time.sleep(0.02)

    ask_and_interrupt(b"Tell me a long story.\n")
    ask_and_interrupt(b"And another one.\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    reader.join()
    stderr = proc.stderr.read().decode()
    assert out.count(b"[stopped]") == 2, (bytes(out[-300:]), stderr)
    assert stderr.count("cancelled]") == 2, stderr
    assert "Traceback" not in stderr


# --- help ---------------------------------------------------------------------------------------


def _all_parsers(parser, name="alpaca-forge"):
    """Every parser and sub-parser (argparse has no public accessor for sub-parsers)."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


@pytest.mark.unit
def test_every_flag_has_help():
    parsers = dict(_all_parsers(build_parser()))
    expected = {"prompt", "chat", "infer", "generate", "data quality", "data clean", "data stats"}
    assert {f"alpaca-forge {name}" for name in expected} <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


@pytest.mark.integration
@pytest.mark.parametrize(
    "command",
    [[], ["prompt"], ["chat"], ["infer"], ["generate"]]
    + [["data", tool] for tool in ("validate", "stats", "quality", "clean", "dedupe", "split", "convert")],
)
def test_help_runs(command):
    r = run_cli(*command, "--help")
    assert r.returncode == 0 and "usage: alpaca-forge" in r.stdout
    if command:
        assert "example" in r.stdout


@pytest.mark.integration  # the CLI in a process of its own, on a real pseudo-terminal
def test_interactive_chat_in_a_terminal(endless_model_dir):
    """A real pseudo-terminal: the prompt, Ctrl-C typed mid-answer and at the prompt, /exit."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI, attached to the terminal
        sigint_default()
        os.execv(
            str(CLI),
            [str(CLI), "chat", "--model", str(endless_model_dir), "--max-new-tokens", "4000", "--no-stats"],
        )
    screen = bytearray()

    def read_until(marker: bytes, start: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while marker not in screen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, (marker, bytes(screen[-400:]))
            if not select.select([fd], [], [], left)[0]:
                continue  # nothing arrived in time: the assertion above reports it
            try:
                screen.extend(os.read(fd, 4096))
            except OSError:
                break

    try:
        read_until(b"you> ", 0)
        mark = len(screen)
        os.write(fd, b"Tell me a long story.\r")
        read_until(b"bot> ", mark)
        answer_start = len(screen)
        read_until(b" ", answer_start + 40)  # the answer is streaming
        os.write(fd, b"\x03")  # Ctrl-C, as typed: the terminal sends SIGINT
        read_until(b"[stopped]", answer_start)
        read_until(b"you> ", answer_start)
        mark = len(screen)
        os.write(fd, b"\x03")  # Ctrl-C at the prompt: a hint, not an exit
        read_until(b"Ctrl-D or /exit quits", mark)
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Traceback" not in screen
