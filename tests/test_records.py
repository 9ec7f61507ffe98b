import gzip
import json

import pytest

from alpaca_forge import Record, UserError, ValidationError, read_records, write_records

from conftest import assert_user_error, run_cli

RECORDS = [
    Record("Name three primary colours.", "", "Red, yellow and blue."),
    Record("Translate to French.", "Good morning", "Bonjour"),
    Record('Quote: "ü" {braces} 日本\nsecond line', "", "ok"),
]


@pytest.mark.unit
@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.jsonl.gz"])
def test_write_then_read_round_trip(tmp_path, name):
    path = write_records(tmp_path / name, RECORDS)
    assert read_records(path) == RECORDS
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


@pytest.mark.unit
def test_json_array_is_written_like_alpaca_data_json(tmp_path):
    path = write_records(tmp_path / "data.json", RECORDS[:1])
    text = path.read_text()
    assert text.startswith('[\n    {\n        "instruction": "Name three primary colours.",')
    assert json.loads(text) == [RECORDS[0].to_dict()]


@pytest.mark.unit
def test_pretty_and_minified_arrays_read_the_same(tmp_path):
    rows = [r.to_dict() for r in RECORDS]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    (tmp_path / "mini.json").write_text(json.dumps(rows))
    assert read_records(tmp_path / "pretty.json") == read_records(tmp_path / "mini.json") == RECORDS


@pytest.mark.unit
def test_input_may_be_missing_and_output_only_when_not_required(tmp_path):
    p = tmp_path / "ask.jsonl"
    p.write_text('{"instruction": "Say hi."}\n\n{"instruction": "Add.", "input": "1+1"}\n')
    assert read_records(p, require_output=False) == [Record("Say hi."), Record("Add.", "1+1")]
    with pytest.raises(ValidationError) as e:
        read_records(p)
    assert [(pr.where, pr.message) for pr in e.value.problems] == [
        (f"{p}:1", "field 'output' is missing"),
        (f"{p}:3", "field 'output' is missing"),
    ]


@pytest.mark.unit
def test_every_problem_is_reported_with_line_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        "\n".join(
            [
                '{"instruction": "ok", "input": "", "output": "fine"}',
                '{"input": "", "output": "no instruction"}',
                '{"instruction": "   ", "output": "x"}',
                '{"instruction": 42, "input": null, "output": ["a"]}',
                '{"instruction": "cut',
                '["not", "an", "object"]',
            ]
        )
        + "\n"
    )
    with pytest.raises(ValidationError) as e:
        read_records(p)
    found = [(pr.where.rsplit(":", 1)[1], pr.message) for pr in e.value.problems]
    assert found == [
        ("2", "field 'instruction' is missing"),
        ("3", "field 'instruction' is empty"),
        ("4", "field 'instruction' must be a string, got int (42)"),
        ("4", "field 'output' must be a string, got list ([\"a\"])"),
        ("5", "not valid JSON (Unterminated string starting at: column 17)"),
        ("6", "expected a JSON object, got list"),
    ]
    assert all(pr.fix for pr in e.value.problems)
    assert "6 problems" in str(e.value)


@pytest.mark.unit
def test_bad_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"instruction": "ok", "output": "x"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(ValidationError) as e:
        read_records(p)
    (problem,) = e.value.problems
    assert problem.where == f"{p}:2"
    assert "not valid UTF-8 (byte 0xe9" in problem.message and "iconv" in problem.fix


@pytest.mark.unit
def test_array_cut_off_halfway_is_reported(tmp_path):
    whole = json.dumps([r.to_dict() for r in RECORDS], indent=4)
    p = tmp_path / "cut.json"
    p.write_text(whole[: len(whole) // 2])
    with pytest.raises(ValidationError) as e:
        read_records(p)
    assert "cut off" in e.value.problems[-1].message
    assert e.value.problems[-1].where.startswith(f"{p}[1] (line ")

    p.write_text(whole.rstrip("]\n "))  # every record complete, closing bracket missing
    with pytest.raises(ValidationError, match="no closing"):
        read_records(p)


@pytest.mark.unit
def test_array_syntax_errors_name_the_record(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]')
    with pytest.raises(ValidationError) as e:
        read_records(p)
    assert e.value.problems[0].where == f"{p}:3"
    assert "expected ',' or ']' after record 0" in e.value.problems[0].message


@pytest.mark.unit
def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValidationError, match="empty"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(UserError, match="holds no records"):
        read_records(tmp_path / "none.json")
    with pytest.raises(UserError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        read_records(tmp_path)


@pytest.mark.unit
def test_seed_tasks_and_eval_tasks_become_records(dataset):
    seeds = read_records(dataset.seed_file)
    assert len(seeds) == dataset.seeds
    assert seeds[0].id == "seed_task_0" and seeds[0].instruction.startswith(dataset.first_seed_starts)
    evals = read_records(dataset.eval_file)
    assert len(evals) == dataset.evals and sum(1 for r in evals if r.input) == dataset.evals_with_input


@pytest.mark.unit
def test_the_corpus_streams_from_gzip(dataset):
    records = read_records(dataset.corpus)
    assert len(records) == dataset.corpus_records


@pytest.mark.unit
def test_instances_with_several_entries_get_sub_ids(tmp_path):
    p = tmp_path / "tasks.jsonl"
    p.write_text(
        json.dumps(
            {
                "id": "t1",
                "instruction": "Add.",
                "instances": [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}],
            }
        )
    )
    assert read_records(p) == [Record("Add.", "1+1", "2", "t1#0"), Record("Add.", "2+2", "4", "t1#1")]


@pytest.mark.unit
def test_gzip_json_array(tmp_path):
    p = tmp_path / "data.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump([r.to_dict() for r in RECORDS], f)
    assert read_records(p) == RECORDS


# --- the real CLI: each bad input is a message, a fix and exit status 2 -----------------------


@pytest.mark.integration
def test_cli_reports_every_problem_without_a_traceback(tmp_path, tiny_model_dir):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"input": "x"}\n{"instruction": ""}\n{"instruction": 3}\n')
    r = run_cli(
        "infer", "--model", str(tiny_model_dir), "--input", str(p), "--output", str(tmp_path / "o.jsonl")
    )
    assert_user_error(
        r,
        f"{p}:1: field 'instruction' is missing",
        f"{p}:2: field 'instruction' is empty",
        f"{p}:3:",
        "3 problems",
    )
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


@pytest.mark.integration
def test_cli_bad_utf8_and_truncated_array(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "caf\xe9"}\n')
    r = run_cli(
        "infer", "--model", str(tiny_model_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")
    )
    assert_user_error(r, f"{bad}:1: not valid UTF-8")
    cut = tmp_path / "cut.json"
    cut.write_text('[{"instruction": "a"}, {"instruction": "b')
    r = run_cli(
        "infer", "--model", str(tiny_model_dir), "--input", str(cut), "--output", str(tmp_path / "o.jsonl")
    )
    assert_user_error(r, f"{cut}[1]", "cut off")


@pytest.mark.unit
@pytest.mark.parametrize(
    "n, val_size, problem, fix",
    [
        (0, 20, "needs at least 2 records (one on each side), and there are 0 records", "more records"),
        (1, 20, "needs at least 2 records (one on each side), and there is 1 record", "more records"),
        (1, 0.5, "and there is 1 record", "more records"),
        (
            2,
            20,
            "holds out 20 of 2 records, leaving nothing to train on",
            "a count of 1, or a share such as 0.51",
        ),
        (5, 20, "holds out 20 of 5 records, leaving nothing", "a count from 1 to 4, or a share such as 0.21"),
        (
            5,
            0.1,
            "holds out 0 of 5 records (0.1 x 5 rounds to 0), leaving no validation record",
            "from 1 to 4",
        ),
        (
            30,
            0.99,
            "holds out 30 of 30 records, leaving nothing to train on",
            "from 1 to 29, or a share such as 0.1",
        ),
    ],
)
def test_a_split_that_leaves_a_side_empty_says_which_sizes_work(n, val_size, problem, fix):
    from alpaca_forge import split_records

    records = [Record(f"Task {i}.", "", "ok") for i in range(n)]
    with pytest.raises(UserError) as e:
        split_records(records, val_size)
    assert problem in e.value.message and fix in e.value.fix
    assert "--val-size 0 to hold out nothing" in e.value.fix
    if n >= 2:  # the sizes the fix names do split
        for size in (1.0, float(n - 1), float(e.value.fix.split("share such as ")[1].split(";")[0])):
            train, val = split_records(records, size)
            assert train and val
