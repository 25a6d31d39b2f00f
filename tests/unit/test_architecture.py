"""The codebase's shape, checked: docs/architecture.md maps every module of the package (and nothing else), no
module is over 400 lines, no class over 25 methods, and the worker imports nothing of the router."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "serverless_vllm"
MAX_LINES = 400
MAX_METHODS = 25


def _modules() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}


def test_the_module_map_names_every_module_and_no_other() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    mapped = set(re.findall(r"^\| `([a-z0-9_/]+\.py)` \|", text, re.M))
    assert mapped == _modules(), {"missing from the map": _modules() - mapped, "not modules": mapped - _modules()}


def test_modules_are_small_and_classes_have_few_methods() -> None:
    too_long = {m: n for m in _modules() if (n := len((PACKAGE / m).read_text().splitlines())) > MAX_LINES}
    assert too_long == {}
    too_wide = {}
    for module in _modules():
        for node in ast.walk(ast.parse((PACKAGE / module).read_text())):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
                if len(methods) > MAX_METHODS:
                    too_wide[f"{module}:{node.name}"] = len(methods)
    assert too_wide == {}


def test_the_worker_imports_nothing_of_the_router() -> None:
    offenders = []
    for path in (PACKAGE / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "router" in node.module.split("."):
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module}")
    assert offenders == []
