"""README.md's measured figures are what the committed bench results render to (bench/readme_figures.py).

A figure typed by hand drifts from what the commands print; one between `<!-- bench:KEY -->`
markers is rendered from bench/results/KEY.json, and this test fails when the two disagree.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def _load_figures():
    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "bench" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _load_figures()

CHAT = {
    "tokens": 128,
    "rounds": {"bare": [20.0, 22.8], "stream": [19.7, 19.1]},
    "best_tok_s": {"bare": 22.8, "stream": 19.7},
    "ratio": 0.864,
    "threads": 2,
    "machine": {"cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpus": 2, "python": "3.11.7"},
}


def test_the_readme_spans_are_the_committed_results():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    if not figures.spans(text):
        pytest.skip("README.md has no <!-- bench:KEY --> markers yet")
    assert figures.check(text) == [], "run `python bench/readme_figures.py` after the benches"


def test_every_committed_results_file_renders():
    """A render that no longer matches its bench's JSON fails here, before a README points at it."""
    for key, (files, _, _) in figures.RENDERS.items():
        if all((figures.RESULTS / f).is_file() for f in files):
            assert figures.render(key).strip(), key


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "chat.json").write_text(json.dumps(CHAT))
    return folder


def test_a_row_span_is_rewritten_from_its_results_and_then_checks_clean(tmp_path, results, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(
        "| what | figure |\n| --- | --- |\n| <!-- bench:chat -->old | 0.4–2 s<!-- /bench:chat --> |\n"
    )
    assert figures.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert "bench:chat: differs from chat.json" in capsys.readouterr().out
    assert readme.read_text().count("0.4–2 s") == 1  # --check changes nothing

    assert figures.main(["--readme", str(readme), "--results", str(results)]) == 0
    row = readme.read_text().splitlines()[2]
    assert row.startswith("| <!-- bench:chat -->`chat` stream vs bare `model.generate`, SmolLM2 fp32, 128 ")
    assert row.endswith("| 19.7 vs 22.8 tok/s (0.86×)<!-- /bench:chat --> |")
    assert "Intel Xeon Platinum 8481C, 2 cores, 2 threads" in row
    assert figures.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0


def test_a_missing_results_file_or_an_unknown_key_is_listed_and_left_alone(tmp_path, results, capsys):
    readme = tmp_path / "README.md"
    text = "<!-- bench:serve -->typed<!-- /bench:serve --> and <!-- bench:nope -->x<!-- /bench:nope -->\n"
    readme.write_text(text)
    assert figures.main(["--readme", str(readme), "--results", str(results)]) == 1
    out = capsys.readouterr().out
    assert "bench:serve: results missing" in out and "serve.json" in out
    assert "bench:nope: no render function for this key" in out
    assert readme.read_text() == text


def test_a_table_span_sits_between_blank_lines(tmp_path):
    spans = figures.spans("a\n<!-- bench:export-table -->\n\n| t |\n\n<!-- /bench:export-table -->\nb")
    assert spans == [("export-table", "\n\n| t |\n\n")]
    assert figures.RENDERS["export-table"][2] is True  # rendered as a block
    assert figures.RENDERS["chat"][2] is False  # inline: cells of a row
