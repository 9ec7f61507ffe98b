"""The README's examples, read as a newcomer reads them: every fenced `sh` and `python` block, in
order, and the `yaml` blocks that say where to save them.

A shell block is split into commands (a line ending in a backslash goes on). Shell comments of
the form `# ci: ...` are directives for the command that follows them, visible in the README so a
reader sees what CI does differently and why:

    # ci: skip (REASON)          not run here; REASON says why (a GPU, a 7B model, the network)
    # ci: add ARGS               run with ARGS added (a documented flag that scales it down)
    # ci: background URL         a server: started, waited for until URL answers 200, and stopped
                                 (Ctrl-C) when the README's section ends
    # ci: makes PATH [PATH ...]  files the command must leave behind, beyond its --output

A `python` block is one example; `# ci: skip (REASON)` as its first line skips it. A block right
after the line `<!-- ci: skip (REASON) -->` is skipped whole (the README's first lines, whose two
commands are the ones CI itself runs). A `yaml` block whose first line is `# save as PATH` is
written to PATH before the examples after it run. A section is a `## ` or `### ` heading.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^#\s*ci:\s*(\w+)\s*(.*)$")
SAVE_AS = re.compile(r"^#\s*save as\s+(\S+)\s*$")
BLOCK_SKIP = re.compile(r"^<!--\s*ci:\s*skip\s*\((.+)\)\s*-->$")
# Flags whose value is a file or folder the command writes: it must exist afterwards.
OUTPUT_FLAGS = ("--output", "--output-dir", "--plot", "--report")


@dataclass
class Example:
    kind: str  # "sh", "python" or "file"
    line: int  # where it starts in the README (1-based)
    section: str  # the `## ` heading it is under
    text: str  # the command as written (continuations joined), the snippet, or the file's text
    skip: str | None = None  # why it does not run here
    add: str = ""  # arguments CI adds
    background: str | None = None  # the URL that answers once the server is up
    makes: list[str] = field(default_factory=list)
    path: str | None = None  # kind "file": where it goes

    @property
    def command(self) -> str:
        """The command CI runs: ARGS of `# ci: add` go before a trailing comment."""
        if not self.add:
            return self.text
        code, comment = split_comment(self.text)
        return f"{code.rstrip()} {self.add}" + (f"  {comment}" if comment else "")

    def outputs(self) -> list[str]:
        """Files and folders the command must leave behind: its output flags' values and `makes`."""
        found = list(self.makes)
        try:
            words = shlex.split(split_comment(self.command)[0])
        except ValueError:
            return found
        for i, word in enumerate(words):
            flag, eq, value = word.partition("=")
            if flag in OUTPUT_FLAGS:
                value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
                if value and not value.startswith("-"):
                    found.append(value)
        return found

    @property
    def label(self) -> str:
        first = self.path or self.text.strip().splitlines()[0]
        return f"README.md:{self.line} {first[:70]}"


def split_comment(command: str) -> tuple[str, str]:
    """`command` cut at its first `#` that starts a shell comment (outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i], command[i:]
    return command, ""


def read_examples(readme: Path) -> list[Example]:
    lines = readme.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    section = ""
    i = 0
    while i < len(lines):
        if lines[i].startswith(("## ", "### ")):
            section = lines[i].lstrip("#").strip()
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1), i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        body = lines[start:end]
        skipped = BLOCK_SKIP.match(lines[i - 1].strip()) if i else None
        if skipped and lang in ("sh", "python"):
            found = (
                _shell_commands(body, start + 1, section)
                if lang == "sh"
                else [_python_snippet(body, start + 1, section)]
            )
            for e in found:
                e.skip = skipped.group(1)
            examples.extend(found)
        elif lang == "sh":
            examples.extend(_shell_commands(body, start + 1, section))
        elif lang == "python":
            examples.append(_python_snippet(body, start + 1, section))
        elif lang == "yaml" and body and SAVE_AS.match(body[0]):
            path = SAVE_AS.match(body[0]).group(1)
            examples.append(Example("file", start + 1, section, "\n".join(body) + "\n", path=path))
        i = end + 1
    return examples


def _shell_commands(body: list[str], first_line: int, section: str) -> list[Example]:
    commands: list[Example] = []
    pending: dict = {"makes": []}
    i = 0
    while i < len(body):
        line, number = body[i], first_line + i
        stripped = line.strip()
        i += 1
        if not stripped:
            continue
        if stripped.startswith("#"):
            directive = DIRECTIVE.match(stripped)
            if directive:
                _note(pending, directive.group(1), directive.group(2).strip(), number)
            continue
        parts = [line]
        while split_comment(parts[-1])[0].rstrip().endswith("\\") and i < len(body):
            parts.append(body[i])
            i += 1
        text = "\n".join(parts)
        commands.append(Example("sh", number, section, text, **pending))
        pending = {"makes": []}
    if any(v for v in pending.values()):
        raise ValueError(
            f"README.md:{first_line + len(body) - 1}: a `# ci:` directive with no command after it"
        )
    return commands


def _note(pending: dict, verb: str, rest: str, number: int) -> None:
    if verb == "skip":
        reason = rest.strip("() ")
        if not reason:
            raise ValueError(f"README.md:{number}: `# ci: skip` needs a reason in brackets")
        pending["skip"] = reason
    elif verb == "add":
        pending["add"] = rest
    elif verb == "background":
        pending["background"] = rest
    elif verb == "makes":
        pending["makes"] = rest.split()
    else:
        raise ValueError(
            f"README.md:{number}: unknown directive `# ci: {verb}` (skip, add, background, makes)"
        )


def _python_snippet(body: list[str], first_line: int, section: str) -> Example:
    skip = None
    if body and (directive := DIRECTIVE.match(body[0].strip())):
        if directive.group(1) != "skip":
            raise ValueError(f"README.md:{first_line}: a python example takes only `# ci: skip (REASON)`")
        skip = directive.group(2).strip("() ")
    return Example("python", first_line, section, "\n".join(body) + "\n", skip=skip)
