"""The tokenizer of a GGUF file for llama.cpp: its model type (`gpt2` byte-level BPE, or `llama`
SentencePiece-style BPE with byte fallback), every token with its type, the merges, the special
ids, whether BOS is added, the chat template, and the *pre-tokenizer* name.

The pre-tokenizer. llama.cpp splits text before BPE with one of a fixed set of regex rules, named
in `tokenizer.ggml.pre`; a file with a name it does not know is refused at load ("unknown
pre-tokenizer type"), and a file with the wrong name loads but splits text differently, so the
model reads other tokens than it was trained on. llama.cpp's converter guesses the name from a
hash of a test encoding and fails on any tokenizer it has not seen. Here the name comes from the
structure of `tokenizer.json`'s pre-tokenizer, which says what the splitting *is*; anything not
recognised is an error that names `--pre-tokenizer`, and the parity check then compares llama.cpp's
tokens with transformers' on every prompt, so a wrong name cannot pass unnoticed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ..core.chat_template import adds_bos
from ..core.errors import UserError

UNUSED_SCORE = -1e9  # a padding token's merge score: below any real piece's (minus its merge rank)

# The pre-tokenizer regexes of the tokenizer families we recognise (facts of those tokenizers),
# and llama.cpp's name for the rule that splits text the same way.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-2": "GPT-2's byte-level split (letters, digit runs, punctuation, spaces)",
    "smollm": "GPT-2's split after single digits are split off (SmolLM, StarCoder)",
    "llama-bpe": "Llama 3's split (digits in groups of up to three)",
    "qwen2": "Qwen2's split (single digits)",
    "default": "SentencePiece-style tokenizers (Llama 2, Mistral): no regex split",
}


def _regex_of(step: dict[str, Any]) -> str | None:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") or pattern.get("String")


def classify_pre_tokenizer(tokenizer_json: dict[str, Any]) -> tuple[str | None, str]:
    """(llama.cpp's pre-tokenizer name, or None when unknown; a description of what was found)."""
    pre = tokenizer_json.get("pre_tokenizer")
    model = tokenizer_json.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "default", "SentencePiece-style BPE with byte fallback"
    if pre is None:
        return None, "no pre-tokenizer"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    described = " + ".join(
        f"{s.get('type')}({_regex_of(s)!r})" if _regex_of(s) else str(s.get("type")) for s in steps
    )
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", described
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm", described
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = _regex_of(steps[0])
        if regex == _LLAMA3_REGEX:
            return "llama-bpe", described
        if regex == _QWEN2_REGEX:
            return "qwen2", described
        if regex == _GPT2_REGEX:
            return "gpt-2", described
    return None, described


def _tokenizer_json(tokenizer: Any, folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            "GGUF export needs a fast tokenizer (tokenizer.json); this model has only a slow one",
            "load and save the tokenizer once with transformers (AutoTokenizer, use_fast=True) beside the weights",
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _adds_eos(tokenizer: Any) -> bool:
    eos = tokenizer.eos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return eos is not None and bool(ids) and ids[-1] == eos and len(ids) > 1


def add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int, pre_name: str | None) -> tuple[str, str]:
    """Write the tokenizer; returns (tokenizer model, pre-tokenizer name)."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="alpaca-forge-tok-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        data = _tokenizer_json(tokenizer, folder)
        found, described = classify_pre_tokenizer(data)
        pre = pre_name or found
        if pre is None:
            raise UserError(
                f"the tokenizer's pre-tokenizer ({described}) is not one llama.cpp is known to implement, "
                "so llama.cpp would refuse the file ('unknown pre-tokenizer type') or split text differently "
                "from training",
                "if you know which llama.cpp pre-tokenizer splits text the same way, pass --pre-tokenizer "
                f"NAME ({', '.join(PRE_TOKENIZERS)}, or any name llama.cpp knows); the parity check then "
                "compares llama.cpp's tokens with transformers'",
            )
        spm = data.get("model", {}).get("type") == "BPE" and data["model"].get("byte_fallback")
        if spm:
            tokens, scores, types = _spm_tokens(tokenizer, data)
            model_name = "llama"
        else:
            tokens, types = _bpe_tokens(tokenizer)
            scores = None
            model_name = "gpt2"
        for i in range(len(tokens), n_vocab):  # the embedding is wider than the vocabulary
            tokens.append(f"[PAD{i}]".encode() if spm else f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(UNUSED_SCORE)
        writer.add_tokenizer_model(model_name)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if scores is not None:
            writer.add_token_scores(scores)
        special = gguf.SpecialVocab(folder, load_merges=not spm, n_vocab=n_vocab)
        special.add_special_token = {}  # whether BOS/EOS are added: measured below instead
        special.add_to_gguf(writer, quiet=True)
        writer.add_add_bos_token(adds_bos(tokenizer))
        writer.add_add_eos_token(_adds_eos(tokenizer))
        if spm:
            writer.add_add_space_prefix(_adds_space_prefix(data))
    return model_name, pre


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    """SentencePiece's dummy prefix ('▁' before the first word): a Metaspace pre-tokenizer or
    a Prepend normalizer says so."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for s in steps:
        if s.get("type") == "Metaspace":
            return s.get("prepend_scheme", "always") != "never"
    norm = data.get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return any(p.get("type") == "Prepend" for p in parts)


def _spm_tokens(tokenizer: Any, data: dict[str, Any]) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece-style BPE (Llama 2, Mistral): llama.cpp merges the neighbouring pair whose
    joined piece scores highest, transformers the pair of lowest merge rank, so a piece's score is
    minus the rank of the first merge that makes it (pieces no merge makes score 0). Byte pieces
    (`<0x41>`) are BYTE tokens, the fallback for text the vocabulary lacks."""
    import gguf

    rank: dict[str, int] = {}
    for r, merge in enumerate(data["model"].get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = dict(tokenizer.added_tokens_decoder.items())
    tokens, scores, types = [], [], []
    for i in range(max(by_id) + 1):
        piece = by_id.get(i, f"[PAD{i}]")
        tokens.append(piece.encode("utf-8"))
        scores.append(-float(rank[piece]) if piece in rank else 0.0)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif piece == tokenizer.unk_token:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def _bpe_tokens(tokenizer: Any) -> tuple[list[str], list[int]]:
    """Byte-level BPE: each id's token as stored (bytes written as GPT-2's printable characters),
    added special tokens as CONTROL, other added tokens as USER_DEFINED."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
