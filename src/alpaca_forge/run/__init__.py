"""`alpaca-forge run`: a recipe file chains generate, data, train, infer, eval and export into one
resumable run with a cost forecast, a provenance manifest and one offline HTML report."""

from .config import RunConfig
from .recipe import Recipe, load_recipe
from .runner import RunResult, run

__all__ = ["Recipe", "RunConfig", "RunResult", "load_recipe", "run"]
