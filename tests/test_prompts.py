import json

import pytest

from alpaca_forge import Message, UserError, get_format, read_saved_format, save_format
from alpaca_forge.core.prompts import FORMAT_FILE

from conftest import assert_user_error, build_tiny_tokenizer, run_cli

# The Alpaca template, spelled out independently of the package, byte for byte.
EXPECTED_WITH_INPUT = (
    b"Below is an instruction that describes a task, paired with an input that provides further context. "
    b"Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
    b"\n\n### Input:\nGood morning\n\n### Response:"
)
EXPECTED_NO_INPUT = (
    b"Below is an instruction that describes a task. Write a response that appropriately completes the request."
    b"\n\n### Instruction:\nName three primary colours.\n\n### Response:"
)


@pytest.mark.unit
def test_alpaca_template_is_byte_exact():
    fmt = get_format("alpaca")
    assert fmt.prompt("Translate to French.", "Good morning").encode() == EXPECTED_WITH_INPUT
    assert fmt.prompt("Name three primary colours.").encode() == EXPECTED_NO_INPUT


@pytest.mark.unit
def test_alpaca_template_keeps_braces_and_unicode_in_records():
    text = get_format("alpaca").prompt("Fill {x} in: ü {instruction}", "{input} 日本")
    assert (
        "### Instruction:\nFill {x} in: ü {instruction}\n\n### Input:\n{input} 日本\n\n### Response:" in text
    )


@pytest.mark.unit
def test_alpaca_is_single_turn():
    fmt = get_format("alpaca")
    text = fmt.render(
        [
            Message("user", "first"),
            Message("assistant", "one"),
            Message("user", "Name three primary colours."),
        ]
    )
    assert text.encode() == EXPECTED_NO_INPUT


@pytest.mark.unit
def test_user_assistant_turns():
    fmt = get_format("user-assistant")
    assert fmt.prompt("Hi") == "<|user|>\nHi\n<|assistant|>"
    assert fmt.prompt("Translate.", "Bonjour") == "<|user|>\nTranslate.\n\nBonjour\n<|assistant|>"
    two = fmt.render([Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "How are you?")])
    assert two == "<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\nHow are you?\n<|assistant|>"


@pytest.mark.unit
def test_chat_format_uses_the_tokenizers_template():
    tok = build_tiny_tokenizer()
    fmt = get_format("chat", system="Be brief.")
    text = fmt.render([Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Why?")], tok)
    assert (
        text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\nWhy?\n<|assistant|>\n"
    )


@pytest.mark.unit
def test_chat_format_without_template_is_a_clear_error():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(UserError, match="has no chat template") as e:
        get_format("chat").prompt("Hi", tokenizer=tok)
    assert "--format alpaca" in e.value.fix


@pytest.mark.unit
def test_format_is_saved_and_read_back(tmp_path):
    save_format(tmp_path, get_format("chat", system="Be brief."))
    assert read_saved_format(tmp_path) == get_format("chat", system="Be brief.")
    assert read_saved_format(tmp_path / "elsewhere") is None
    (tmp_path / FORMAT_FILE).write_text(json.dumps({"format": "vicuna"}))
    with pytest.raises(UserError, match="not a valid prompt-format file"):
        read_saved_format(tmp_path)


@pytest.mark.unit
def test_unknown_format_names_the_choices():
    with pytest.raises(UserError) as e:
        get_format("vicuna")
    assert "alpaca" in e.value.fix and "user-assistant" in e.value.fix


# --- the real CLI -------------------------------------------------------------------------------


def _stdout_bytes(*args: str) -> bytes:
    r = run_cli("prompt", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.encode()


@pytest.mark.integration
def test_cli_prompt_prints_exactly_the_prompt():
    assert _stdout_bytes(
        "--format", "alpaca", "--instruction", "Translate to French.", "--input", "Good morning"
    ) == (EXPECTED_WITH_INPUT)
    assert (
        _stdout_bytes("--format", "alpaca", "--instruction", "Name three primary colours.")
        == EXPECTED_NO_INPUT
    )
    assert (
        _stdout_bytes("--format", "user-assistant", "--instruction", "Hi") == b"<|user|>\nHi\n<|assistant|>"
    )


@pytest.mark.integration
def test_cli_prompt_reads_the_format_saved_with_a_model(tiny_model_dir):
    # The tiny model was saved with the alpaca format, although its tokenizer had a chat template.
    assert _stdout_bytes("--model", str(tiny_model_dir), "--instruction", "Name three primary colours.") == (
        EXPECTED_NO_INPUT
    )
    # Saving made the trained format its chat template, so even --format chat renders Alpaca.
    chat = _stdout_bytes("--model", str(tiny_model_dir), "--format", "chat", "--instruction", "Hi")
    assert chat == get_format("alpaca").prompt("Hi").encode()


@pytest.mark.integration
def test_cli_prompt_rejects_an_empty_instruction():
    assert_user_error(
        run_cli("prompt", "--format", "alpaca", "--instruction", "  "), "--instruction is empty"
    )
