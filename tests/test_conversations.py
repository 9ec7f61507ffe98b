"""Conversations end to end: OpenAI `messages` and ShareGPT records read and checked (every
problem with file:line and field), converted both ways, counted and deduped by `data`, trained
on their assistant turns only (masks checked token by token against the chat template's
rendering of each prefix), refused by single-turn formats, answered at their last user turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alpaca_forge.core.errors import UserError, ValidationError
from alpaca_forge.core.examples import IGNORE_INDEX, check_format_fits, encode_record, tokenize_records
from alpaca_forge.core.prompts import Message, get_format
from alpaca_forge.core.records import Record, read_records, records_from_item
from alpaca_forge.data.tools import convert, dedupe, stats

from conftest import assert_user_error, build_tiny_tokenizer, run_cli

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
TWO_EXCHANGES = [
    SYSTEM,
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "Where did the cat sit?"},
    {"role": "assistant", "content": "the cat sat on the mat."},
]
SHAREGPT = {
    "id": "sg-1",
    "conversations": [
        {"from": "human", "value": "What is the capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "user", "value": "And the cat?"},
        {"from": "assistant", "value": "It sat on the mat."},
    ],
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _messages(rows: list[dict]) -> tuple[Message, ...]:
    return tuple(Message(m["role"], m["content"]) for m in rows)


def _chatml_tokenizer():
    """The tiny tokenizer with ChatML turns, whose end-of-turn is its EOS (as SmolLM2's is)."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    """A tiny model saved with the chat format: its tokenizer keeps the tiny test template
    (the tiny_model_dir fixture's is the Alpaca template, single-turn)."""
    from alpaca_forge import save_model

    from conftest import build_tiny_model

    tok = build_tiny_tokenizer()
    return save_model(build_tiny_model(tok), tok, tmp_path_factory.mktemp("tiny-chat"), get_format("chat"))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Reading


@pytest.mark.unit
def test_messages_and_sharegpt_become_records_that_keep_every_turn(tmp_path):
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    path = _write(
        tmp_path / "chat.jsonl",
        [{"messages": TWO_EXCHANGES}, SHAREGPT, {"messages": single}, {"messages": [SYSTEM, *single]}],
    )
    two, sharegpt, plain, with_system = read_records(path)

    assert two.is_conversation and two.messages == _messages(TWO_EXCHANGES)  # the system message kept
    assert (two.instruction, two.input, two.output) == (
        "Where did the cat sit?",
        "",
        "the cat sat on the mat.",
    )
    assert two.where == f"{path}:1"
    assert sharegpt.id == "sg-1" and [m.role for m in sharegpt.messages] == ["user", "assistant"] * 2
    assert (sharegpt.instruction, sharegpt.output) == ("And the cat?", "It sat on the mat.")
    # One exchange with no system message is a plain record, as it always was; with one, not.
    assert plain == Record("Hi", "", "Hello.") and not plain.is_conversation
    assert with_system.is_conversation and with_system.messages[0] == Message("system", SYSTEM["content"])
    # Written back, a conversation is its messages; read again, the same record.
    assert two.to_dict() == {"messages": TWO_EXCHANGES}
    assert sharegpt.to_dict()["id"] == "sg-1"
    again = [records_from_item(r.to_dict(), "x", require_output=True)[0][0] for r in (two, sharegpt, plain)]
    assert again == [two, sharegpt, plain]


@pytest.mark.unit
def test_every_problem_of_a_conversation_is_named_by_line_and_field(tmp_path):
    user, reply = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"messages": [user, reply]},
            {"messages": [reply, user]},  # assistant first
            {"messages": [user, user, reply]},  # two users in a row
            {"messages": [user, reply, SYSTEM, user, reply]},  # system not first
            {"messages": [user, {"role": "assistant", "content": "  "}]},  # empty assistant turn
            {"messages": [user, {"role": "assistant", "content": 42}]},  # not a string
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello."}]},
            {"messages": [user, reply, user]},  # nothing to learn from the last turn
            {"messages": []},
        ],
    )
    with pytest.raises(ValidationError) as e:
        read_records(path)
    found = [(p.where, p.message) for p in e.value.problems]
    assert found == [
        (f"{path}:2 messages[0].role", "the conversation starts with an assistant turn"),
        (
            f"{path}:3 messages[1].role",
            "two user turns in a row (messages[0] and messages[1]); user and assistant turns alternate",
        ),
        (f"{path}:4 messages[2].role", "a system message that is not the first turn"),
        (f"{path}:5 messages[1].content", "empty assistant turn"),
        (f"{path}:6 messages[1].content", "the turn's 'content' is an int, not a string (42)"),
        (
            f"{path}:7 conversations[1].from",
            "'from' is \"bot\", which is not a role; the roles are: system, human, gpt (also user, assistant)",
        ),
        (f"{path}:8 messages[2]", "the conversation ends with a user turn that has no assistant reply"),
        (f"{path}:9 messages", "field 'messages' must be a non-empty list of turns, got []"),
    ]
    assert all(p.fix for p in e.value.problems)
    # Instructions to answer (infer, eval) may end on the user's turn.
    pending = read_records(
        _write(tmp_path / "todo.jsonl", [{"messages": [user, reply, user]}]), require_output=False
    )
    assert pending[0].prompt_messages() == list(_messages([user, reply, user])) and pending[0].output == ""


# ---------------------------------------------------------------------------------------------
# Training examples: exact masks


@pytest.mark.unit
def test_chatml_masks_learn_each_answer_and_its_end_of_turn_and_nothing_else():
    tok, fmt = _chatml_tokenizer(), get_format("chat")
    record = Record.from_messages(_messages(TWO_EXCHANGES))
    example = encode_record(record, 0, tok, fmt, 512)
    chat = [dict(m) for m in TWO_EXCHANGES]

    # The whole example is exactly the template's tokens of the whole conversation (less the
    # newline after the last end-of-turn, which nothing follows).
    whole = _ids(tok, tok.apply_chat_template(chat, tokenize=False))
    assert tok.convert_ids_to_tokens(whole[-1:]) == ["Ċ"] and example.input_ids == whole[:-1]
    # Before each answer, the ids are the template's rendering of the conversation up to it
    # (as inference sends it), token by token; the answer and its <|im_end|> are learnt.
    expected = [IGNORE_INDEX] * len(example.input_ids)
    for a in (2, 4):
        prefix = _ids(tok, tok.apply_chat_template(chat[:a], tokenize=False, add_generation_prompt=True))
        assert example.input_ids[: len(prefix)] == prefix
        answer = [*_ids(tok, chat[a]["content"]), tok.convert_tokens_to_ids("<|im_end|>")]
        assert example.input_ids[len(prefix) : len(prefix) + len(answer)] == answer
        expected[len(prefix) : len(prefix) + len(answer)] = answer
    assert example.labels == expected

    # Only the last turn: the same ids, the first answer masked too (`prefix`: up to the last).
    last = encode_record(record, 0, tok, fmt, 512, assistant_turns="last")
    assert last.input_ids == example.input_ids
    assert last.labels[: len(prefix)] == [IGNORE_INDEX] * len(prefix)
    assert last.labels[len(prefix) :] == expected[len(prefix) :]


@pytest.mark.unit
def test_masks_with_a_template_that_writes_no_end_of_turn_token():
    """The tiny test template ends a turn with a newline: each answer is followed by the EOS
    (the model learns to stop), the template's text after it is the next masked piece."""
    tok, fmt = build_tiny_tokenizer(), get_format("chat")
    chat = [dict(m) for m in TWO_EXCHANGES]
    example = encode_record(Record.from_messages(_messages(TWO_EXCHANGES)), 0, tok, fmt, 512)

    first = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    second = tok.apply_chat_template(chat[:4], tokenize=False, add_generation_prompt=True)
    between = second[len(first) + len(chat[2]["content"]) :]
    assert between.startswith("\n<|user|>\nWhere did the cat sit?")
    eos = tok.eos_token_id
    a1, a2 = [*_ids(tok, chat[2]["content"]), eos], [*_ids(tok, chat[4]["content"]), eos]
    p1, p2 = _ids(tok, first), _ids(tok, between)
    assert example.input_ids == p1 + a1 + p2 + a2
    assert example.labels == [IGNORE_INDEX] * len(p1) + a1 + [IGNORE_INDEX] * len(p2) + a2


@pytest.mark.unit
def test_a_one_exchange_conversation_is_the_plain_records_example():
    tok, fmt = build_tiny_tokenizer(), get_format("chat", system="Be brief.")
    plain = Record("Where did the cat sit?", "", "On the mat.")
    as_turns = Record(plain.instruction, "", plain.output, messages=plain.conversation())
    assert as_turns.is_conversation
    assert encode_record(as_turns, 0, tok, fmt, 512) == encode_record(plain, 0, tok, fmt, 512)


@pytest.mark.unit
def test_a_short_window_keeps_the_first_turns_and_the_eos_of_the_answer_it_cuts():
    tok, fmt = _chatml_tokenizer(), get_format("chat")
    chat = [dict(m) for m in TWO_EXCHANGES]
    record = Record.from_messages(_messages(TWO_EXCHANGES))
    second = len(_ids(tok, tok.apply_chat_template(chat[:4], tokenize=False, add_generation_prompt=True)))
    cut = encode_record(record, 0, tok, fmt, second + 2)  # room for one token of the last answer
    assert cut.truncated and len(cut.input_ids) == second + 2
    assert cut.input_ids[-2:] == [_ids(tok, chat[4]["content"])[0], tok.eos_token_id]
    assert cut.labels[-2:] == cut.input_ids[-2:]
    # Only the last answer learnt, and no room for it: no example (counted as left out).
    assert encode_record(record, 0, tok, fmt, second + 1, assistant_turns="last") is None
    examples, report = tokenize_records([record], tok, fmt, second + 1, assistant_turns="last")
    assert examples == [] and report.no_room == [0]


@pytest.mark.unit
def test_single_turn_formats_refuse_conversations_naming_the_records():
    conversation = Record.from_messages(_messages(TWO_EXCHANGES), where="chat.jsonl:3")
    plain = Record("Hi", "", "Hello.")
    check_format_fits([plain, conversation], get_format("chat"))
    with pytest.raises(UserError) as e:
        check_format_fits([plain, conversation], get_format("alpaca"))
    assert (
        "chat.jsonl:3: this record is a conversation, and the 'alpaca' prompt format is single-turn"
        in str(e.value)
    )
    assert "--format chat" in e.value.fix
    with pytest.raises(UserError) as e:  # multi-turn, but it would drop the system message
        check_format_fits([conversation], get_format("user-assistant"))
    assert "has a system message, and the 'user-assistant' prompt format writes none" in str(e.value)
    no_system = Record.from_messages(_messages(TWO_EXCHANGES[1:]))
    check_format_fits([no_system], get_format("user-assistant"))


# ---------------------------------------------------------------------------------------------
# data tools


@pytest.mark.unit
def test_convert_round_trips_and_alpaca_refuses_a_conversation():
    records = [
        Record.from_messages(_messages(TWO_EXCHANGES), id="c1", where="in.jsonl:1"),
        records_from_item(SHAREGPT, "in.jsonl:2", require_output=True)[0][0],
        Record("Name a colour.", "the sky", "Blue."),
        Record("Name a colour.", "", ""),  # no answer yet: no assistant turn is written
    ]
    for to in ("messages", "sharegpt"):
        rows = convert(records, to)
        back = [records_from_item(row, "x", require_output=False)[0][0] for row in rows]
        assert back[:2] == records[:2]
        assert back[2] == Record("Name a colour.\n\nthe sky", "", "Blue.")  # the input joins the turn
        assert back[3] == records[3]
    sharegpt_names = {"user": "human", "assistant": "gpt"}  # ShareGPT's own names, written back
    assert convert(records, "sharegpt")[1] == {
        "id": "sg-1",
        "conversations": [
            {"from": sharegpt_names.get(t["from"], t["from"]), "value": t["value"]}
            for t in SHAREGPT["conversations"]
        ],
    }
    assert convert(records, "messages")[0] == {"id": "c1", "messages": TWO_EXCHANGES}
    with pytest.raises(ValidationError) as e:
        convert(records, "alpaca")
    assert [(p.where, p.message) for p in e.value.problems] == [
        (
            "in.jsonl:1",
            "a conversation (4 turns and a system message); an alpaca record holds one exchange and no system message",
        ),
        ("in.jsonl:2", "a conversation (4 turns); an alpaca record holds one exchange and no system message"),
    ]
    assert convert(records[2:], "alpaca") == [r.to_dict() for r in records[2:]]


@pytest.mark.unit
def test_stats_count_conversations_their_turns_and_system_messages():
    records = [
        Record.from_messages(_messages(TWO_EXCHANGES)),
        records_from_item(SHAREGPT, "x", require_output=True)[0][0],
        Record.from_messages(_messages([SYSTEM, *TWO_EXCHANGES[1:3]])),
        Record("Hi", "", "Hello."),
    ]
    numbers = stats(records)
    assert numbers["records"] == 4 and numbers["conversations"] == 3 and numbers["conversation_share"] == 0.75
    assert numbers["turns_per_conversation"] == {"mean": 3.3, "median": 4.0, "p90": 4.0, "max": 4}
    assert numbers["with_system"] == 2 and numbers["with_system_share"] == 0.5


@pytest.mark.unit
def test_dedupe_compares_all_user_turns_of_a_conversation():
    base = _messages(TWO_EXCHANGES)
    other_answers = tuple(
        Message(m.role, "Something else entirely." if m.role == "assistant" else m.content) for m in base
    )
    other_first_turn = (base[0], Message("user", "Tell me a long story about a dragon."), *base[2:])
    records = [Record.from_messages(t) for t in (base, other_answers, other_first_turn)]
    kept = dedupe(records, 0.7)
    # The same user turns with other answers is a duplicate; a different first question is not
    # (the last turns alone, the instruction, would have called it one).
    assert kept.kept == [records[0], records[2]]
    assert [d["index"] for d in kept.dropped] == [1]
    assert [d["index"] for d in dedupe(records, 0.7, key="output").dropped] == [2]


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.integration
def test_cli_converts_sharegpt_to_messages_and_back_and_names_what_alpaca_cannot_hold(tmp_path):
    src = _write(
        tmp_path / "sharegpt.jsonl",
        [SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}],
    )
    msgs, back = tmp_path / "messages.jsonl", tmp_path / "back.jsonl"
    assert run_cli("data", "convert", str(src), "--to", "messages", "--output", str(msgs)).returncode == 0
    assert run_cli("data", "convert", str(msgs), "--to", "sharegpt", "--output", str(back)).returncode == 0
    assert back.read_text() == src.read_text().replace('"user"', '"human"').replace('"assistant"', '"gpt"')
    r = run_cli("data", "convert", str(msgs), "--to", "alpaca", "--output", str(tmp_path / "a.jsonl"))
    assert_user_error(r, f"{msgs}:1: a conversation (4 turns); an alpaca record", "1 problem in")
    assert not (tmp_path / "a.jsonl").exists()
    r = run_cli("data", "stats", str(msgs), "--plot", str(tmp_path / "s.png"))
    assert r.returncode == 0 and "1 conversations (50.0%" in r.stdout


@pytest.mark.integration
def test_cli_train_refuses_conversations_in_a_single_turn_format_before_any_model_loads(
    tmp_path, tiny_model_dir
):
    data = _write(tmp_path / "chat.jsonl", [{"messages": [dict(m) for m in TWO_EXCHANGES]}])
    out = tmp_path / "model"
    r = run_cli(
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps", "1"
    )
    assert_user_error(
        r, f"{data}:1: this record is a conversation, and the 'alpaca' prompt format", "--format chat"
    )
    assert not any(out.glob("*.safetensors"))


@pytest.mark.integration
def test_cli_tokenize_shows_masked_turns_and_train_learns_them(tmp_path, tiny_model_dir, chat_model_dir):
    rows = [{"messages": [dict(m) for m in TWO_EXCHANGES]}, SHAREGPT]
    data = _write(tmp_path / "chat.jsonl", rows)
    # A model whose template is the Alpaca one (single-turn) cannot show which tokens are answers.
    r = run_cli(
        "data", "tokenize", "--model", str(tiny_model_dir), str(data), "--format", "chat", "--show", "1"
    )
    assert_user_error(r, f"{data}:1: the 'chat' prompt format does not write the earlier turns")
    r = run_cli(
        "data", "tokenize", "--model", str(chat_model_dir), str(data), "--format", "chat", "--show", "1"
    )
    assert r.returncode == 0, r.stderr
    shown = r.stdout
    # Masked text in ⟦brackets⟧ (not a terminal): the system and user turns; the answers learnt.
    assert (
        "⟦<|system|>\nAnswer in one short sentence.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\n⟧Paris is the capital.</s>⟦\n<|user|>\nWhere did the cat sit?\n<|assistant|>\n⟧the cat sat on the mat.</s>"
        in shown
    )
    r = run_cli(
        "data",
        "tokenize",
        "--model",
        str(chat_model_dir),
        str(data),
        "--format",
        "chat",
        "--show",
        "1",
        "--assistant-turns",
        "last",
    )
    assert (
        "Paris is the capital.</s>\n<|user|>\nWhere did the cat sit?\n<|assistant|>\n⟧the cat sat on the mat.</s>"
        in r.stdout
    )

    out = tmp_path / "model"
    r = run_cli(
        "-q",
        "train",
        "--model",
        str(chat_model_dir),
        "--data",
        str(data),
        "--output",
        str(out),
        "--format",
        "chat",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "prompt_format.json").read_text())["format"] == "chat"
    # What it learnt: each assistant turn's tokens and its EOS, nothing else.
    tok = build_tiny_tokenizer()
    answers = [m["content"] for m in TWO_EXCHANGES if m["role"] == "assistant"]
    answers += [t["value"] for t in SHAREGPT["conversations"][1::2]]
    facts = json.loads((out / "alpaca_forge_train.json").read_text())
    assert facts["config"]["assistant_turns"] == "all"
    assert facts["tokenized"]["trained_tokens"] == sum(len(_ids(tok, a)) + 1 for a in answers)


@pytest.mark.integration
def test_cli_infer_sends_a_conversation_up_to_its_last_user_turn(tmp_path, tiny_lm):
    from alpaca_forge.engines.transformers_engine import TransformersEngine

    from openai_server import LoopbackServer

    user = {"role": "user", "content": "And the dog?"}
    data = _write(
        tmp_path / "todo.jsonl", [{"id": "c1", "messages": [*TWO_EXCHANGES, user]}, {"instruction": "Hi"}]
    )
    server = LoopbackServer(TransformersEngine(tiny_lm))
    with server as url:
        r = run_cli(
            "infer",
            "--engine",
            "openai",
            "--base-url",
            url,
            "--model",
            "tiny",
            "--input",
            str(data),
            "--output",
            str(tmp_path / "p.jsonl"),
            "--max-new-tokens",
            "2",
        )
    assert r.returncode == 0, r.stderr
    sent = sorted((b["messages"] for b in server.requests), key=len)
    assert sent == [[{"role": "user", "content": "Hi"}], [*TWO_EXCHANGES, user]]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert (rows[0]["id"], rows[0]["instruction"]) == ("c1", "And the dog?")


@pytest.mark.unit
def test_an_evaluation_item_of_a_conversation_is_its_last_user_turn_with_the_turns_before(tmp_path):
    from alpaca_forge.judging.items import read_set

    user = {"role": "user", "content": "And the dog?"}
    path = _write(
        tmp_path / "set.jsonl", [{"id": "c1", "messages": [*TWO_EXCHANGES, user]}, {"instruction": "Hi"}]
    )
    conversation, plain = read_set(path)
    assert (conversation.id, conversation.instruction, conversation.input) == ("c1", "And the dog?", "")
    assert conversation.prompt() == list(_messages([*TWO_EXCHANGES, user]))
    assert plain.context == () and plain.prompt() == [Message("user", "Hi")]
