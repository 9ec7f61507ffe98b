import pytest
import torch

from alpaca_forge import UserError, get_format, load_model, resolve_model, save_model
from alpaca_forge.core.devices import pick_dtype

from conftest import assert_user_error, build_tiny_model, build_tiny_tokenizer, run_cli


@pytest.mark.unit
def test_a_saved_folder_loads_with_its_prompt_format(tiny_model_dir, tiny_lm):
    assert resolve_model(str(tiny_model_dir)).kind == "dir"
    assert tiny_lm.prompt_format == get_format("alpaca")
    assert tiny_lm.model.dtype == torch.float32
    assert not tiny_lm.model.training


@pytest.mark.unit
def test_save_then_load_gives_identical_logits(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=3).eval()
    save_model(model, tok, tmp_path / "m", get_format("user-assistant"))
    lm = load_model(str(tmp_path / "m"), device="cpu")
    ids = tok("the cat sat", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, lm.model(**ids).logits)
    assert lm.prompt_format == get_format("user-assistant")


@pytest.mark.unit
def test_a_folder_without_a_saved_format_uses_the_chat_template(tmp_path):
    tok = build_tiny_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), device="cpu").prompt_format.name == "chat"


@pytest.mark.unit
def test_an_explicit_format_overrides_the_saved_one(tiny_model_dir, caplog):
    lm = load_model(str(tiny_model_dir), device="cpu", format="user-assistant")
    assert lm.prompt_format.name == "user-assistant"
    assert "trained with the 'alpaca' prompt format" in caplog.text


@pytest.mark.unit
def test_bf16_on_request(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.unit
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model-anywhere", "not in the local Hugging Face cache"),
        ("someone/some-model", "HF_HUB_OFFLINE=1"),
        ("./missing/folder", "no such file or directory"),
        ("weights.gguf", "no such file or directory"),
    ],
)
def test_unknown_models_are_clear_errors(spec, message):
    with pytest.raises(UserError, match=message) as e:
        resolve_model(spec)
    assert e.value.fix


@pytest.mark.unit
def test_a_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no model weights in this directory"):
        resolve_model(str(tmp_path))


@pytest.mark.unit
def test_cuda_asked_for_without_a_gpu(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU"):
        load_model(str(tiny_model_dir), device="cuda")


@pytest.mark.integration
def test_cli_unknown_model_and_empty_folder(tmp_path):
    instructions = tmp_path / "in.jsonl"
    instructions.write_text('{"instruction": "Hi"}\n')
    r = run_cli(
        "infer",
        "--model",
        "gpt-17-ultra",
        "--input",
        str(instructions),
        "--output",
        str(tmp_path / "o.jsonl"),
    )
    assert_user_error(r, "unknown model 'gpt-17-ultra'", "smollm2-135m-instruct")
    (tmp_path / "empty").mkdir()
    r = run_cli("chat", "--model", str(tmp_path / "empty"), input="Hi\n")
    assert_user_error(r, "no model weights in this directory")
