"""`alpaca-forge infer`: answer every instruction of a file, as JSONL, resumably."""

from .config import InferConfig
from .runner import InferResult, run

__all__ = ["InferConfig", "InferResult", "run"]
