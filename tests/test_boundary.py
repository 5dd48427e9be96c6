"""The library stays pure (DESIGN.md §1): no module under vgg/ imports an edge."""

import ast
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
