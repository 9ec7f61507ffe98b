"""The little train needs to know about several processes (torchrun, accelerate launch).

The Trainer (through accelerate) sets up and runs the process group; these helpers only ask who
writes shared files, gather a value from every process, and let all of them leave together.
"""

from __future__ import annotations

import os
from typing import Any


def is_main_process() -> bool:
    """Before the Trainer sets up distribution, the launcher's RANK says who writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _initialized() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather(value: Any) -> list[Any]:
    """`value` from every process, in rank order (just `[value]` without distribution)."""
    import torch

    if not _initialized():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


# How long ending the process group may take once every process has passed the barrier.
LEAVE_TIMEOUT_S = 30.0


def leave_together() -> None:
    """Wait for every process, then end the process group: a process exiting while another still
    talks to it aborts the run (gloo). Once all have met at the barrier nothing is left to say, so
    a `destroy_process_group` that does not return (seen once in CI: gloo, 2 CPU processes, the
    other rank gone) is left behind after LEAVE_TIMEOUT_S instead of holding the run forever."""
    import threading

    import torch

    if _initialized():
        torch.distributed.barrier()
        ending = threading.Thread(target=torch.distributed.destroy_process_group, daemon=True)
        ending.start()
        ending.join(LEAVE_TIMEOUT_S)
