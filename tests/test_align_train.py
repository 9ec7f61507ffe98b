"""Learning from preferences: the pair file (core.pairs) and `train --method reward|dpo|orpo|kto|simpo`."""

import gzip
import json

import pytest

from alpaca_forge.core.errors import UserError, ValidationError
from alpaca_forge.core.pairs import Pair, pair_row, read_pairs, write_pairs

ROW = {
    "id": "p1",
    "prompt": "Translate to French.\n\nGood morning",
    "chosen": "Bonjour",
    "rejected": "Hello",
    "instruction": "Translate to French.",
    "input": "Good morning",
    "verdicts": [{"order": "ab", "winner": "a"}, {"order": "ba", "winner": "b"}],
    "agreement": 1.0,
    "judge": "fake-judge@loopback",
}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# core.pairs


@pytest.mark.unit
@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.jsonl.gz"])
def test_pairs_round_trip_keeps_the_agreed_row(tmp_path, name):
    pair = read_pairs(_write(tmp_path / "in.jsonl", [ROW]))[0]
    assert pair == Pair("p1", "Translate to French.", "Good morning", "Bonjour", "Hello")
    assert pair.meta == {"verdicts": ROW["verdicts"], "agreement": 1.0, "judge": ROW["judge"]}
    assert pair_row(pair) == ROW
    assert list(pair_row(pair))[:6] == ["id", "prompt", "chosen", "rejected", "instruction", "input"]
    path = write_pairs(tmp_path / name, [pair])
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            assert json.loads(f.readline()) == ROW
    assert [pair_row(p) for p in read_pairs(path)] == [ROW]


@pytest.mark.unit
def test_trl_plain_and_conversational_rows_are_read(tmp_path):
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1+1."}],
            "chosen": [{"role": "assistant", "content": "2"}],
            "rejected": [{"role": "assistant", "content": "3"}],
        },
        {  # TRL's implicit prompt: the conversation is in chosen and rejected
            "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Bye."}],
        },
    ]
    pairs = read_pairs(_write(tmp_path / "trl.jsonl", rows))
    assert [(p.instruction, p.input, p.chosen, p.rejected) for p in pairs] == [
        ("Name a colour.", "", "Blue.", "No."),
        ("Add 1+1.", "", "2", "3"),
        ("Say hi.", "", "Hi!", "Bye."),
    ]
    assert len({p.id for p in pairs}) == 3, "pairs without an id get a stable one"
    assert read_pairs(tmp_path / "trl.jsonl")[0].id == pairs[0].id


@pytest.mark.unit
def test_every_pair_problem_is_named_with_line_and_field(tmp_path):
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"instruction": "ok", "chosen": "a", "rejected": "b"},
            {"instruction": "x", "rejected": "b"},
            {"instruction": "x", "chosen": "  ", "rejected": "b"},
            {"instruction": "x", "chosen": " same ", "rejected": "same"},
            {"chosen": "a", "rejected": "b"},
            "{not json",
            '["a list"]',
            {"prompt": "x", "chosen": "a", "rejected": 3},
        ],
    )
    with pytest.raises(ValidationError) as e:
        read_pairs(path)
    found = [(p.where, p.message) for p in e.value.problems]
    assert found == [
        (f"{path}:2", "field 'chosen' is missing"),
        (f"{path}:3", "field 'chosen' is empty"),
        (f"{path}:4", "fields 'chosen' and 'rejected' are the same answer, so the pair teaches nothing"),
        (f"{path}:5", "the pair has no prompt: neither 'instruction' nor 'prompt' is there"),
        (f"{path}:6", "not valid JSON (Expecting property name enclosed in double quotes: column 2)"),
        (f"{path}:7", "expected a JSON object, got list"),
        (f"{path}:8", "field 'rejected' must be a string, got int (3)"),
    ]
    assert all(p.fix for p in e.value.problems)


@pytest.mark.unit
def test_an_empty_pair_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(UserError, match="holds no preference pairs"):
        read_pairs(tmp_path / "none.json")
