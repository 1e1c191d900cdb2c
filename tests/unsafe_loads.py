"""Find loads that can run code from a file (pickle and friends) in the project's source, with `ast`.

Shards, checkpoints of unknown origin and MLflow artifacts are never unpickled: weights are
safetensors, tables are JSON or Parquet, and `torch.load` reads with `weights_only=True`. The
few calls that must stay are listed in ALLOWED with the reason; the tests fail on any other.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("model", "pipelines", "jobs", "benchmarks")

# module -> functions of it that unpickle (or run code) whatever their arguments
ALWAYS_UNSAFE = {
    "pickle": {"load", "loads", "Unpickler"},
    "_pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads", "Unpickler"},
    "cloudpickle": {"load", "loads"},
    "dill": {"load", "loads"},
    "joblib": {"load"},
    "marshal": {"load", "loads"},
    "shelve": {"open"},
    "yaml": {"unsafe_load", "full_load", "unsafe_load_all", "full_load_all"},
    "pandas": {"read_pickle"},
    "mlflow.pytorch": {"load_model"},
    "mlflow.sklearn": {"load_model"},
    "mlflow.pyfunc": {"load_model"},
    "torch.jit": {"load"},
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}

# (file, call) -> why it stays. A DeepSpeed ZeRO-0 checkpoint is DeepSpeed's own pickle: its
# engine.load_checkpoint (TorchCheckpointEngine.load) and zero_to_fp32 read it with
# weights_only=False too, on every resume. It is only ever a checkpoint this pipeline's train
# stage wrote itself, under its own storage root, never a downloaded or user-given file
# (train.init_from takes a safetensors model folder).
ALLOWED = {
    ("pipelines/training/engine.py", "torch.load"): "DeepSpeed's own ZeRO-0 model states, written by "
    "this train stage; DeepSpeed 0.19's loader unpickles the same file on resume",
    ("pipelines/compression/registry.py", "mlflow.pyfunc.load_model"): "loads the model this process "
    "has just logged (models from code: our pyfunc.py, safetensors/ONNX weights, nothing pickled)",
}


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    call: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.call} ({self.why})"


def dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`np.load` -> `numpy.load`, through the module's imports."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def import_aliases(tree: ast.AST) -> dict[str, str]:
    aliases = {"np": "numpy", "pd": "pandas"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                aliases[name.asname or name.name.split(".")[0]] = name.name if name.asname else name.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for name in node.names:
                aliases[name.asname or name.name] = f"{node.module}.{name.name}"
    return aliases


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_reason(name: str, call: ast.Call) -> str | None:
    """Why this call can unpickle, or None when it cannot."""
    module, _, func = name.rpartition(".")
    if func in ALWAYS_UNSAFE.get(module, ()):
        return "unpickles or runs code from the file"
    if name == "torch.load" and not is_true(keyword(call, "weights_only")):
        return "torch.load without weights_only=True"
    if name in ("numpy.load", "numpy.lib.npyio.load") and is_true(keyword(call, "allow_pickle")):
        return "numpy load with allow_pickle=True"
    if name in ("yaml.load", "yaml.load_all"):
        loader = keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        loader_name = loader.attr if isinstance(loader, ast.Attribute) else getattr(loader, "id", None)
        if loader_name not in SAFE_YAML_LOADERS:
            return "yaml.load without a safe Loader"
    return None


def scan_file(path: Path, root: Path = ROOT) -> list[Hit]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases = import_aliases(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func, aliases)
            why = name and unsafe_reason(name, node)
            if why:
                hits.append(Hit(path.relative_to(root).as_posix(), node.lineno, name, why))
    return hits


def scan(root: Path = ROOT, folders: tuple[str, ...] = SCANNED) -> tuple[list[Hit], list[Hit]]:
    """(unsafe calls not allowed, allowed ones) in the project's code."""
    files = [path for folder in folders for path in sorted((root / folder).rglob("*.py"))]
    hits = [hit for path in files for hit in scan_file(path, root)]
    allowed = [h for h in hits if (h.path, h.call) in ALLOWED]
    return [h for h in hits if (h.path, h.call) not in ALLOWED], allowed
