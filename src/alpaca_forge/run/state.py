"""The run directory's memory: what each stage last ran with, and content hashes.

`RUN/state.json` holds, per stage, the fingerprint it ran with (a hash of its resolved settings and
the content of every file it reads), whether it finished, its outputs' hashes, its wall time and
its figures. It is rewritten atomically at each stage's start and end, so a killed run knows
which stage was in flight. Hashes of large files are kept by (size, mtime) so that a 13 GB model
is read once, not on every check.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import sha256_of, write_json_atomic

STATE_FILE = "state.json"
STATE_VERSION = 1
# In a model folder, what makes the model (checkpoints, logs and the summary's timings are not).
_SKIPPED_DIRS = ("tensorboard",)
_SKIPPED_PREFIXES = ("checkpoint-",)


def _file_digest(path: Path, cache: dict[str, Any]) -> str:
    st = path.stat()
    key = str(path)
    known = cache.get(key)
    if known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
        return known["sha256"]
    digest = sha256_of(path)
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def content_hash(path: Path, cache: dict[str, Any]) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted); checkpoints
    and logs inside a model folder are left out."""
    if path.is_file():
        return _file_digest(path, cache)
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or rel.parts[0] in _SKIPPED_DIRS or rel.parts[0].startswith(_SKIPPED_PREFIXES):
            continue
        h.update(str(rel).encode())
        h.update(b"\0")
        h.update(_file_digest(f, cache).encode())
    return h.hexdigest()


def fingerprint(stage: str, settings: Any, inputs: dict[str, str]) -> str:
    """A stage's identity: its settings (run-directory paths written relative) and its inputs'
    content hashes. The same fingerprint means the same work, so the stage is skipped."""
    blob = json.dumps({"stage": stage, "settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    fingerprint: str
    status: str  # "running" or "done"
    outputs: dict[str, str] = field(default_factory=dict)  # path -> content hash
    wall_s: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)  # what the report and manifest show


@dataclass
class RunState:
    path: Path
    recipe_name: str
    recipe_path: str
    stages: dict[str, StageRecord] = field(default_factory=dict)
    hashes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: Path, recipe_name: str, recipe_path: Path) -> RunState:
        """The run directory's state; a directory made by another recipe is refused."""
        path = run_dir / STATE_FILE
        if not path.is_file():
            if run_dir.is_dir() and any(run_dir.iterdir()):
                raise UserError(
                    f"run_dir {run_dir} is not empty and holds no {STATE_FILE}: it is not a run directory",
                    "choose another run_dir in the recipe, or empty that folder",
                )
            return cls(path, recipe_name, str(recipe_path))
        try:
            data = json.loads(path.read_text())
            stages = {k: StageRecord(**v) for k, v in data["stages"].items()}
            owner = data["recipe_name"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{path}: unreadable ({e})", f"remove {path} to start the run over, or choose another run_dir"
            ) from e
        if owner != recipe_name:
            raise UserError(
                f"run_dir {run_dir} belongs to recipe '{owner}' ({data.get('recipe_path')}), not '{recipe_name}'",
                "give this recipe its own run_dir, or remove that folder to reuse it",
            )
        return cls(path, owner, data.get("recipe_path", str(recipe_path)), stages, data.get("hashes", {}))

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "version": STATE_VERSION,
                "recipe_name": self.recipe_name,
                "recipe_path": self.recipe_path,
                "stages": {k: vars(v) for k, v in self.stages.items()},
                "hashes": self.hashes,
            },
        )

    def hash_of(self, path: Path) -> str:
        return content_hash(path, self.hashes)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def output_path(self, name: str) -> Path:
        """An output as recorded: relative to the run directory, so a moved run still finds it."""
        return self.run_dir / name

    def done_and_intact(self, stage: str, fp: str) -> bool:
        """The stage finished with this fingerprint and its outputs are as it left them."""
        rec = self.stages.get(stage)
        if rec is None or rec.status != "done" or rec.fingerprint != fp:
            return False
        return all(self.hash_of(self.output_path(p)) == h for p, h in rec.outputs.items())

    def started(self, stage: str, fp: str) -> None:
        self.stages[stage] = StageRecord(fp, "running")
        self.save()

    def finished(
        self, stage: str, fp: str, outputs: list[Path], wall_s: float, figures: dict[str, Any]
    ) -> None:
        hashes = {str(p.relative_to(self.run_dir)): self.hash_of(p) for p in outputs}
        self.stages[stage] = StageRecord(fp, "done", hashes, round(wall_s, 2), figures)
        self.save()

    def in_flight(self, stage: str, fp: str) -> bool:
        """A run was killed in this stage with these same settings and inputs: resume it."""
        rec = self.stages.get(stage)
        return rec is not None and rec.status == "running" and rec.fingerprint == fp

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self.save()


def relative_settings(settings: Any, roots: dict[str, str]) -> Any:
    """Settings with the paths under `roots` (folder -> name, e.g. the run directory -> RUN)
    written by name, so a moved or re-cloned project keeps its fingerprints. The first root a
    path is under wins: give the deepest first."""
    if isinstance(settings, dict):
        return {k: relative_settings(v, roots) for k, v in settings.items()}
    if isinstance(settings, list):
        return [relative_settings(v, roots) for v in settings]
    if isinstance(settings, str):
        for folder, name in roots.items():
            if folder and folder in settings:
                return settings.replace(folder, name)
    return settings


def remove_tree(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        os.remove(path)
