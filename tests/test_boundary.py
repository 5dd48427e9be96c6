"""The library stays pure: no module under vgg/ imports an edge."""

import ast
import subprocess
import sys
from pathlib import Path

EDGES = {"ray", "mlflow", "dvc", "typer", "yaml", "pipelines"}
LIBRARY = Path(__file__).resolve().parents[1] / "vgg"


def edge_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] in EDGES]
    return found


def test_library_imports_no_edge():
    modules = sorted(LIBRARY.rglob("*.py"))
    assert modules, "vgg/ has no modules"
    offenders = [hit for module in modules for hit in edge_imports(module)]
    assert offenders == []


def test_the_check_itself_catches_an_edge_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("import os\nfrom ray import train\nimport mlflow.pytorch\n")
    assert edge_imports(module) == ["bad.py:2 ray", "bad.py:3 mlflow.pytorch"]


def test_reading_and_fusing_posteriors_does_not_import_torch():
    # `vgg fuse` and `vgg report` (6 of the protocol's processes) only average and tabulate posteriors: importing
    # torch would add ~2.5 s to each on 2 cores. A fresh interpreter, so no other test's imports count.
    script = ("import sys, vgg.evaluate.metrics, vgg.evaluate.results, vgg.report\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=LIBRARY.parent)


def test_ingest_does_not_import_torch():
    # `vgg ingest` spawns a process per core, each importing vgg.data.ingest and the shard format it shares with the
    # loaders: importing torch would cost each of them its import time and ~0.5 GB. A fresh interpreter.
    script = ("import sys, vgg.data.ingest, vgg.data.shard_format\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=LIBRARY.parent)
