"""The README, followed top to bottom: every shell command and Python snippet runs in order, as
written (scaled only where a `# ci:` line in the README says so), in one fresh folder that holds
nothing but the repository's recipes, configs and examples, with the installed `alpaca-forge`
first on PATH. A command that fails, or that does not leave its documented output behind, fails
its test; a skipped one shows the README's reason. Each example's wall time goes to
`.test-artifacts/readme-examples.json` (and a table beside it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from readme_examples import Example, read_examples, split_comment

from conftest import REPO

README = REPO / "README.md"
EXAMPLES = read_examples(README)
ARTIFACTS = REPO / ".test-artifacts"
# What a newcomer has beside the README in a clone; the examples read nothing else of ours.
CARRIED = ("recipes", "configs", "examples")
COMMAND_TIMEOUT_S = 600
# A clean run: no Python warning from a library (`file.py:12: FutureWarning: ...`), no message of
# bitsandbytes' or kernels' offline hub fetches. Our own warnings are plain sentences to act on.
LIBRARY_NOISE = re.compile(r"^\S+\.py:\d+: \w*Warning: |kernels-community|pip install kernels")
SERVER_START_S = 180


# ---------------------------------------------------------------------------------------------
# The parser (unit tier)


@pytest.mark.unit
def test_the_readme_has_examples_of_every_kind():
    kinds = {e.kind for e in EXAMPLES}
    assert {"sh", "python", "file"} <= kinds
    assert sum(e.kind == "sh" and not e.skip for e in EXAMPLES) >= 20


@pytest.mark.unit
def test_every_skip_says_why_in_the_readme():
    for e in EXAMPLES:
        if e.skip is not None:
            assert len(e.skip) > 10, f"{e.label}: skip reason {e.skip!r} says too little"


@pytest.mark.unit
def test_directives_and_continuations_are_read(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "## A\n```sh\n# ci: add --max-requests 2\nalpaca-forge generate --output x.jsonl \\\n"
        "    --seeds s.jsonl   # a comment\n# ci: skip (needs a GPU with 80 GB)\nalpaca-forge train\n```\n"
        "## B\n```yaml\n# save as r.yaml\nname: r\n```\n```python\nprint(1)\n```\n```text\nnot run\n```\n"
    )
    gen, train, saved, snippet = read_examples(readme)
    assert gen.command == (
        "alpaca-forge generate --output x.jsonl \\\n    --seeds s.jsonl --max-requests 2  # a comment"
    )
    assert gen.outputs() == ["x.jsonl"] and gen.section == "A" and gen.line == 4
    assert train.skip == "needs a GPU with 80 GB"
    assert (saved.kind, saved.path, saved.section) == ("file", "r.yaml", "B")
    assert snippet.kind == "python" and snippet.text == "print(1)\n"


@pytest.mark.unit
def test_a_hash_inside_quotes_is_not_a_comment():
    assert split_comment("echo '# no' \"a # b\" # yes") == ("echo '# no' \"a # b\" ", "# yes")


# ---------------------------------------------------------------------------------------------
# The walk (integration tier): one folder, the examples in order


def _no_library_noise(e: Example, stderr: str) -> None:
    noise = [line for line in stderr.splitlines() if LIBRARY_NOISE.search(line)]
    assert not noise, f"{e.label}: a warning a user can do nothing about:\n" + "\n".join(noise[:5])


class Walk:
    def __init__(self, root: Path):
        self.root = root
        self.servers: list[tuple[Example, subprocess.Popen, Path]] = []
        self.times: list[dict] = []
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        self.env.pop("PYTHONPATH", None)
        for name in CARRIED:
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, root / name)

    def run(self, e: Example) -> None:
        self.stop_servers(unless_in=e.section)
        started = time.monotonic()
        if e.kind == "file":
            target = self.root / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(e.text, encoding="utf-8")
        elif e.background:
            self._start_server(e)
        else:
            argv = (
                ["bash", "-o", "pipefail", "-c", e.command]
                if e.kind == "sh"
                else [sys.executable, "-c", e.text]
            )
            done = subprocess.run(
                argv, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=COMMAND_TIMEOUT_S,
            )  # fmt: skip
            if done.returncode != 0:
                pytest.fail(
                    f"{e.label}\n$ {e.command if e.kind == 'sh' else e.text}\nexit {done.returncode}\n"
                    f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-4000:]}"
                )
            _no_library_noise(e, done.stderr)
        wall = time.monotonic() - started
        missing = [p for p in (e.outputs() if e.kind == "sh" else []) if not (self.root / p).exists()]
        self.times.append(
            {"line": e.line, "section": e.section, "kind": e.kind, "example": e.label, "s": round(wall, 1)}
        )
        assert not missing, f"{e.label}: ran, but did not write {', '.join(missing)}"

    def _start_server(self, e: Example) -> None:
        log = self.root.parent / f"server-{e.line}.log"  # a file, not a pipe nobody reads while it serves
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["bash", "-c", "exec " + split_comment(e.command)[0].replace("\\\n", " ")],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.servers.append((e, proc, log))
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{e.label}: the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(e.background, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{e.label}: {e.background} did not answer 200 within {SERVER_START_S} s")

    def stop_servers(self, unless_in: str | None = None) -> None:
        """Ctrl-C to the servers of other sections than `unless_in` (all without it), as a user
        stops them; what they printed must be as clean as any command's."""
        stopped = [s for s in self.servers if s[0].section != unless_in]
        self.servers = [s for s in self.servers if s[0].section == unless_in]
        for _e, proc, _log in stopped:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for e, _proc, log in stopped:
            _no_library_noise(e, log.read_text(errors="replace"))

    def write_times(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "readme-examples.json").write_text(json.dumps(self.times, indent=1) + "\n")
        rows = ["| README line | example | s |", "| ---: | --- | ---: |"]
        rows += [
            f"| {t['line']} | `{t['example'].split(' ', 1)[1].replace('|', chr(92) + '|')}` | {t['s']} |"
            for t in self.times
        ]
        (ARTIFACTS / "readme-examples.md").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    w = Walk(tmp_path_factory.mktemp("readme-walk"))
    yield w
    w.stop_servers()
    w.write_times()


@pytest.mark.integration
@pytest.mark.llamacpp
@pytest.mark.parametrize("example", EXAMPLES, ids=[f"L{e.line}" for e in EXAMPLES])
def test_readme_example(walk, example):
    if example.skip:
        pytest.skip(f"README.md:{example.line}: {example.skip}")
    walk.run(example)


# ---------------------------------------------------------------------------------------------
# One set of names: --help examples and shipped configs use the README's folders


PATHLIKE = re.compile(r"(?<![\w./-])((?:runs|out|data|logs)/[\w.-]+(?:/[\w.-]+)*)")


def _help_examples() -> dict[str, str]:
    """Each command's whole --help (its examples included), by command."""
    from alpaca_forge.cli import build_parser

    found: dict[str, str] = {}

    def walk(parser, name):
        found[name] = parser.format_help()
        for action in parser._actions:
            for sub, child in (getattr(action, "choices", None) or {}).items():
                if hasattr(child, "_actions"):
                    walk(child, f"{name} {sub}")

    walk(build_parser(), "alpaca-forge")
    return found


@pytest.mark.unit
def test_help_examples_and_configs_name_the_readmes_folders():
    readme = README.read_text(encoding="utf-8")
    sources = {f"`{cmd} --help`": text for cmd, text in _help_examples().items()}
    sources |= {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "configs").glob("*.yaml"))}
    sources |= {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "recipes").glob("*.yaml"))}
    strangers = sorted(
        f"{where}: {path}" for where, text in sources.items() for path in set(PATHLIKE.findall(text))
        if path not in readme
    )  # fmt: skip
    assert not strangers, "paths the README never names (use its folders):\n" + "\n".join(strangers)
