"""The import graph points one way: cli → server → connection → manager → pipeline → model.

Each module has a layer; it may import only modules of its own or lower layers.
The request shape and the wire contract stay torch-free, so that the command
line starts fast and validates without loading a model.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "acestep_daemon"

LAYERS = {
    "__init__": 0,
    "constants": 0,
    "family": 0,
    "errors": 0,
    "params": 0,
    "options": 0,
    "paths": 0,
    "sdnotify": 0,
    "client": 0,
    "units": 0,
    "protocol": 1,
    "jobqueue": 1,
    "model": 1,
    "audio": 2,
    "text": 2,
    "checkpoint": 2,
    "adapters": 2,
    "tiny": 3,
    "planner": 3,
    "pipeline": 4,
    "memory": 5,
    "faults": 5,
    "manager": 6,
    "front": 6,
    "connection": 7,
    "queue_worker": 7,
    "server": 8,
    "cli": 9,
    "__main__": 10,
}


def _unit(path: Path) -> str:
    """The layer name of a module file: its top-level module or sub-package."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level acestep_daemon units a module imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level == 1 and path.parent != PACKAGE:
                continue  # a relative import inside a sub-package
            names = [node.module] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if not node.module.startswith("acestep_daemon"):
                continue
            rest = node.module.removeprefix("acestep_daemon").lstrip(".")
            names = [rest] if rest else [a.name for a in node.names]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name)
    return {name if name in LAYERS else "__init__" for name in found}  # e.g. __version__


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_unit(p) for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    unit = _unit(path)
    upward = {name for name in _imports(path) if LAYERS[name] > LAYERS[unit]}
    assert not upward, f"{unit} (layer {LAYERS[unit]}) imports {upward}"


def test_command_line_and_request_shape_do_not_load_torch():
    code = (
        "import sys; import acestep_daemon.cli, acestep_daemon.params, acestep_daemon.protocol; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


SERVING = {"server", "connection", "manager"}
"""The daemon's own layers: `acestep generate` answers without them."""


def test_generate_does_not_import_the_daemon_layers():
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    generate = next(
        n for n in ast.walk(cli) if isinstance(n, ast.FunctionDef) and n.name == "cmd_generate"
    )
    imported = {
        node.module or "" for node in ast.walk(generate) if isinstance(node, ast.ImportFrom)
    } | {
        alias.name
        for node in ast.walk(generate)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert not imported & (SERVING | {f"acestep_daemon.{name}" for name in SERVING})


def test_a_generate_run_loads_none_of_the_daemon_layers(tiny_checkpoint: Path, tmp_path: Path):
    """The whole path (pipeline, writing, the answer line) in a fresh process."""
    args = ["generate", "--model-dir", str(tiny_checkpoint), "-c", "t", "-d", "1"]
    args += ["-o", str(tmp_path / "t.wav")]
    code = (
        "import json, sys; from acestep_daemon.cli import main; "
        f"code = main({args!r}); "
        "names = [m for m in sys.modules if m.startswith('acestep_daemon.')]; "
        "print(json.dumps(names), file=sys.stderr); raise SystemExit(code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
    loaded = {name.split(".")[1] for name in json.loads(result.stderr.splitlines()[-1])}
    assert "pipeline" in loaded and not loaded & SERVING
