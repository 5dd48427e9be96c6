"""dvc.yaml's stages list, as deps, the library code that determines their outputs: DVC reruns a stage only when
a dep changes, so a module missing from them is an edit that leaves stale results in place, silently."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Where each `vgg <command>` of a stage enters the code (the command's own body in pipelines/cli.py only parses).
ENTRY = {"synth": "vgg/data/synthetic.py", "ingest": "vgg/data/ingest.py", "train": "pipelines/ray_train.py",
         "evaluate": "pipelines/evaluation.py", "fuse": "vgg/evaluate/results.py", "report": "vgg/report.py"}
# Modules that cannot change a result: error types, file writing, package markers.
NO_RESULT = {"vgg/__init__.py", "vgg/errors.py", "vgg/files.py", "vgg/data/__init__.py", "vgg/evaluate/__init__.py",
             "vgg/models/__init__.py", "vgg/train/__init__.py"}


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def library_closure(entry: Path) -> set[str]:
    """The `vgg/` modules `entry` imports, directly or through others (read from the sources, nothing imported)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            todo += [found for name in names if name.split(".")[0] == "vgg" and (found := _module_file(name))]
    return {str(path.relative_to(ROOT)) for path in seen if path.relative_to(ROOT).parts[0] == "vgg"}


def _stages() -> list[tuple[str, str, list[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [(name, (entry.get("do", entry))["cmd"].split()[1], (entry.get("do", entry)).get("deps", []))
            for name, entry in stages.items()]


@pytest.mark.parametrize("stage, command, deps", _stages(), ids=[name for name, _, _ in _stages()])
def test_every_stage_depends_on_the_library_code_that_makes_its_outputs(stage, command, deps):
    covered = [dep for dep in deps if isinstance(dep, str)]
    missing = sorted(module for module in library_closure(ROOT / ENTRY[command]) - NO_RESULT
                     if not any(module == dep or module.startswith(dep.rstrip("/") + "/") for dep in covered))
    assert not missing, f"dvc.yaml stage {stage}: add {missing} to its deps (an edit there would not rerun it)"


def test_the_closure_follows_imports_through_other_modules():
    closure = library_closure(ROOT / ENTRY["evaluate"])
    assert "vgg/evaluate/dense.py" in closure and "vgg/models/vgg.py" in closure  # via posteriors.py, vgg.models
