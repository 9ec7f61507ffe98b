"""`alpaca-forge chat`: talk to a model in the terminal, answers streamed."""

from .config import ChatConfig
from .runner import ChatResult, run

__all__ = ["ChatConfig", "ChatResult", "run"]
