"""model/ stands alone: anyone can use it without the pipeline."""

from __future__ import annotations

import ast

from tests.conftest import REPO


def test_model_package_imports_no_pipeline_machinery():
    """model/ is pure PyTorch: usable without Ray, MLflow, DeepSpeed or our pipelines."""
    forbidden = {"ray", "mlflow", "deepspeed", "pipelines", "jobs"}
    for path in (REPO / "model").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path} imports {names}"
