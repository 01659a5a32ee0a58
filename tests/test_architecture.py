"""The two-layer map holds: import-linter's contracts pass, and no alignkit import hides inside a function.

docs/architecture.md draws the layers; pyproject.toml's ``[tool.importlinter]`` states them as contracts.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignkit"
# importlib with a name that comes from the user (a ``module:function`` reward), not an alignkit module
DYNAMIC_IMPORT_ALLOWED = {"alignkit/rl/rewards.py"}


def _nested_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of an alignkit module that is not at module level."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith("alignkit")):
                found.append((inner.lineno, "." * inner.level + (inner.module or "")))
            elif isinstance(inner, ast.Import):
                found += [(inner.lineno, a.name) for a in inner.names if a.name.startswith("alignkit")]
    return sorted(set(found))


def _dynamic_imports(tree: ast.AST) -> list[int]:
    """Lines calling ``importlib.import_module`` (an import the graph cannot see)."""
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "import_module"]


def test_nested_import_detector_finds_what_it_should():
    src = "import os\nfrom alignkit import x\ndef f():\n    from alignkit.models import y\n    import json\n" \
          "class C:\n    def g(self):\n        from . import z\n"
    assert _nested_imports(ast.parse(src)) == [(4, "alignkit.models"), (8, ".")]


def test_no_alignkit_import_inside_a_function():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offenders += [f"{rel}:{line} imports {mod} inside a function or class" for line, mod in _nested_imports(tree)]
        if rel not in DYNAMIC_IMPORT_ALLOWED:
            offenders += [f"{rel}:{line} calls importlib.import_module" for line in _dynamic_imports(tree)]
    assert not offenders, "imports belong at the top of the file:\n" + "\n".join(offenders)


def test_import_contracts_hold():
    """``lint-imports`` (import-linter, run in the repository root: pyproject.toml's contracts): layers, no cycles."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout
