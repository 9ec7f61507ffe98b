"""`alpaca-forge train`: supervised fine-tuning (full, LoRA, QLoRA), resumable, on one or many devices."""

from .config import TrainConfig
from .runner import TrainResult, run

__all__ = ["TrainConfig", "TrainResult", "run"]
