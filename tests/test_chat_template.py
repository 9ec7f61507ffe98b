"""The trained prompt format as the chat template: every model folder and GGUF alpaca-forge writes
renders, through other runtimes' own template engines, exactly the prompts training saw.

Each conversation is rendered three ways and compared byte for byte: by alpaca-forge's format
(`PromptFormat.render`), by transformers (`apply_chat_template` on the tokenizer loaded back from
the saved folder) and by llama-cpp-python's Jinja2ChatFormatter with the template read out of the
exported GGUF, for the tiny byte-level tokenizer (no BOS added) and a SentencePiece-style one that
adds BOS (runtimes add no special tokens to a templated prompt, so the template writes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alpaca_forge import get_format, save_model, write_records
from alpaca_forge.core.chat_template import adds_bos, answer_prefix, chat_template_for
from alpaca_forge.core.examples import encode_record
from alpaca_forge.core.prompts import Message
from alpaca_forge.core.records import Record
from test_export import sentencepiece_style

from conftest import TINY_CHAT_TEMPLATE, assert_user_error, build_tiny_model, build_tiny_tokenizer, run_cli

FORMATS = ("alpaca", "user-assistant")
TOKENIZERS = ("byte-level", "sentencepiece-bos")


def _user(content: str, input: str = "") -> dict:
    return {"role": "user", "content": content, **({"input": input} if input else {})}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _system(content: str) -> dict:
    return {"role": "system", "content": content}


# Conversations that end in a user message (the prompt awaits an answer).
ASKING = [
    [_user("What is the capital of France?")],
    [_user("Summarise this.", "the cat sat on the mat")],
    [_system("You are terse."), _user("Name a colour.")],
    [_system("Be kind."), _user("Translate.", "Bonjour"), _assistant("Hello"), _user("And 'merci'?")],
    [_user("Hi"), _assistant("Hello!"), _user("How are you?")],
    [_user("a"), _assistant("b"), _user("c"), _assistant("d"), _user("e")],
    [_user("")],
    [_user("", "only an input")],
    [_user("Grüße aus Köln, 東京 🎉 — «quotes»")],
    [_user("Quote 'single' and \"double\" and \\ backslash")],
    [_user("Jinja-looking text: {{ x }} {% if %} {# c #}")],
    [_user("Line one\nline two\n\n### Response: not a real one")],
    [_user("  leading and trailing spaces  ")],
    [_user("Tab\tseparated", "multi\nline\ninput")],
    [_system(""), _user("Empty system message")],
    [_user("first"), _system("a system message in the middle"), _user("second")],
    [_user("What is 2+2?"), _assistant(""), _user("Again?")],
    [_user("<|user|> tags inside a message <|assistant|>")],
    [_user("Ends in a newline\n")],
    [_system("System only first."), _user("x", "y"), _assistant("z"), _user("Last", "with input")],
]
# Conversations that end in the answer (how other tools build training or scoring text).
ANSWERED = [
    [_user("What is the capital of France?"), _assistant("Paris")],
    [_user("Summarise this.", "the cat sat on the mat"), _assistant("A cat sat.")],
    [_system("Be brief."), _user("Hi"), _assistant("Hello"), _user("Bye"), _assistant("Goodbye")],
    [_user("Grüße 🎉"), _assistant("Danke schön")],
    [_user("Say nothing"), _assistant("")],
]


def _messages(chat: list[dict]) -> list[Message]:
    return [Message(m["role"], m["content"], m.get("input", "")) for m in chat]


def _tokenizer(kind: str):
    if kind == "byte-level":
        return build_tiny_tokenizer()  # carries a chat template of its own, which must not survive
    tok = sentencepiece_style()
    tok.add_bos_token = True
    return tok


def expected(fmt, tokenizer, chat: list[dict]) -> str:
    """What training and our engine render, as a runtime must see it: BOS first where the
    tokenizer adds it; an answered conversation continues with the answer and EOS."""
    bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
    if chat[-1]["role"] == "assistant":
        prompt = fmt.render(_messages(chat[:-1]))
        return bos + prompt + answer_prefix(tokenizer) + chat[-1]["content"] + tokenizer.eos_token
    return bos + fmt.render(_messages(chat))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """(tokenizer kind, format) -> (saved folder, GGUF file), written by save_model and the CLI."""
    out = {}
    for kind in TOKENIZERS:
        tokenizer = _tokenizer(kind)
        model = build_tiny_model(tokenizer)
        for name in FORMATS:
            root = tmp_path_factory.mktemp(f"{kind}-{name}")
            folder = save_model(model, tokenizer, root / "model", get_format(name))
            gguf = root / "model.f32.gguf"
            r = run_cli("-q", "export", "gguf", "--model", str(folder), "--output", str(gguf),
                        "--quant", "f32", "--no-verify", "--ollama")  # fmt: skip
            assert r.returncode == 0, r.stderr
            out[kind, name] = folder, gguf
    return out


def end_of_generation(gguf_file: Path) -> set[int]:
    """The tokens on which llama.cpp ends generation with this file (llama_vocab_is_eog)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf_file).encode(), params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        return {t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    finally:
        llama_cpp.llama_model_free(model)


def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    keys = ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id")
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.integration
@pytest.mark.llamacpp
def test_transformers_and_llama_cpp_render_what_training_saw(exported, kind, name):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    folder, gguf = exported[kind, name]
    fmt = get_format(name)
    saved = AutoTokenizer.from_pretrained(str(folder))
    template = gguf_fields(gguf)["tokenizer.chat_template"]
    assert template == saved.chat_template == chat_template_for(fmt, saved)
    assert template != TINY_CHAT_TEMPLATE
    assert template.startswith("{{- bos_token -}}") == (kind == "sentencepiece-bos")
    for chat in ASKING + ANSWERED:
        want = expected(fmt, saved, chat)
        asking = chat[-1]["role"] != "assistant"
        got = saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=asking)
        assert got == want, (chat, got, want)
        formatter = Jinja2ChatFormatter(
            template, eos_token=saved.eos_token, bos_token=saved.bos_token, add_generation_prompt=asking
        )
        assert formatter(messages=chat).prompt == want, chat


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.integration
def test_the_templated_tokens_are_the_trained_ones(exported, kind, name):
    """Runtimes tokenize a templated prompt without adding special tokens: the ids must be those
    our engine feeds (the format's own add_special_tokens), and an answered single-turn
    conversation's ids those `core.examples` trains on."""
    from transformers import AutoTokenizer

    folder, _ = exported[kind, name]
    fmt = get_format(name)
    tok = AutoTokenizer.from_pretrained(str(folder))
    records = [
        Record("What is the capital of France?", "", "Paris is the capital."),
        Record("Summarise this.", "the cat sat on the mat", "A cat sat."),
        Record("Name a colour", "", "Blue"),
    ]
    for r in records:
        prompt = fmt.prompt(r.instruction, r.input)
        chat = [_user(r.instruction, r.input)]
        templated = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ours = tok(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]
        assert tok(templated, add_special_tokens=False)["input_ids"] == ours
        trained = encode_record(r, 0, tok, fmt, max_seq_len=512)
        full = tok.apply_chat_template([*chat, _assistant(r.output)], tokenize=False)
        assert tok(full, add_special_tokens=False)["input_ids"] == trained.input_ids, full


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.integration
def test_the_prompt_command_prints_what_the_template_renders(exported, name):
    from transformers import AutoTokenizer

    folder, _ = exported["byte-level", name]
    tok = AutoTokenizer.from_pretrained(str(folder))
    for instruction, input in [("What is the capital of France?", ""), ("Summarise.", "the cat sat")]:
        r = run_cli("prompt", "--model", str(folder), "--instruction", instruction, "--input", input)
        assert r.returncode == 0, r.stderr
        chat = [_user(instruction, input)]
        assert r.stdout == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.integration
@pytest.mark.llamacpp
def test_the_ollama_modelfile_agrees_with_the_gguf_template(exported, name):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, gguf = exported["byte-level", name]
    modelfile = gguf.with_name("model.f32.Modelfile").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    fields = gguf_fields(gguf)
    formatter = Jinja2ChatFormatter(fields["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    for text in ("What is the capital of France?", "Grüße {{ x }}"):
        ollama = template.replace("{{ .Prompt }}", text)
        assert ollama == formatter(messages=[_user(text)]).prompt == get_format(name).prompt(text)


@pytest.mark.integration
@pytest.mark.llamacpp
def test_the_gguf_stops_where_training_taught_the_model_to(exported):
    """The GGUF's EOS is the token training appends to every answer (core.examples.eos_id), and
    llama.cpp ends generation on no other token of these tokenizers."""
    from alpaca_forge.core.examples import eos_id

    for (kind, _), (_, gguf) in exported.items():
        tok = _tokenizer(kind)
        assert gguf_fields(gguf)["tokenizer.ggml.eos_token_id"] == eos_id(tok)
        assert end_of_generation(gguf) == {eos_id(tok)}, kind


@pytest.mark.integration
def test_a_chat_format_model_keeps_its_own_template(tmp_path):
    tokenizer = build_tiny_tokenizer()
    folder = save_model(build_tiny_model(tokenizer), tokenizer, tmp_path / "m", get_format("chat"))
    assert (folder / "chat_template.jinja").read_text() == TINY_CHAT_TEMPLATE
    out = tmp_path / "m.gguf"
    r = run_cli("-q", "export", "gguf", "--model", str(folder), "--output", str(out), "--quant", "f32",
                "--no-verify")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert gguf_fields(out)["tokenizer.chat_template"] == TINY_CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------
# Every folder written: train (adapter, merged), export merge, export recover


def _template_of(folder: Path) -> str:
    return (folder / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.integration
def test_train_merge_and_recover_write_the_trained_template(tmp_path, tiny_model_dir):
    tokenizer = build_tiny_tokenizer()
    ours = chat_template_for(get_format("user-assistant"), tokenizer)
    data = write_records(
        tmp_path / "d.jsonl",
        [{"instruction": f"What is {i} plus 1?", "input": "", "output": f"{i + 1}."} for i in range(8)],
    )
    adapter = tmp_path / "lora"
    r = run_cli("-q", "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(adapter),
                *["--method", "lora", "--format", "user-assistant", "--max-steps", "2", "--batch-size", "4", "--merge"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _template_of(adapter) == _template_of(adapter / "merged") == ours
    merged = tmp_path / "merged"
    r = run_cli("-q", "export", "merge", "--adapter", str(adapter), "--output", str(merged))
    assert r.returncode == 0, r.stderr
    assert _template_of(merged) == ours
    # A tuned folder written before templates were ours still carries its base's: the diff keeps
    # the files as they are, the recovered model gets the template of its saved format.
    (merged / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    diff, recovered = tmp_path / "diff", tmp_path / "recovered"
    r = run_cli(
        "-q", "export", "diff", "--base", str(tiny_model_dir), "--tuned", str(merged), "--output", str(diff)
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("-q", "export", "recover", "--base", str(tiny_model_dir), "--diff", str(diff),
                "--output", str(recovered))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _template_of(recovered) == ours
    assert json.loads((recovered / "prompt_format.json").read_text())["format"] == "user-assistant"


# ---------------------------------------------------------------------------------------------
# Careless input


def _bare_folder(tmp_path: Path, tokenizer) -> Path:
    folder = tmp_path / "bare"
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_a_folder_without_its_format_is_refused_unless_format_says(tmp_path):
    folder = _bare_folder(tmp_path, build_tiny_tokenizer())
    out = tmp_path / "bare.gguf"
    export = (
        "-q",
        "export",
        "gguf",
        "--model",
        str(folder),
        "--output",
        str(out),
        "--quant",
        "f32",
        "--no-verify",
    )
    assert_user_error(run_cli(*export), str(folder), "prompt_format.json", "--format chat", "--format alpaca")
    assert not out.exists()
    r = run_cli(*export, "--format", "alpaca")
    assert r.returncode == 0, r.stderr
    assert gguf_fields(out)["tokenizer.chat_template"] == chat_template_for(
        get_format("alpaca"), build_tiny_tokenizer()
    )


@pytest.mark.integration
def test_a_chat_model_without_a_template_and_an_unknown_format_are_refused(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    folder = _bare_folder(tmp_path, tokenizer)
    out = tmp_path / "x.gguf"
    export = ("-q", "export", "gguf", "--model", str(folder), "--output", str(out), "--no-verify")
    assert_user_error(run_cli(*export, "--format", "chat"), "chat template", "--format alpaca")
    (folder / "prompt_format.json").write_text('{"format": "vicuna", "system": null}')
    assert_user_error(run_cli(*export), "prompt_format.json", "vicuna", "user-assistant")
    (folder / "prompt_format.json").write_bytes(b'\xff\xfe{"format"')  # not UTF-8
    assert_user_error(run_cli(*export), "prompt_format.json", "UnicodeDecodeError", '{"format": "alpaca"')
    r = run_cli(*export, "--format", "mistral")
    assert r.returncode == 2 and "alpaca" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_smollm2s_tokenizer_renders_and_stops_as_trained(tmp_path):
    """SmolLM2 (byte-level, no BOS added, EOS <|im_end|>): the templates render what training
    saw, and its GGUF's EOS is the trained one. llama.cpp also ends generation on
    <|endoftext|> and <reponame>, by their text (it does so for every file holding them,
    whatever the metadata says); a model trained to end on <|im_end|> does not write them."""

    from alpaca_forge.core.chat_template import with_chat_template
    from alpaca_forge.core.examples import eos_id
    from alpaca_forge.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    for name in FORMATS:
        fmt = get_format(name)
        templated = with_chat_template(tokenizer, fmt)
        for chat in ASKING + ANSWERED:
            asking = chat[-1]["role"] != "assistant"
            got = templated.apply_chat_template(chat, tokenize=False, add_generation_prompt=asking)
            assert got == expected(fmt, tokenizer, chat), chat
        r = Record("What is the capital of France?", "", "Paris.")
        full = templated.apply_chat_template([_user(r.instruction), _assistant(r.output)], tokenize=False)
        trained = encode_record(r, 0, tokenizer, fmt, max_seq_len=512)
        assert tokenizer(full, add_special_tokens=False)["input_ids"] == trained.input_ids
    out = tmp_path / "smol.f16.gguf"
    r = run_cli("-q", "export", "gguf", "--model", "smollm2-135m-instruct", "--output", str(out),
                "--quant", "f16", "--no-verify")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert gguf_fields(out)["tokenizer.ggml.eos_token_id"] == eos_id(tokenizer) == 2
    ends = end_of_generation(out)
    assert ends == {0, 2, 4}, [tokenizer.convert_ids_to_tokens(i) for i in ends]
