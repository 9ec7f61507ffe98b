"""A CPU LoRA run prints our own lines only: no library warning a user can do nothing about.

Its own process, since bitsandbytes logs at import time, once per process (issue 22)."""

from __future__ import annotations

import re

import pytest

from alpaca_forge import write_records
from alpaca_forge.core.library_noise import DROPPED_LOGS, PEFT_CHECKPOINTING_WARNING

from conftest import run_cli_process

pytestmark = pytest.mark.integration

# What `warnings.showwarning` prints: "path:line: SomeWarning: message".
PYTHON_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ", re.MULTILINE)


def test_a_lora_train_and_merge_on_the_cpu_print_no_library_warning(tiny_model_dir, tmp_path):
    data = write_records(
        tmp_path / "train.jsonl",
        [{"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)} for i in range(12)],
    )
    result = run_cli_process(
        "train",
        *("--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "lora")),
        *("--method", "lora", "--lora-targets", "q_proj,v_proj", "--epochs", "1", "--batch-size", "4"),
        "--merge",  # PeftModel.from_pretrained too: the one merge path
        env={"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default::FutureWarning"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lora" / "merged").is_dir()
    for _, message in DROPPED_LOGS:
        assert message not in result.stderr, result.stderr
    assert "kernels" not in result.stderr and "bitsandbytes" not in result.stderr, result.stderr
    assert PEFT_CHECKPOINTING_WARNING not in result.stderr, result.stderr
    assert not PYTHON_WARNING.search(result.stderr), result.stderr
