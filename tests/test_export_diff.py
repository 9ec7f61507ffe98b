"""Weight diffs (`export diff` / `export recover`) on tiny random Llamas: real files, no mocks.

A "tuned" model is made from its base the way the original Alpaca fine-tune was: a "[PAD]" token
added and the embeddings grown to it, each new row the mean of the old ones; then every weight is
moved by noise, so that every tensor differs from the base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alpaca_forge import UserError, get_format, save_model
from alpaca_forge.export.config import DiffConfig, RecoverConfig
from alpaca_forge.export.diff import (
    MANIFEST_FILE,
    Change,
    resize_rows,
    shape_change,
    tensor_sha256,
    xor_bytes,
)
from alpaca_forge.export.diff_runner import Verification, run_diff, run_recover

from conftest import assert_user_error, build_tiny_model, build_tiny_tokenizer, run_cli, run_cli_process

NOISE = 0.01  # the fine-tune's change to each weight (weights are ~0.2: initializer_range)
PROMPT = "Below is an instruction that describes a task."
REL_TOLERANCE = 1e-6  # float32 rounding of (tuned - base) + base, relative to the largest weight


# ---------------------------------------------------------------------------------------------
# Models: a base and a tuned copy of it


@dataclasses.dataclass(frozen=True)
class Pair:
    base: Path
    tuned: Path


def save_base(folder: Path, *, seed: int = 0, **shape) -> Path:
    tokenizer = build_tiny_tokenizer()
    return save_model(
        build_tiny_model(tokenizer, seed=seed, **shape), tokenizer, folder, get_format("alpaca")
    )


def resize_like_the_original(model, tokenizer) -> None:
    """The original weight_diff.py's smart_tokenizer_and_embedding_resize with pad "[PAD]"."""
    added = tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    for weight in (model.get_input_embeddings().weight.data, model.get_output_embeddings().weight.data):
        weight[-added:] = weight[:-added].mean(dim=0, keepdim=True)


def load_float32(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def save_tuned(base: Path, folder: Path, *, seed: int, tie: bool | None = None, dtype=torch.float32) -> Path:
    """The base, fine-tuned: [PAD] added, then noise on every weight. `tie=False` unties a tied
    base's lm_head (it starts as a copy of the embedding)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_float32(base)
    if tie is not None and tie != model.config.tie_word_embeddings:
        config = model.config
        config.tie_word_embeddings = tie
        untied = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        untied.load_state_dict(
            {**model.state_dict(), "lm_head.weight": model.lm_head.weight.detach().clone()}
        )
        model = untied
    resize_like_the_original(model, tokenizer)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * NOISE)
    return save_model(model.to(dtype), tokenizer, folder, get_format("alpaca"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """pair(base_tie, tuned_tie, dtype) -> a saved base and tuned model, made once per module."""
    made: dict[tuple, Pair] = {}

    def pair(base_tie: bool = False, tuned_tie: bool | None = None, dtype=torch.float32) -> Pair:
        key = (base_tie, tuned_tie, dtype)
        if key not in made:
            root = tmp_path_factory.mktemp("pair")
            base = save_base(root / "base", tie_word_embeddings=base_tie)
            made[key] = Pair(base, save_tuned(base, root / "tuned", seed=1, tie=tuned_tie, dtype=dtype))
        return made[key]

    return pair


# ---------------------------------------------------------------------------------------------
# Reading what was written


def weights(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def names_in(file: Path) -> list[str]:
    """A safetensors file's tensor names, in the file's order."""
    with safe_open(file, "pt") as f:
        return list(f.keys())


def sha256(t: torch.Tensor) -> str:
    """Independent of the module's own: through numpy where it has the dtype."""
    data = t.contiguous().view(torch.int16) if t.dtype == torch.bfloat16 else t.contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def manifest(diff: Path) -> dict:
    return json.loads((diff / MANIFEST_FILE).read_text())


def logits(folder: Path) -> torch.Tensor:
    model, tokenizer = load_float32(folder)
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old" in p.name]


def diff(pair: Pair, out: Path, kind: str = "add", **settings):
    return run_diff(
        DiffConfig(base=str(pair.base), tuned=str(pair.tuned), output=str(out), kind=kind, **settings),
        progress=False,
    )


def recover(base: Path, diff_dir: Path, out: Path, **settings):
    return run_recover(
        RecoverConfig(base=str(base), diff=str(diff_dir), output=str(out), **settings), progress=False
    )


# ---------------------------------------------------------------------------------------------
# The pure steps


@pytest.mark.unit
def test_the_resize_rule_explains_only_rows_added_to_dim_0():
    assert shape_change([214, 64], [214, 64]) is Change.SAME
    assert shape_change([214, 64], [215, 64]) is Change.RESIZED
    assert shape_change([64], [64]) is Change.SAME
    for base, tuned in (([215, 64], [214, 64]), ([214, 64], [214, 32]), ([64], [65]), ([2, 3], [3, 3, 1])):
        assert shape_change(base, tuned) is None, (base, tuned)
    rows = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(resize_rows(rows, 4), torch.tensor([[1.0, 2.0], [3.0, 6.0], [2.0, 4.0], [2.0, 4.0]]))


@pytest.mark.unit
def test_xor_is_its_own_inverse_and_keeps_bytes_past_the_base():
    data = torch.arange(10, dtype=torch.uint8)
    base = torch.full((6,), 0xFF, dtype=torch.uint8)
    mixed = xor_bytes(data, base)
    assert torch.equal(mixed[6:], data[6:]) and not torch.equal(mixed[:6], data[:6])
    assert torch.equal(xor_bytes(mixed, base), data)


@pytest.mark.unit
def test_sha256_reads_the_raw_bytes_of_any_dtype():
    t = torch.randn(3, 5)
    assert tensor_sha256(t) == sha256(t)
    assert tensor_sha256(t.bfloat16()) == sha256(t.bfloat16())
    assert tensor_sha256(t.t()) == sha256(t.t())  # a non-contiguous view: its values' bytes


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.unit
@pytest.mark.parametrize(
    "base_tie, tuned_tie, dtype",
    [(False, None, torch.float32), (True, None, torch.float32), (False, None, torch.bfloat16)],
    ids=["untied", "tied", "bf16-tuned"],
)
def test_add_round_trip(pairs, tmp_path, base_tie, tuned_tie, dtype):
    pair = pairs(base_tie, tuned_tie, dtype)
    made = diff(pair, tmp_path / "diff")
    tuned = weights(pair.tuned)
    assert made.kind == "add" and made.tensors == len(tuned) and made.new == 0
    assert made.resized == (1 if base_tie else 2)  # the embedding, and lm_head where untied
    records = manifest(tmp_path / "diff")["tensors"]
    assert set(records) == set(tuned)

    # The diff is the original's layout: a float32 model transformers loads, tuned - grown base.
    stored, _ = load_float32(tmp_path / "diff")
    base_embedding = weights(pair.base)["model.embed_tokens.weight"]
    grown = torch.cat([base_embedding, base_embedding.mean(dim=0, keepdim=True)])
    expected = tuned["model.embed_tokens.weight"].float() - grown
    assert torch.equal(stored.get_input_embeddings().weight.detach(), expected)

    result = recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert result.verified and result.tensors_verified == result.tensors == len(tuned)
    recovered = weights(tmp_path / "out")
    worst = 0.0
    for name, t in tuned.items():
        assert (
            recovered[name].dtype == t.dtype and sha256(recovered[name]) == records[name]["recovered_sha256"]
        )
        deviation = float((recovered[name].float() - t.float()).abs().max())
        assert deviation == records[name]["max_abs_deviation"]
        assert deviation <= REL_TOLERANCE * float(t.float().abs().max()), name
        worst = max(worst, deviation)
    assert result.max_abs_deviation == made.max_abs_deviation == worst
    assert result.bit_exact == made.bit_exact == sum(r["bit_exact"] for r in records.values())
    if dtype == torch.bfloat16:  # fp32 rounding is far below a bf16 step: back exactly
        assert result.bit_exact == len(tuned) and result.max_deviation_tensor is None
    assert torch.allclose(logits(tmp_path / "out"), logits(pair.tuned), atol=1e-5)
    for side_file in ("config.json", "tokenizer.json", "prompt_format.json", "generation_config.json"):
        assert (tmp_path / "out" / side_file).read_bytes() == (pair.tuned / side_file).read_bytes()


@pytest.mark.unit
def test_xor_round_trip_is_bit_exact(pairs, tmp_path):
    """A tied fp32 base, an untied bf16 tuned model: the base is cast, its embedding stands in for
    the lm_head it does not store, and both grew a row."""
    pair = pairs(True, False, torch.bfloat16)
    made = diff(pair, tmp_path / "diff", kind="xor")
    assert made.resized == 2 and made.new == 0 and made.bit_exact == made.tensors
    records = manifest(tmp_path / "diff")["tensors"]
    assert records["lm_head.weight"]["base"] == "model.embed_tokens.weight"
    assert (
        records["lm_head.weight"]["base_dtype"] == "float32"
        and records["lm_head.weight"]["tuned_dtype"] == "bfloat16"
    )
    stored = weights(tmp_path / "diff")
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in stored.values())

    result = recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert result.kind == "xor" and result.verified and result.bit_exact == result.tensors
    tuned, recovered = weights(pair.tuned), weights(tmp_path / "out")
    assert recovered.keys() == tuned.keys()
    for name, t in tuned.items():
        assert torch.equal(recovered[name], t) and sha256(recovered[name]) == records[name]["tuned_sha256"]
    assert torch.equal(logits(tmp_path / "out"), logits(pair.tuned))


def with_tensors(source: Path, target: Path, **tensors: torch.Tensor) -> Path:
    """A copy of the model folder `source`, some tensors replaced or added."""
    copy_folder(source, target)
    save_file({**load_file(target / "model.safetensors"), **tensors}, target / "model.safetensors")
    return target


@pytest.mark.unit
def test_add_measures_what_float_rounding_loses(pairs, tmp_path):
    """A tuned weight far smaller than its base weight (1e-9 against 1.0) is lost in tuned - base:
    recovery gives back the bytes the diff recorded, and the deviation it recorded."""
    pair = pairs()
    small = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 1e-9
    tuned = with_tensors(pair.tuned, tmp_path / "tuned", **{"model.norm.weight": small})
    made = diff(Pair(pair.base, tuned), tmp_path / "diff")
    record = manifest(tmp_path / "diff")["tensors"]["model.norm.weight"]
    assert made.max_deviation_tensor == "model.norm.weight" and not record["bit_exact"]
    assert made.bit_exact == made.tensors - 1 and 0 < made.max_abs_deviation == record["max_abs_deviation"]
    result = recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert result.verified and result.max_deviation_tensor == "model.norm.weight"
    recovered = weights(tmp_path / "out")["model.norm.weight"]
    assert sha256(recovered) == record["recovered_sha256"] != record["tuned_sha256"]
    assert float((recovered - small).abs().max()) == result.max_abs_deviation == made.max_abs_deviation


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["add", "xor"])
def test_a_tensor_the_base_lacks_is_stored_whole(pairs, tmp_path, kind):
    pair = pairs()
    extra = torch.randn(7, 3).bfloat16()
    tuned = with_tensors(pair.tuned, tmp_path / "tuned", **{"extra.weight": extra})
    made = diff(Pair(pair.base, tuned), tmp_path / "diff", kind=kind)
    assert made.new == 1 and manifest(tmp_path / "diff")["tensors"]["extra.weight"]["change"] == "new"
    recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert torch.equal(weights(tmp_path / "out")["extra.weight"], extra)


def write_original_diff(pair: Pair, folder: Path, max_shard_bytes: int) -> None:
    """A diff as the original weight_diff.py's make_diff wrote it: both models in float32, the base
    resized with [PAD], tuned - base per tensor, saved as .bin shards (transformers 5 saves
    safetensors only, so the shards are written in the layout its save_pretrained used to write)."""
    tuned, tokenizer = load_float32(pair.tuned)
    raw, raw_tokenizer = load_float32(pair.base)
    resize_like_the_original(raw, raw_tokenizer)
    state_tuned, state_raw = tuned.state_dict(), raw.state_dict()
    for key in state_tuned:
        state_tuned[key].add_(-state_raw[key])
    folder.mkdir()
    tuned.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for key, value in state_tuned.items():
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + value.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][key] = value.clone()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for v in state_tuned.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.unit
def test_a_diff_the_original_wrote_recovers_unverified(pairs, tmp_path):
    pair = pairs()
    write_original_diff(pair, tmp_path / "diff", max_shard_bytes=200_000)
    assert len(list((tmp_path / "diff").glob("pytorch_model-*.bin"))) > 1
    result = recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert result.verification is Verification.NO_RECORD and not result.verified
    assert result.tensors_verified == 0 and result.bit_exact is None
    tuned, recovered = weights(pair.tuned), weights(tmp_path / "out")
    assert recovered.keys() == tuned.keys()
    for name, t in tuned.items():
        assert torch.allclose(recovered[name], t, rtol=0, atol=REL_TOLERANCE), name
    assert torch.allclose(logits(tmp_path / "out"), logits(pair.tuned), atol=1e-5)


@pytest.mark.unit
def test_a_small_shard_size_writes_several_shards_and_their_index(tmp_path):
    """~40 MB in float32, in shards of 16 MB."""
    base = save_base(tmp_path / "base", hidden_size=512, intermediate_size=1024, num_hidden_layers=4)
    pair = Pair(base, save_tuned(base, tmp_path / "tuned", seed=1))
    made = diff(pair, tmp_path / "diff", shard_size_mb=16)
    result = recover(pair.base, tmp_path / "diff", tmp_path / "out", shard_size_mb=16)
    for folder, written in ((tmp_path / "diff", made), (tmp_path / "out", result)):
        files = sorted(folder.glob("*.safetensors"))
        assert written.shards == len(files) >= 3
        assert [f.name for f in files] == [
            f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
        ]
        assert all(f.stat().st_size <= 16_000_000 for f in files)
        assert written.bytes_written == sum(f.stat().st_size for f in files)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        stored = {name: file.name for file in files for name in names_in(file)}
        assert index["weight_map"] == stored
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in weights(folder).values())
    assert result.verified
    assert torch.allclose(logits(tmp_path / "out"), logits(pair.tuned), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Wrong or damaged input


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["add", "xor"])
def test_a_wrong_base_fails_on_its_first_differing_tensor(pairs, tmp_path, kind):
    pair = pairs()
    diff(pair, tmp_path / "diff", kind=kind)
    other = save_base(tmp_path / "other", seed=7, tie_word_embeddings=False)
    right, wrong = weights(pair.base), weights(other)
    order = names_in(tmp_path / "diff" / "model.safetensors")
    first = next(n for n in order if not torch.equal(right[n], wrong[n]))
    with pytest.raises(UserError) as e:
        recover(other, tmp_path / "diff", tmp_path / "out")
    assert f"tensor {first} is not the one the diff was made from (sha256" in e.value.message
    assert e.value.fix == "pass the exact base model the diff was made from"
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.unit
def test_a_base_of_another_size_is_named_with_its_shape(pairs, tmp_path):
    pair = pairs()
    diff(pair, tmp_path / "diff", kind="xor")
    with pytest.raises(UserError, match=r"its shape is \[\d+, 32\], the diff's base had \[\d+, 64\]"):
        recover(
            save_base(tmp_path / "small", hidden_size=32, tie_word_embeddings=False),
            tmp_path / "diff",
            tmp_path / "out",
        )
    with pytest.raises(UserError, match="only rows added to dim 0"):  # and at diff time
        diff(
            Pair(save_base(tmp_path / "small2", hidden_size=32, tie_word_embeddings=False), pair.tuned),
            tmp_path / "diff2",
        )
    assert not leftovers(tmp_path)


@pytest.mark.unit
def test_an_existing_output_is_refused_and_replaced_with_force(pairs, tmp_path):
    pair = pairs()
    out = tmp_path / "diff"
    out.mkdir()
    (out / "old.txt").write_text("an earlier run")
    with pytest.raises(UserError, match="already exists"):
        diff(pair, out)
    assert (out / "old.txt").is_file()
    diff(pair, out, force=True)
    assert not (out / "old.txt").exists() and (out / MANIFEST_FILE).is_file() and not leftovers(tmp_path)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


@pytest.mark.unit
@pytest.mark.parametrize("where", ["base", "diff"])
def test_a_cut_off_safetensors_file_is_named(pairs, tmp_path, where):
    pair = pairs()
    diff(pair, tmp_path / "diff")
    base = copy_folder(pair.base, tmp_path / "base") if where == "base" else pair.base
    truncate((base if where == "base" else tmp_path / "diff") / "model.safetensors")
    with pytest.raises(UserError, match=rf"--{where} .*: model.safetensors cannot be read") as e:
        recover(base, tmp_path / "diff", tmp_path / "out")
    assert "cut off or damaged" in e.value.fix
    if where == "base":
        with pytest.raises(UserError, match=r"model\.safetensors cannot be read"):
            diff(Pair(base, pair.tuned), tmp_path / "diff2")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.unit
def test_a_cut_off_bin_shard_is_named(pairs, tmp_path):
    pair = pairs()
    write_original_diff(pair, tmp_path / "diff", max_shard_bytes=200_000)
    first = sorted((tmp_path / "diff").glob("pytorch_model-*.bin"))[0]
    truncate(first)
    with pytest.raises(UserError, match=f"{first.name} cannot be read"):
        recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert not leftovers(tmp_path)


@pytest.mark.unit
def test_a_damaged_record_or_tensor_in_the_diff_is_named(pairs, tmp_path):
    pair = pairs()
    diff(pair, tmp_path / "diff")
    record = tmp_path / "diff" / MANIFEST_FILE
    good = record.read_text()
    record.write_text(good[: len(good) // 2])
    with pytest.raises(UserError, match=f"{MANIFEST_FILE} is damaged"):
        recover(pair.base, tmp_path / "diff", tmp_path / "out")
    data = json.loads(good)
    del data["tensors"]["lm_head.weight"]["base_sha256"]
    record.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"is damaged \(tensor lm_head.weight\)"):
        recover(pair.base, tmp_path / "diff", tmp_path / "out")
    record.write_text(good)
    stored = load_file(tmp_path / "diff" / "model.safetensors")
    stored["lm_head.weight"][0, 0] += 1
    save_file(stored, tmp_path / "diff" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor lm_head\.weight is damaged"):
        recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.unit
def test_a_sum_that_comes_out_otherwise_is_reported_not_verified(pairs, tmp_path):
    """Diff and base intact, yet a grown embedding is not what the diff recorded (its new rows
    are a mean, summed in an order another CPU may choose): the output is written, and the result
    says which tensors are unverified. Any other tensor cannot differ so: that is an error."""
    pair = pairs()
    diff(pair, tmp_path / "diff")
    record = tmp_path / "diff" / MANIFEST_FILE
    data = json.loads(record.read_text())
    grown = next(n for n, r in data["tensors"].items() if r["change"] == "resized")
    data["tensors"][grown]["recovered_sha256"] = "0" * 64
    record.write_text(json.dumps(data))
    result = recover(pair.base, tmp_path / "diff", tmp_path / "out")
    assert result.verification is Verification.ROUNDING_DIFFERS and not result.verified
    assert result.unverified == (grown,) and result.tensors_verified == result.tensors - 1
    assert (tmp_path / "out" / "model.safetensors").is_file()

    data["tensors"]["model.norm.weight"]["recovered_sha256"] = "0" * 64
    record.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"tensor model\.norm\.weight: recovered from an intact base"):
        recover(pair.base, tmp_path / "diff", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.unit
def test_missing_or_empty_folders_and_other_architectures_are_refused(pairs, tmp_path):
    pair = pairs()
    with pytest.raises(UserError, match=r"--base .*nowhere: no such folder"):
        diff(Pair(tmp_path / "nowhere", pair.tuned), tmp_path / "diff")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--tuned .*empty: no model weights"):
        diff(Pair(pair.base, tmp_path / "empty"), tmp_path / "diff")
    mistral = copy_folder(pair.base, tmp_path / "mistral")
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(UserError, match=r"is a mistral model, --tuned .* a llama model"):
        diff(Pair(mistral, pair.tuned), tmp_path / "diff")
    with pytest.raises(UserError, match="would replace --tuned"):
        diff(pair, pair.tuned, force=True)
    assert (pair.tuned / "model.safetensors").is_file() and not (tmp_path / "diff").exists()


@pytest.mark.integration
def test_a_disk_that_fills_up_leaves_nothing_behind(pairs, tmp_path):
    """The recovered weights (~0.4 MB) meet a 64 KB file size limit: writes fail with EFBIG."""
    pair = pairs()
    diff(pair, tmp_path / "diff")
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from alpaca_forge import UserError
        from alpaca_forge.export.config import RecoverConfig
        from alpaca_forge.export.diff_runner import run_recover
        import safetensors.torch, torch  # loaded before the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
        try:
            run_recover(RecoverConfig(base={str(pair.base)!r}, diff={str(tmp_path / "diff")!r},
                                      output={str(tmp_path / "out")!r}), progress=False)
        except UserError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert done.returncode == 2, done.stderr
    assert "writing failed (File too large); nothing was left behind" in done.stderr
    assert "free some disk space" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.integration
def test_cli_diff_and_recover(pairs, tmp_path):
    pair = pairs()
    made = run_cli(
        "export", "diff", "--base", str(pair.base), "--tuned", str(pair.tuned), "--output", str(tmp_path / "diff"),
        "--kind", "xor", "--shard-size-mb", "16",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "diff (xor) of 21 tensors (2 resized, 0 new)" in made.stderr
    args = (
        "export",
        "recover",
        "--base",
        str(pair.base),
        "--diff",
        str(tmp_path / "diff"),
        "--output",
        str(tmp_path / "out"),
    )
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "verified: every tensor sha256-equal" in done.stderr and "Traceback" not in done.stderr
    tuned, recovered = weights(pair.tuned), weights(tmp_path / "out")
    assert all(torch.equal(recovered[n], t) for n, t in tuned.items())
    assert_user_error(run_cli(*args), "already exists", "--force")
    assert run_cli(*args, "--force").returncode == 0


@pytest.mark.integration
def test_cli_wrong_base_is_a_user_error(pairs, tmp_path):
    pair = pairs()
    diff(pair, tmp_path / "diff")
    other = save_base(tmp_path / "other", seed=7, tie_word_embeddings=False)
    done = run_cli(
        "export",
        "recover",
        "--base",
        str(other),
        "--diff",
        str(tmp_path / "diff"),
        "--output",
        str(tmp_path / "out"),
    )
    assert_user_error(done, "is not the one the diff was made from", "pass the exact base model")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# --base named as every --model is


def cache_like_the_hub(folder: Path, cache: Path, hub_id: str) -> None:
    """`folder` put into a Hugging Face cache as `hf download` lays it out: the files under
    snapshots/<commit>/, refs/main naming the commit."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    commit = hashlib.sha1(hub_id.encode()).hexdigest()
    (repo / "snapshots").mkdir(parents=True)
    copy_folder(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.integration
def test_cli_base_as_a_cached_hugging_face_id(pairs, tmp_path):
    pair = pairs()
    cache_like_the_hub(pair.base, tmp_path / "hub", "tiny-org/tiny-base")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    made = run_cli_process(
        "export", "diff", "--base", "tiny-org/tiny-base", "--tuned", str(pair.tuned), "--output", str(tmp_path / "diff"),
        env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = run_cli_process(
        "export", "recover", "--base", "tiny-org/tiny-base", "--diff", str(tmp_path / "diff"), "--output",
        str(tmp_path / "out"), env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "verified: every tensor sha256-equal" in done.stderr
    assert all(torch.equal(weights(tmp_path / "out")[n], t) for n, t in weights(pair.tuned).items())
    # the same diff recovers against the folder itself: the id named those very weights
    assert recover(pair.base, tmp_path / "diff", tmp_path / "out2").verified
    missing = run_cli_process(
        "export", "diff", "--base", "tiny-org/absent", "--tuned", str(pair.tuned), "--output", str(tmp_path / "d2"),
        env=env,
    )  # fmt: skip
    assert_user_error(
        missing, "--base unknown model 'tiny-org/absent'", "not in the local Hugging Face cache"
    )


@pytest.mark.unit
def test_base_as_a_gguf_file_is_its_dense_copy(tiny_model_dir, tiny_gguf, tmp_path):
    tuned = save_tuned(tiny_model_dir, tmp_path / "tuned", seed=3)
    made = diff(Pair(tiny_gguf, tuned), tmp_path / "diff")
    result = recover(tiny_gguf, tmp_path / "diff", tmp_path / "out")
    assert result.verified and result.tensors_verified == made.tensors
    assert all(torch.equal(weights(tmp_path / "out")[n], t) for n, t in weights(tuned).items())


@pytest.mark.unit
def test_a_base_that_names_no_model_says_so_with_the_flag(pairs, tmp_path):
    pair = pairs()
    with pytest.raises(UserError, match=r"--base unknown model 'no-such-model'") as e:
        diff(Pair(Path("no-such-model"), pair.tuned), tmp_path / "diff")
    assert "smollm2-135m-instruct" in e.value.fix
    with pytest.raises(UserError, match=r"--base \./nowhere: no such folder"):
        run_recover(RecoverConfig(base="./nowhere", diff=str(pair.tuned), output=str(tmp_path / "out")))


# ---------------------------------------------------------------------------------------------
# The embedded model


@pytest.mark.real_model
def test_add_and_xor_round_trips_on_the_embedded_model(tmp_path):
    from alpaca_forge.core.models import load_pretrained

    model, tokenizer, _ = load_pretrained("smollm2-135m-instruct")
    save_model(model, tokenizer, tmp_path / "base", get_format("chat"))
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * NOISE)
    save_model(model, tokenizer, tmp_path / "tuned", get_format("chat"))
    del model
    added = diff(Pair(tmp_path / "base", tmp_path / "tuned"), tmp_path / "add", kind="add")
    result = recover(tmp_path / "base", tmp_path / "add", tmp_path / "out-add")
    assert result.verified and result.tensors_verified == added.tensors
    assert result.max_abs_deviation is not None and result.max_abs_deviation <= 1e-6
    made = diff(Pair(tmp_path / "base", tmp_path / "tuned"), tmp_path / "diff", kind="xor")
    result = recover(tmp_path / "base", tmp_path / "diff", tmp_path / "out")
    assert result.verified and result.bit_exact == result.tensors == made.tensors
    tuned_file, out_file = tmp_path / "tuned" / "model.safetensors", tmp_path / "out" / "model.safetensors"
    assert sorted(names_in(out_file)) == sorted(names_in(tuned_file))
    with safe_open(tuned_file, "pt") as tuned, safe_open(out_file, "pt") as out:
        for name in names_in(tuned_file):
            assert torch.equal(out.get_tensor(name), tuned.get_tensor(name)), name
