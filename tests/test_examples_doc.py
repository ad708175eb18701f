"""Every python block of the example pages runs, in order, on the demo model.

docs/examples.md mirrors the user guide; docs/interventions.md and
docs/analysis.md are the library's own pages. Blocks of one page share a
namespace, as a reader running them one after another would.
"""

import re
import tempfile
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page):
    text = (DOCS / page).read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text[:match.start()].count("\n") + 2
        blocks.append((line, match.group(1)))
    return blocks


def run_page(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # plots land in tmp_path
    namespace = {"__name__": "__docs__"}
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    for line, code in blocks:
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"the block at {page} line {line} failed:\n{code}\n{traceback.format_exc()}")
    return namespace


def test_interventions_page_runs(tmp_path, monkeypatch):
    namespace = run_page("interventions.md", tmp_path, monkeypatch)
    # the page's first block shows zeroing a layer changes the logits
    assert (abs(namespace["zeroed"] - namespace["plain"])).max().item() > 0


def test_analysis_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("analysis.md", tmp_path, monkeypatch)
    assert namespace["everything"]["layer_8"].shape[0] == 100
    printed = capsys.readouterr().out
    png = re.search(r"Saved the logit lens heatmap to (\S+\.png)", printed)
    assert png and Path(png.group(1)).stat().st_size > 1000


def test_examples_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("examples.md", tmp_path, monkeypatch)
    model = namespace["model"]
    assert namespace["activations"]["layer_3"].shape == (len(namespace["large_list"]), model.hidden_size)
    assert namespace["final_results"].shape == (1000, model.hidden_size)
