"""Library messages a user can do nothing about, kept off stderr one exact message at a time.

Every other warning still shows. Two sources:

- bitsandbytes, imported whenever peft is (peft/helpers.py imports it unconditionally, and
  transformers' trainer_utils imports peft), tries at import time on CPUs with AVX512-BF16 to
  fetch a 4-bit CPU kernel from the Hugging Face Hub through `kernels`. Offline (the CLI's
  default) that fails, and two loggers say so. We never run a 4-bit kernel on a CPU (QLoRA is
  refused without CUDA), so `quiet_library_logs` drops exactly those two messages; it runs when
  `core.models` is imported, before anything imports peft or transformers.
- peft 0.21.2's `PeftModel.__init__` (peft/peft_model.py:184) reads
  `model.is_gradient_checkpointing`, which transformers 5 deprecated with a FutureWarning.
  `peft_call` silences exactly that warning around our calls into peft.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (logger name, start of the message) for each log record dropped.
_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
DROPPED_LOGS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{_KERNEL_REPO}'"),
)
PEFT_CHECKPOINTING_WARNING = "`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with one text."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_library_logs() -> None:
    """Install the filters (once; a logger exists before the library that logs to it is imported)."""
    for name, start in DROPPED_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))


@contextmanager
def peft_call() -> Iterator[None]:
    """Around `get_peft_model` / `PeftModel.from_pretrained`: without peft_model.py:184's
    FutureWarning (see the module's docstring); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_WARNING, category=FutureWarning)
        yield
