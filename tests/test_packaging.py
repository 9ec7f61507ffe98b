"""pyproject.toml against the code: what is imported is declared, once, and the build backend can
read the metadata as written."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SRC = REPO / "src" / "alpaca_forge"

pytestmark = pytest.mark.unit

# Distributions whose import name is not their own, for when one is not installed here
# (llama-cpp-python before `make llamacpp`); installed ones are looked up.
IMPORT_NAMES = {"llama_cpp": "llama-cpp-python"}


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _declared() -> dict[str, list[str]]:
    """distribution name -> every requirement string naming it, in dependencies and every extra."""
    out: dict[str, list[str]] = {}
    groups = [PROJECT["project"]["dependencies"], *PROJECT["project"]["optional-dependencies"].values()]
    for group in groups:
        for req in group:
            out.setdefault(_requirement_name(req), []).append(req)
    return out


def _imported_top_level_names() -> dict[str, str]:
    """top-level module -> one file importing it, for every absolute import in the package."""
    found: dict[str, str] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    distributions = packages_distributions()
    declared = _declared()
    missing = []
    for module, where in sorted(_imported_top_level_names().items()):
        if module in sys.stdlib_module_names or module in ("alpaca_forge", "__future__"):
            continue
        # Not installed here (llama-cpp-python before `make llamacpp`): its import name is its own.
        names = {
            d.lower().replace("_", "-") for d in distributions.get(module, [IMPORT_NAMES.get(module, module)])
        }
        if not names & declared.keys():
            missing.append(f"{module} ({'/'.join(sorted(names))}, imported in {where})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(missing)


def test_each_package_has_one_version_range():
    declared = _declared()
    ranges = {
        name: {re.sub(r"\s", "", r.split(";")[0].removeprefix(name)) for r in reqs}
        for name, reqs in declared.items()
    }
    several = {name: sorted(r) for name, r in ranges.items() if len(r) > 1 and name != "alpaca-forge"}
    assert not several, f"one package, several ranges: {several}"


def test_the_build_backend_reads_the_license_as_written():
    # A `license = "SPDX expression"` string is PEP 639, which setuptools reads from 77 on.
    assert isinstance(PROJECT["project"]["license"], str)
    (setuptools,) = [r for r in PROJECT["build-system"]["requires"] if _requirement_name(r) == "setuptools"]
    version = re.search(r">=\s*([\d.]+)", setuptools)
    assert version and tuple(int(x) for x in version.group(1).split(".")[:1]) >= (77,), setuptools


def test_all_names_every_extra_but_the_source_builds():
    extras = PROJECT["project"]["optional-dependencies"]
    (all_,) = extras["all"]
    named = set(re.search(r"\[(.*)\]", all_).group(1).split(","))
    assert named == set(extras) - {"all", "dev", "llamacpp"}
