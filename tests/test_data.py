"""`alpaca-forge data ...` through the real CLI."""

import json

from alpaca_forge import Record, read_records, write_records

from conftest import assert_user_error, run_cli


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validate_reports_ok_and_every_problem(tmp_path):
    good = write_records(tmp_path / "good.json", [Record("Add.", "1+1", "2")])
    r = run_cli("data", "validate", str(good))
    assert r.returncode == 0 and "1 records, all valid" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n{"instruction": "", "output": "y"}\n')
    assert_user_error(
        run_cli("data", "validate", str(good), str(bad)), f"{bad}:1: field 'output' is missing", f"{bad}:2:"
    )


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
    assert_user_error(r, "gives 100 validation records out of 100")


def test_convert_between_the_three_formats(tmp_path, shared_data):
    seeds = shared_data / "seed_tasks.jsonl"
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
        r, f"{bad}:1: 'messages' must start with a user message", f"{bad}:2: 'messages' has 3 turns"
    )


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


def test_predictions_read_their_response_as_output(shared_data):
    records = read_records(shared_data / "eval" / "predictions" / "text-davinci-003.jsonl")
    assert len(records) == 252 and all(r.output for r in records)
