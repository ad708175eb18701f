"""Run the Python code blocks of a docs page, in order, in one namespace (as a reader would)."""

import re
import tempfile
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# Blocks that load a model from the hub or from the reader's own disk cannot run here.
NEEDS_THE_READERS_MODEL = ("mlx-community/", "./models/")


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(line number, code) of each python block of ``docs/page``."""
    text = (DOCS / page).read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def run_page(page: str, tmp_path, monkeypatch, blocks=None) -> dict:
    """Run the page's blocks (or the numbered ``blocks``) in ``tmp_path``; plots land there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": "__docs__"}
    found = python_blocks(page)
    assert found, f"{page} has no python blocks"
    chosen = found if blocks is None else [found[i] for i in blocks]
    for line, code in chosen:
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"the block at {page} line {line} failed:\n{code}\n{traceback.format_exc()}")
    return namespace


MLXQ_BLOCK = re.compile(r"^```mlxq\n(.*?)^```", re.S | re.M)


def mlxq_blocks(page: str) -> list[tuple[int, str]]:
    """(line number, text) of each query-language block of ``docs/page``."""
    text = (DOCS / page).read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in MLXQ_BLOCK.finditer(text)]


def run_mlxq_blocks(page: str, model) -> list:
    """Run each query-language block of the page as a script in a fresh session on ``model``;
    a statement that fails fails the test, naming its block. Returns every block's results."""
    from mlxterp_repl.dsl.errors import QueryError
    from mlxterp_repl.dsl.evaluator import Session

    found = mlxq_blocks(page)
    assert found, f"{page} has no mlxq blocks"
    results = []
    for line, text in found:
        try:
            results.append(Session(model).execute(text))
        except QueryError as error:
            pytest.fail(f"the mlxq block at {page} line {line} failed: {error}\n{text}")
    return results


def runnable_blocks(page: str) -> list[int]:
    return [i for i, (_, code) in enumerate(python_blocks(page))
            if not any(marker in code for marker in NEEDS_THE_READERS_MODEL)]
