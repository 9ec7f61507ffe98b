"""`alpaca-forge data ...` through the real CLI (in this process)."""

import json
import sys

import pytest

from alpaca_forge import Record, read_records, split_records, write_records

from conftest import assert_user_error, run_cli


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """`data stats` draws its default picture in the current folder: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_validate_reports_ok_and_every_problem(tmp_path):
    good = write_records(tmp_path / "good.json", [Record("Add.", "1+1", "2")])
    r = run_cli("data", "validate", str(good))
    assert r.returncode == 0 and "1 records, all valid" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n{"instruction": "", "output": "y"}\n')
    assert_user_error(
        run_cli("data", "validate", str(good), str(bad)), f"{bad}:1: field 'output' is missing", f"{bad}:2:"
    )


@pytest.mark.integration
def test_dedupe_keeps_the_first_and_names_the_collision(tmp_path):
    records = [
        Record("Give three tips for staying healthy.", "", "a"),
        Record("Name the capital of France.", "", "b"),
        Record("Give three tips for staying very healthy.", "", "c"),  # F1 0.93 with the first
        Record("Write a poem about the sea.", "", "d"),
        Record("Name the capital of France.", "", "e"),  # exact duplicate
    ]
    src = write_records(tmp_path / "in.jsonl.gz", records)
    r = run_cli("data", "dedupe", str(src), "--output", str(tmp_path / "kept.json"))
    assert r.returncode == 0, r.stderr
    assert "kept 3 of 5 records (2 dropped" in r.stderr
    assert read_records(tmp_path / "kept.json") == [records[0], records[1], records[3]]
    dropped = _rows(tmp_path / "kept.dropped.jsonl")
    assert [(d["index"], d["duplicate_of_index"]) for d in dropped] == [(2, 0), (4, 1)]
    assert dropped[0]["duplicate_of"]["instruction"] == records[0].instruction
    assert dropped[0]["rouge_l"] > 0.7 and dropped[1]["rouge_l"] == 1.0

    r = run_cli("data", "dedupe", str(src), "--output", str(tmp_path / "k2.jsonl"), "--threshold", "0.95")
    assert len(read_records(tmp_path / "k2.jsonl")) == 4
    assert_user_error(
        run_cli("data", "dedupe", str(src), "--output", str(tmp_path / "k3.jsonl"), "--threshold", "0"),
        "--threshold",
    )


def _conversation(system, *turns):
    from alpaca_forge.core.prompts import Message

    said = [Message(("user", "assistant")[i % 2], t) for i, t in enumerate(turns)]
    return Record.from_messages([Message("system", system), *said])


@pytest.mark.integration
def test_dedupe_streams_the_same_bytes_as_the_whole_list(tmp_path):
    """The streamed command writes what the in-memory step gives, byte for byte, in every form; a
    dropped line quotes its kept record as written (a conversation's turns, non-ASCII text)."""
    import gzip

    from alpaca_forge.data.tools import dedupe

    hello = "Hello, we land in France next week with two children and a dog"
    chat = _conversation("Be brief.", f"{hello}.", "Welcome!", "Name a café in Paris, please.", "Café de Flore ☕.")
    records = [
        Record("Name a café in Paris, please ☕.", "", "Les Deux Magots."),
        chat,
        Record("Name a café in Paris please.", "", "Le Procope."),  # a near-copy of record 0
        Record("Summarise the text.", "A long text about whales.", "Whales."),
        _conversation("Be terse.", f"{hello}!", "Hey.", "Name a café in Paris.", "Flore."),  # a near-copy of 1
        Record("Summarise the text.", "Three lines on the history of Rome.", "x"),  # another input
    ]
    src = write_records(tmp_path / "in.jsonl", records)
    for key, kept_name, dropped_name in [
        ("instruction", "kept.json", "gone.jsonl.gz"),
        ("instruction+input", "kept.jsonl.gz", "gone.json"),
    ]:
        r = run_cli(
            "data", "dedupe", str(src), "--output", str(tmp_path / kept_name),
            "--dropped", str(tmp_path / dropped_name), "--key", key,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        whole = dedupe(records, 0.7, key)
        want_kept = write_records(tmp_path / f"want.{kept_name}", whole.kept)
        want_dropped = write_records(tmp_path / f"want.{dropped_name}", whole.dropped)

        def text(path):
            return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()

        assert text(tmp_path / kept_name) == text(want_kept)
        assert text(tmp_path / dropped_name) == text(want_dropped)
        assert f"kept {len(whole.kept)} of 6 records ({len(whole.dropped)} dropped" in r.stderr
    kept = read_records(tmp_path / "kept.json", require_output=False)
    assert kept == [records[0], chat, records[3]]  # --key instruction: 2, 4 and 5 dropped
    quoted = {d["index"]: d["duplicate_of"] for d in json.loads(text(tmp_path / "gone.json"))}
    assert quoted == {2: records[0].to_dict(), 4: chat.to_dict()}, "instruction+input: 5 differs from 3"


@pytest.mark.integration
def test_dedupe_reports_every_problem_before_writing_anything(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "Add.", "output": "2"}\n{"input": "no instruction"}\n'
        '{"instruction": "Add.", "output": "3"}\nnot json\n'
    )
    assert_user_error(
        run_cli("data", "dedupe", str(bad), "--output", str(tmp_path / "out" / "kept.jsonl")),
        f"{bad}:2: field 'instruction' is missing",
        f"{bad}:4: not valid JSON",
    )
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["bad.jsonl"], "nothing written"


@pytest.mark.unit
def test_records_stream_one_by_one_and_validate_holding_none(tmp_path):
    from alpaca_forge.core.errors import ValidationError
    from alpaca_forge.core.records import check_records, iter_records

    good = write_records(tmp_path / "good.json", [Record(f"Task {i}.", "", "a") for i in range(3)])
    assert check_records(good) == 3
    seen = []
    assert check_records(good, progress=seen.append) == 3 and sum(seen) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "First.", "output": "a"}\n{"instruction": 3}\n')
    problems = []
    stream = iter_records(bad, problems)
    assert next(stream) == Record("First.", "", "a") and problems == []  # line 2 not read yet
    assert list(stream) == [] and {p.where for p in problems} == {f"{bad}:2"}
    with pytest.raises(ValidationError) as e:
        check_records(bad)
    with pytest.raises(ValidationError) as f:
        read_records(bad)
    assert str(e.value) == str(f.value) and "field 'instruction' must be a string" in str(e.value)


@pytest.mark.integration
def test_split_is_seeded_disjoint_and_complete(tmp_path):
    records = [Record(f"Task {i}.", "", str(i)) for i in range(100)]
    src = write_records(tmp_path / "in.jsonl", records)
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        r = run_cli(
            "data",
            "split",
            str(src),
            "--output-dir",
            str(tmp_path / name),
            "--val-size",
            "0.1",
            "--seed",
            seed,
        )
        assert r.returncode == 0, r.stderr
    val = {n: read_records(tmp_path / n / "val.jsonl") for n in "abc"}
    train = read_records(tmp_path / "a" / "train.jsonl")
    assert len(val["a"]) == 10 and len(train) == 90
    assert val["a"] == val["b"] != val["c"]
    assert sorted(train + val["a"], key=lambda r: int(r.output)) == records
    assert train == sorted(train, key=lambda r: int(r.output)), "file order is kept"
    r = run_cli("data", "split", str(src), "--output-dir", str(tmp_path / "d"), "--val-size", "100")
    assert_user_error(r, "holds out 100 of 100 records, leaving nothing to train on")


@pytest.mark.integration
def test_convert_between_the_three_formats(tmp_path, dataset):
    seeds = dataset.seed_file
    assert (
        run_cli(
            "data", "convert", str(seeds), "--to", "messages", "--output", str(tmp_path / "chat.jsonl")
        ).returncode
        == 0
    )
    chat = _rows(tmp_path / "chat.jsonl")
    original = read_records(seeds)
    first_with_input = next(i for i, r in enumerate(original) if r.input)
    assert (
        chat[first_with_input]["messages"][0]["content"]
        == f"{original[first_with_input].instruction}\n\n{original[first_with_input].input}"
    )
    assert chat[0]["messages"][1] == {"role": "assistant", "content": original[0].output}

    assert (
        run_cli(
            "data", "convert", str(seeds), "--to", "alpaca", "--output", str(tmp_path / "a.json")
        ).returncode
        == 0
    )
    assert (
        run_cli(
            "data", "convert", str(tmp_path / "a.json"), "--to", "seed", "--output", str(tmp_path / "s.jsonl")
        ).returncode
        == 0
    )
    assert read_records(tmp_path / "s.jsonl") == original  # seed -> alpaca -> seed keeps everything
    assert _rows(tmp_path / "s.jsonl")[0].keys() >= {"id", "instruction", "instances", "is_classification"}


@pytest.mark.integration
def test_messages_input_problems_are_reported(tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "assistant", "content": "hi"}]})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        )
        + "\n"
    )
    r = run_cli("data", "convert", str(bad), "--to", "alpaca", "--output", str(tmp_path / "o.jsonl"))
    assert_user_error(
        r, f"{bad}:1 messages[0].role: the conversation starts with an assistant turn", "1 problem in"
    )  # line 2, two exchanges, is a conversation (tests/test_conversations.py)


@pytest.mark.integration
def test_data_without_a_tool_shows_help():
    r = run_cli("data")
    assert r.returncode == 2 and "validate" in r.stdout and "dedupe" in r.stdout


QUALITY_RECORDS = [
    Record("Give three tips for staying healthy.", "", "Eat well, sleep enough and move every day."),
    Record("Summarise the text.", "", ""),  # empty_output
    Record("Repeat the input.", "Hello there.", "Hello there."),  # output_equals_input
    Record(
        "Describe a sunset.", "", "The sky turns orange and the clouds glow as the sun slowly sinks below the"
    ),  # truncated
    Record("Tell me how to pick a lock.", "", "As an AI language model, I cannot help with that."),  # refusal
    Record("Comfort a friend.", "", "I'm sorry to hear that. I am here for you."),  # not a refusal
    Record("Name a fruit.", "<noinput>", "Apple."),  # noinput_leftover
    Record("Écris une phrase.", "", "Voici une phrase."),  # non_english_start
    Record("Give three tips for staying very healthy.", "", "Walk."),  # near_duplicate of the first
]


@pytest.mark.integration
def test_quality_finds_each_problem_and_clean_removes_them(tmp_path):
    src = write_records(tmp_path / "d.jsonl", QUALITY_RECORDS)
    r = run_cli("data", "quality", str(src), "--report", str(tmp_path / "q.json"))
    assert r.returncode == 0, r.stderr
    checks = json.loads((tmp_path / "q.json").read_text())["checks"]
    assert {name: [e["index"] for e in c["examples"]] for name, c in checks.items()} == {
        "empty_output": [1],
        "output_equals_input": [2],
        "truncated_output": [3],
        "refusal": [4],
        "noinput_leftover": [6],
        "non_english_start": [7],
        "near_duplicate": [8],
    }
    r = run_cli(
        "data",
        "clean",
        str(src),
        "--output",
        str(tmp_path / "clean.jsonl"),
        "--checks",
        "refusal,near_duplicate",
    )
    assert r.returncode == 0, r.stderr
    kept = read_records(tmp_path / "clean.jsonl", require_output=False)
    assert (
        QUALITY_RECORDS[4] not in kept
        and QUALITY_RECORDS[8] not in kept
        and len(kept) == len(QUALITY_RECORDS) - 2
    )
    removed = _rows(tmp_path / "clean.dropped.jsonl")
    assert [(d["index"], d["checks"]) for d in removed] == [(4, ["refusal"]), (8, ["near_duplicate"])]
    assert_user_error(
        run_cli("data", "clean", str(src), "--output", str(tmp_path / "x.jsonl"), "--checks", "refusals"),
        "unknown check",
    )


@pytest.mark.integration
def test_stats_prints_numbers_and_draws_a_png(tmp_path):
    src = write_records(tmp_path / "d.jsonl", QUALITY_RECORDS)
    r = run_cli(
        "data", "stats", str(src), "--plot", str(tmp_path / "len.png"), "--json", str(tmp_path / "s.json")
    )
    assert r.returncode == 0, r.stderr
    numbers = json.loads((tmp_path / "s.json").read_text())
    assert numbers["records"] == 9 and numbers["with_input"] == 2 and numbers["empty_output"] == 1
    assert numbers["words"]["instruction"]["max"] == 7 and numbers["top_first_words"]["give"] == 2
    png = (tmp_path / "len.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "9 records; 2 with input" in r.stdout


@pytest.mark.unit
def test_predictions_read_their_response_as_output(dataset):
    records = read_records(dataset.predictions)
    assert len(records) == dataset.evals and all(r.output for r in records)


@pytest.mark.integration
def test_split_is_the_one_seeded_split_train_uses(tmp_path):
    records = [Record(f"Task {i}.", "", str(i)) for i in range(50)]
    src = write_records(tmp_path / "in.jsonl", records)
    for val_size in ("0.2", "7"):
        r = run_cli(
            "data",
            "split",
            str(src),
            "--output-dir",
            str(tmp_path / val_size),
            "--val-size",
            val_size,
            "--seed",
            "3",
        )
        assert r.returncode == 0, r.stderr
        train, val = split_records(records, float(val_size), seed=3)
        assert read_records(tmp_path / val_size / "val.jsonl") == val
        assert read_records(tmp_path / val_size / "train.jsonl") == train


def _without_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError


@pytest.mark.integration
def test_stats_without_matplotlib_writes_the_numbers_first(tmp_path, monkeypatch):
    src = write_records(tmp_path / "d.jsonl", QUALITY_RECORDS)
    _without_matplotlib(monkeypatch)
    r = run_cli("data", "stats", str(src), "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["records"] == 9
    assert (
        "9 records; 2 with input" in r.stdout
        and "histograms skipped: matplotlib is not installed" in r.stderr
    )
    assert not list(tmp_path.glob("*.png"))
    # Asked for by name, the picture is an error, but only once the numbers are out.
    (tmp_path / "s.json").unlink()
    r = run_cli(
        "data", "stats", str(src), "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "p.png")
    )
    assert_user_error(
        r, f"--plot {tmp_path / 'p.png'}: drawing needs matplotlib", "pip install 'alpaca-forge[plot]'"
    )
    assert json.loads((tmp_path / "s.json").read_text())["records"] == 9 and "9 records" in r.stdout
    assert not (tmp_path / "p.png").exists()


@pytest.mark.integration
def test_stats_draws_its_default_picture_in_the_current_folder(tmp_path):
    src = write_records(tmp_path / "sub" / "d.jsonl.gz", QUALITY_RECORDS)
    r = run_cli("data", "stats", str(src))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d.lengths.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.integration
def test_clean_runs_only_the_checks_asked_for(tmp_path, monkeypatch):
    import alpaca_forge.data.tools as tools

    calls = []
    real = tools.greedy_dedupe
    monkeypatch.setattr(tools, "greedy_dedupe", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    src = write_records(tmp_path / "d.jsonl", QUALITY_RECORDS)
    r = run_cli(
        "data", "clean", str(src), "--output", str(tmp_path / "c.jsonl"), "--checks", "refusal,empty_output"
    )
    assert r.returncode == 0, r.stderr
    assert calls == [], "no ROUGE-L pass without near_duplicate"
    removed = _rows(tmp_path / "c.dropped.jsonl")
    assert [(d["index"], d["checks"]) for d in removed] == [(1, ["empty_output"]), (4, ["refusal"])]
    r = run_cli(
        "data", "clean", str(src), "--output", str(tmp_path / "d.jsonl.out"), "--checks", "near_duplicate"
    )
    assert r.returncode == 0 and calls == [1], r.stderr


# ---------------------------------------------------------------------------------------------
# Every output path is checked before any work


def _tool_args(tool, flag, src, out, model):
    return {
        "dedupe --output": ["dedupe", src, "--output", out],
        "dedupe --dropped": ["dedupe", src, "--output", "kept.jsonl", "--dropped", out],
        "clean --output": ["clean", src, "--output", out],
        "convert --output": ["convert", src, "--to", "messages", "--output", out],
        "split --output-dir": ["split", src, "--output-dir", out, "--val-size", "2"],
        "stats --json": ["stats", src, "--json", out],
        "stats --plot": ["stats", src, "--plot", out],
        "quality --report": ["quality", src, "--report", out],
        "tokenize --output": ["tokenize", src, "--model", model, "--output", out],
    }[f"{tool} {flag}"]


OUTPUTS = [
    ("dedupe", "--output"), ("dedupe", "--dropped"), ("clean", "--output"), ("convert", "--output"),
    ("split", "--output-dir"), ("stats", "--json"), ("stats", "--plot"), ("quality", "--report"),
    ("tokenize", "--output"),
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("case", ["folder", "under_a_file", "the_input", "missing_folder", "name_too_long"])
@pytest.mark.parametrize(("tool", "flag"), OUTPUTS)
def test_every_output_is_checked_before_any_work(tmp_path, tiny_model_dir, tool, flag, case):
    folder_output = flag == "--output-dir"
    name = "out" if folder_output else "out.png" if flag == "--plot" else "out.json"
    src = tmp_path / "in.jsonl"
    (tmp_path / "a_file").write_text("")
    out = {
        "folder": tmp_path / name,
        "under_a_file": tmp_path / "a_file" / name,
        "the_input": src,
        "missing_folder": tmp_path / "new" / "deeper" / name,
        "name_too_long": tmp_path / ("x" * 300 + name),  # an OSError, reported as the user's mistake
    }[case]
    named = out
    if folder_output and case == "folder":  # a folder is what --output-dir wants: its file is the folder
        named = out / "train.jsonl"
        named.mkdir(parents=True)
    elif folder_output and case == "the_input":  # the input is where a split would write
        out, named = tmp_path / "splits", tmp_path / "splits" / "train.jsonl"
        src = named
    elif case == "folder":
        out.mkdir()
    write_records(src, QUALITY_RECORDS[:4] + [Record("Name a colour.", "", "Red.")] * 3)
    before = src.read_bytes()
    r = run_cli("data", *_tool_args(tool, flag, str(src), str(out), str(tiny_model_dir)))
    if case == "missing_folder":
        assert r.returncode == 0, r.stderr
        assert (out / "train.jsonl").is_file() if folder_output else out.is_file()
        return
    why = {
        "folder": "is a folder",
        "under_a_file": "is a file, so nothing can be written",
        "the_input": "is the input file",
        "name_too_long": "File name too long",
    }[case]
    needle = f"{flag} {named}"
    if flag == "--plot" and case == "the_input":  # a dataset's name is no picture's: refused sooner
        needle, why = f"{flag}: {named}", "is not a picture's name"
    elif case == "name_too_long":
        needle = str(named)
    assert_user_error(r, needle, why)
    assert src.read_bytes() == before
    assert r.stdout == "", "nothing done before the check"
    assert not (tmp_path / "kept.jsonl").exists() and not [p for p in tmp_path.glob("*.png") if p.is_file()]


# ---------------------------------------------------------------------------------------------
# Every numeric flag is range-checked, all problems of one command reported together


@pytest.mark.integration
@pytest.mark.parametrize(
    "tool_args",
    [
        ["dedupe", "--output", "o.jsonl", "--threshold", "0"],
        ["dedupe", "--output", "o.jsonl", "--threshold", "1.5", "--key", "inputs"],
        ["quality", "--threshold", "2", "--examples", "-1"],
        ["clean", "--output", "o.jsonl", "--threshold", "0"],
        ["clean", "--output", "o.jsonl", "--checks", "refusals,near_duplicate"],
        ["split", "--output-dir", "out", "--val-size", "-1", "--seed", "-1"],
        ["split", "--output-dir", "out", "--val-size", "0"],
        ["convert", "--to", "csv", "--output", "o.jsonl"],
        ["stats", "--plot", "lengths.json"],
        ["tokenize", "--max-seq-len", "1", "--show", "-1", "--format", "plain"],
    ],
    ids=" ".join,
)
def test_out_of_range_flags_are_reported_together(tmp_path, tool_args):
    src = write_records(tmp_path / "d.jsonl", QUALITY_RECORDS)
    tool, *flags = tool_args
    r = run_cli("data", tool, str(src), *flags)
    named = [f for f in flags if f.startswith("--") and f not in ("--output", "--output-dir")]
    assert_user_error(r, *(f"{f}: " for f in named))
    if len(named) > 1:
        assert f"{len(named)} problems" in r.stderr
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "out").exists()


@pytest.mark.integration
def test_validate_reports_the_problems_of_every_file_together(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"instruction": "x"}\n')
    b.write_text('{"instruction": "", "output": "y"}\n')
    r = run_cli("data", "validate", str(a), str(b))
    assert_user_error(
        r, f"{a}:1: field 'output' is missing", f"{b}:1: field 'instruction' is empty", "2 problems"
    )


@pytest.mark.unit
def test_the_tools_from_python_return_typed_results(tmp_path):
    from alpaca_forge.data import DedupeConfig, DedupeResult, SplitConfig, run_dedupe, run_split

    src = write_records(tmp_path / "d.jsonl", QUALITY_RECORDS)
    r = run_dedupe(DedupeConfig(file=str(src), output=str(tmp_path / "k.jsonl")), progress=False)
    assert isinstance(r, DedupeResult) and (r.records, r.kept, r.dropped) == (9, 8, 1)
    assert (
        r.dropped_path == tmp_path / "k.dropped.jsonl"
        and len(read_records(r.output, require_output=False)) == 8
    )
    s = run_split(SplitConfig(file=str(src), output_dir=str(tmp_path / "s"), val_size=3))
    assert (s.train, s.val) == (6, 3) and s.val_path.is_file()
