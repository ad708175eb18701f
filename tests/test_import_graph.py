"""Layers point one way: mlxterp.core <- mlxterp <- mlxterp_repl.dsl <- protocol / daemon /
client <- REPL / CLI / language server (docs: /DESIGN.md, "Layers, and who may import whom").

Every module's imports are read with `ast` -- those inside functions too, since a lazy
import is still an edge -- and no edge may point up. The language server must never load
mlx: checked statically (through everything its modules import when they are imported)
and in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mlxterp", "mlxterp_repl", "mlxterp_lsp")

# The transport and the front ends, above the query language.
DAEMON_LAYER = ("mlxterp_repl.protocol", "mlxterp_repl.daemon", "mlxterp_repl.ops", "mlxterp_repl.client",
                "mlxterp_repl.spawn", "mlxterp_repl.sharded")
FRONT_ENDS = ("mlxterp_repl.repl", "mlxterp_repl.cli", "mlxterp_repl.commands", "mlxterp_repl.runner", "mlxterp_repl.notebook",
              "mlxterp_lsp")


@dataclass(frozen=True)
class Edge:
    source: str        # importing module
    target: str        # imported module (absolute)
    line: int
    lazy: bool         # inside a function: runs when called, not when the module is imported

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}{', in a function' if self.lazy else ''})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


MODULES = our_modules()


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports_of(name: str, path: Path) -> list[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []

    def visit(node, lazy: bool, type_only: bool):
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            child_type_only = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import) and not type_only:
                edges.extend(Edge(name, alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not type_only:
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                edges.append(Edge(name, target, child.lineno, lazy))
                for alias in child.names:  # `from package import module`
                    if f"{target}.{alias.name}" in MODULES:
                        edges.append(Edge(name, f"{target}.{alias.name}", child.lineno, lazy))
            visit(child, child_lazy, child_type_only)

    visit(tree, False, False)
    return edges


EDGES = [edge for name, path in MODULES.items() for edge in imports_of(name, path)]


def upward(sources: tuple[str, ...], forbidden, edges=EDGES) -> list[str]:
    """The edges from modules under `sources` whose target `forbidden(target)` refuses."""
    return [str(e) for e in edges if any(within(e.source, s) for s in sources) and forbidden(e.target)]


def under(*prefixes: str):
    return lambda target: any(within(target, p) for p in prefixes)


# --- the rules ---------------------------------------------------------------------

def test_the_module_list_is_read():
    assert {"mlxterp", "mlxterp_repl.dsl.parser", "mlxterp_repl.client", "mlxterp_lsp.server"} <= set(MODULES)
    assert any(e.source == "mlxterp_repl.client" and e.target == "mlxterp_repl.protocol" for e in EDGES)
    assert any(e.lazy for e in EDGES)  # imports inside functions are seen


def test_the_core_imports_the_standard_library_only():
    assert "mlxterp.core" in MODULES, "mlxterp/core/ is missing"

    def not_stdlib(target: str) -> bool:
        top = target.split(".")[0]
        return not within(target, "mlxterp.core") and top not in sys.stdlib_module_names

    assert upward(("mlxterp.core",), not_stdlib) == []


def test_the_library_never_imports_the_front_ends():
    assert upward(("mlxterp",), under("mlxterp_repl", "mlxterp_lsp")) == []


def test_the_query_language_never_imports_the_daemon_its_clients_or_the_front_ends():
    assert upward(("mlxterp_repl.dsl",), under(*DAEMON_LAYER, *FRONT_ENDS)) == []


def test_protocol_daemon_and_clients_never_import_the_front_ends():
    assert upward(DAEMON_LAYER, under(*FRONT_ENDS)) == []


def test_the_protocol_imports_nothing_of_mlxterp():
    assert upward(("mlxterp_repl.protocol",), under(*PACKAGES, "mlx", "mlx_lm")) == []


def test_the_language_server_never_imports_mlx_directly():
    assert upward(("mlxterp_lsp",), under("mlx", "mlx_lm")) == []


def loaded_by(start: list[str]) -> dict[str, Edge | None]:
    """Every module of ours that importing `start` loads (module-level imports, parent
    packages included), or that a function of `start` imports; with the edge that brought it."""
    seen: dict[str, Edge | None] = {}
    todo = [(name, None) for name in start]
    by_source: dict[str, list[Edge]] = {}
    for edge in EDGES:
        by_source.setdefault(edge.source, []).append(edge)
    while todo:
        name, via = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            module = ".".join(parts[:depth])
            if module in seen:
                continue
            seen[module] = via
            for edge in by_source.get(module, []):
                if not edge.lazy or module in start:
                    todo.append((edge.target, edge))
    return seen


def test_nothing_the_language_server_imports_imports_mlx():
    lsp = [name for name in MODULES if within(name, "mlxterp_lsp")]
    loaded = loaded_by(lsp)
    offenders = []
    for module, via in loaded.items():
        if within(module, "mlx") or within(module, "mlx_lm"):
            chain = []
            while via is not None:
                chain.append(str(via))
                via = loaded.get(via.source)
            offenders.append(" <- ".join(chain))
    assert offenders == []


def test_importing_the_language_server_leaves_mlx_unloaded():
    code = ("import sys; import mlxterp_lsp.server; "
            "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["mlxterp.core", "mlxterp.errors", "mlxterp_repl.protocol", "mlxterp_repl.client"])
def test_light_modules_import_without_mlx(module):
    code = f"import sys; import {module}; print('mlx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_closure_finds_mlx_where_it_is_imported():
    # what these checks rest on: a module importing mlx at the top, and one doing it in a function
    assert "mlx" in loaded_by(["mlxterp.model"]) or "mlx.core" in loaded_by(["mlxterp.model"])
    assert "mlx.core" in loaded_by(["mlxterp_repl.sharded"])
    assert "mlx.core" not in loaded_by(["mlxterp_repl.protocol"])
