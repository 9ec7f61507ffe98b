"""`alpaca-forge serve`: an OpenAI-compatible API and an offline chat page over any engine."""

from .config import FilterConfig, ServeConfig
from .runner import RunningServer, ServeResult, run, start

__all__ = ["FilterConfig", "RunningServer", "ServeConfig", "ServeResult", "run", "start"]
