"""Run the Python code blocks of a docs page, in order, in one namespace (as a reader would)."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((DOCS / page).read_text())


def run_page(page: str, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    for number, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{page}[block {number}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page} block {number} failed: {type(exc).__name__}: {exc}\n{code}") from exc
    return namespace
