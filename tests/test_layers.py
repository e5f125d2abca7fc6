"""The product's import layering, read from the source with `ast` (nothing is imported).

Product: every .py file under flashcheck/, kernels/, verify/, properties/,
reports/ and scripts/, except test modules (properties/test_*.py), test
support (properties/_support.py) and conftest.py. Imports are collected
wherever they appear (module level, inside functions, under ``try``),
absolute, relative, and ``importlib.import_module("...")`` with a literal.

Contracts:

(i)   the four subpackages depend one way: kernels <- properties <- verify
      and reports <- verify (kernels imports none of the others, properties
      only kernels, reports only kernels, verify any), so there is no cycle;
(ii)  no product module imports a test module: tests/*, conftest,
      properties.test_*, properties._support;
(iii) no product file touches ``sys.path``: source checkouts resolve
      ``flashcheck`` through flashcheck/__init__.py's ``__path__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("kernels", "properties", "verify", "reports")
PRODUCT_DIRS = ("flashcheck", *SUBPACKAGES, "scripts")

#: Subpackage -> the subpackages it may import (besides itself).
ALLOWED = {
    "kernels": set(),
    "properties": {"kernels"},
    "reports": {"kernels"},
    "verify": {"kernels", "properties", "reports"},
}

#: Edges that break (i) today and are being removed by refactors in flight
#: (verify/case.py moves to properties/case.py; kernels/bench_kernel.py stops
#: importing flashcheck.verify.bench). Each is (importing file, imported
#: module). Empty this after those merges: every other edge is enforced, and
#: a listed edge that no longer exists fails the test too, so the list
#: cannot go stale.
KNOWN_UNTIL_REFACTOR_LANDS: set = set()


def product_files() -> list[Path]:
    files = []
    for top in PRODUCT_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.name == "conftest.py":
                continue
            if rel.parts[0] == "properties" and (rel.name.startswith("test_") or rel.name == "_support.py"):
                continue
            files.append(path)
    return files


def _package_of(rel: Path) -> list[str]:
    """Dotted package of a product file: kernels/x.py -> flashcheck.kernels."""
    parts = list(rel.parts[:-1])
    if parts and parts[0] in SUBPACKAGES:
        return ["flashcheck", *parts]
    return parts  # flashcheck/..., scripts/...


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute dotted names of every module (or module attribute) the file
    at ``path`` (under the checkout ``root``) imports."""
    rel = path.relative_to(root)
    tree = ast.parse(path.read_text(), filename=str(rel))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(rel)
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from flashcheck.properties import _support` imports a module by name.
            found.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            found.add(node.args[0].value)
    return {_canonical(name) for name in found if name}


def _canonical(name: str) -> str:
    """Bare folder names (``verify.x``) are the same modules as ``flashcheck.verify.x``."""
    head = name.split(".")[0]
    return f"flashcheck.{name}" if head in SUBPACKAGES else name


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "flashcheck" and len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return None


def _is_test_module(module: str) -> bool:
    parts = module.split(".")
    if parts[0] == "flashcheck":
        parts = parts[1:]
    if not parts:
        return False
    if parts[0] in ("tests", "conftest") or parts[0].startswith("test_"):
        return True
    return parts[0] == "properties" and len(parts) > 1 and (parts[1].startswith("test_") or parts[1] == "_support")


def _edges():
    """(importing file, its subpackage or None, imported module) for every import."""
    for path in product_files():
        rel = path.relative_to(ROOT)
        own = rel.parts[0] if rel.parts[0] in SUBPACKAGES else None
        for module in sorted(imports_of(path)):
            yield rel.as_posix(), own, module


def test_product_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in product_files()}
    assert {"kernels/triton_flash.py", "verify/check.py", "scripts/fa3_rmse.py", "flashcheck/__init__.py"} <= names
    assert not any(n.startswith("properties/test_") or n.endswith("_support.py") for n in names)


def test_subpackages_depend_one_way():
    bad, used = [], set()
    for rel, own, module in _edges():
        target = _subpackage(module)
        if own is None or target is None or target == own or target in ALLOWED[own]:
            continue
        known = {(f, m) for f, m in KNOWN_UNTIL_REFACTOR_LANDS if f == rel and (module + ".").startswith(m + ".")}
        if known:  # the listed module or a name imported from it
            used |= known
            continue
        bad.append(f"{rel} imports {module} ({own} may import only {sorted(ALLOWED[own]) or 'none of the others'})")
    assert not bad, "layering broken:\n" + "\n".join(bad)
    stale = KNOWN_UNTIL_REFACTOR_LANDS - used
    assert not stale, f"fixed, remove from KNOWN_UNTIL_REFACTOR_LANDS: {sorted(stale)}"


def test_allowed_graph_has_no_cycle():
    # A guard on ALLOWED itself: the rule above is only a layering if it is acyclic.
    seen, done = set(), set()

    def visit(node, stack):
        assert node not in stack, f"cycle: {' -> '.join([*stack, node])}"
        if node in done:
            return
        for nxt in ALLOWED[node]:
            visit(nxt, [*stack, node])
        done.add(node)

    for pkg in ALLOWED:
        visit(pkg, [])
        seen.add(pkg)
    assert seen == set(SUBPACKAGES)


def test_product_imports_no_test_module():
    bad = [f"{rel} imports {module}" for rel, _, module in _edges() if _is_test_module(module)]
    assert not bad, "product code imports test code:\n" + "\n".join(bad)


def _touches_sys_path(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            return True
    return False


def test_product_never_touches_sys_path():
    bad = [p.relative_to(ROOT).as_posix() for p in product_files() if _touches_sys_path(ast.parse(p.read_text()))]
    assert not bad, f"sys.path used in {bad}"


def _imports_of_source(tmp_path, rel: str, source: str) -> set[str]:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return imports_of(path, root=tmp_path)


@pytest.mark.parametrize("source, expected", [
    ("from flashcheck.properties import _support", True),
    ("import tests.test_cli", True),
    ("import test_triton_flash", True),
    ("from flashcheck.properties.test_triton import _check", True),
    ("def f():\n    import conftest", True),
    ("from flashcheck.properties import strategies", False),
    ("from flashcheck.verify.check import judge", False),
])
def test_checker_recognises_test_imports(tmp_path, source, expected):
    names = _imports_of_source(tmp_path, "scripts/x.py", source)
    assert any(_is_test_module(n) for n in names) is expected, names


def test_checker_resolves_relative_and_lazy_imports(tmp_path):
    got = _imports_of_source(tmp_path, "verify/m.py", (
        "def f():\n    from .bounds import x\n    from ..kernels import precision\n"
        "    import importlib\n    importlib.import_module('flashcheck.reports.html')\n"
        "try:\n    from . import oracle\nexcept ImportError:\n    pass\n"))
    assert {"flashcheck.verify.bounds", "flashcheck.kernels.precision", "flashcheck.reports.html",
            "flashcheck.verify.oracle"} <= got
    assert not _touches_sys_path(ast.parse("import os\nos.path.join('a')"))
    assert _touches_sys_path(ast.parse("def f():\n    import sys\n    sys.path.insert(0, '.')"))
