"""The notebook magics with a real Jupyter kernel: docs/notebook-example.ipynb executed end to
end by nbclient (results as tables, Python access, a bound numpy array, a plot, an error drawn
as in the REPL, `--local`), and the interrupt button stopping a long query in the daemon.

The kernel talks to a real daemon on a private runtime directory (never the user's)."""

from __future__ import annotations

import json
import os
import queue
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from daemon_support import start_daemon
from mlxterp_repl.client import connect

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebook-example.ipynb"
DEMO_CONFIG = json.loads((REPO / "mlxterp" / "assets" / "demo" / "config.json").read_text())


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nb-rt")
    daemon = start_daemon(directory, model="demo")
    with connect(runtime_dir=directory, autostart=False) as client:
        client.modules()  # the model is loaded before any kernel asks
    saved = os.environ.get("MLXTERP_RUNTIME_DIR")
    os.environ["MLXTERP_RUNTIME_DIR"] = str(directory)  # kernels inherit it
    yield directory
    if saved is None:
        os.environ.pop("MLXTERP_RUNTIME_DIR", None)
    else:
        os.environ["MLXTERP_RUNTIME_DIR"] = saved
    daemon.stop()


@pytest.fixture(scope="module")
def cells(runtime_dir, tmp_path_factory):
    """The example notebook's code cells after one run, by tag."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path_factory.mktemp("nb-work")
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
                   ).execute()
    return {tag: cell for cell in notebook.cells if cell.cell_type == "code"
            for tag in cell.metadata.get("tags", [])}


def shown(cell, mime: str) -> list[str]:
    """What the cell displayed as `mime`, non-empty entries only."""
    return [o["data"][mime] for o in cell.outputs if o.output_type == "display_data" and o["data"].get(mime)]


def stream(cell, name: str = "stdout") -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)


def test_each_result_shows_as_an_html_table_and_as_text(cells):
    [prompt] = shown(cells["prompt"], "text/html")
    assert "<table" in prompt and "France" in prompt
    tables = shown(cells["save-and-lens"], "text/html")
    texts = shown(cells["save-and-lens"], "text/plain")
    assert len(tables) == 2 and all("<table" in t for t in tables)
    assert "$paris" in texts[0] and "layers.8" in texts[0]
    assert all(f">{layer}<" in tables[1] for layer in (12, 13, 14, 15))  # the lens rows of the layers asked for


def test_results_and_dollar_names_reach_python(cells):
    kind, shape, norm = stream(cells["python-access"]).split()
    assert kind == "LogitLens"
    assert shape == f"({DEMO_CONFIG['hidden_size']},)"
    assert float(norm) > 0


def test_a_bound_numpy_array_is_a_dollar_name_in_queries(cells):
    tables = shown(cells["bind"], "text/html")
    assert "$direction" in tables[0] and "$scaled" in tables[1]
    assert stream(cells["bind-check"]).strip() == "4.0"  # |4 * unit vector|, computed in the daemon


def test_a_plot_is_embedded_as_png(cells):
    [table] = shown(cells["plot"], "text/html")
    assert "<img src='data:image/png;base64," in table


def test_an_error_shows_the_line_underlined_and_what_is_valid(cells):
    text = stream(cells["error"], "stderr")
    lines = text.splitlines()
    assert "no module named 'layrs.8'" in lines[0]
    source = next(i for i, line in enumerate(lines) if line.endswith("| save layrs.8 @ -1"))
    marks = lines[source + 1]
    start = lines[source].index("layrs.8")
    assert marks[start:start + len("layrs.8")] == "^" * len("layrs.8") and marks[start - 1] == " "
    assert "valid here:" in text and "layers.8" in text.split("valid here:")[1]
    assert not [o for o in cells["error"].outputs if o.output_type == "error"]  # no traceback


def test_local_runs_in_the_kernel(cells):
    tables = shown(cells["local"], "text/html")
    assert len(tables) == 2 and "France" in tables[0]


def test_binding_a_bad_name_or_value_says_what_is_wrong(runtime_dir):
    import numpy as np

    from mlxterp_repl.client import DaemonError

    with connect(runtime_dir=runtime_dir, autostart=False) as daemon:
        with pytest.raises(DaemonError) as bad_name:
            daemon.bind("2 words", np.ones(3, np.float32))
        assert bad_name.value.code == "bad_request" and "not a $ name" in bad_name.value.message
        data = daemon.bind("ones", np.ones((2, 3), np.float16), "my ones")
        assert data["name"] == "ones" and data["arrays"][0]["label"] == "my ones"
        [result] = daemon.exec("let $twice = $ones * 2")
        assert result["arrays"][0]["array"].tolist() == [[2.0] * 3] * 2


# --- completion and interrupting in a live kernel -----------------------------------------

def execute(kernel, code: str, timeout: float = 60.0, on_message=None) -> tuple[dict, list[dict]]:
    """Run `code`; (execute_reply content, the iopub messages of it)."""
    msg_id = kernel.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = kernel.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            message = None
        if message is not None and message["parent_header"].get("msg_id") == msg_id:
            messages.append(message)
            if on_message is not None:
                on_message(message)
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return shell_reply(kernel, msg_id), messages
    raise AssertionError(f"no reply within {timeout} s; got {[m['msg_type'] for m in messages]}")


def shell_reply(kernel, msg_id: str) -> dict:
    reply = kernel.get_shell_msg(timeout=10)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kernel.get_shell_msg(timeout=10)
    return reply["content"]


def stderr_of(messages) -> str:
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")


def test_tab_completes_queries_and_interrupt_stops_a_long_one_and_the_session_goes_on(runtime_dir, tmp_path):
    manager, kernel = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        reply, _ = execute(kernel, '%load_ext mlxterp\n%mlxq prompt "The capital of France is"')
        assert reply["status"] == "ok"
        for code in ("%%mlxq\nsave layers.8.", "%mlxq save layers.8."):  # Tab in a cell, on a line
            completion = shell_reply(kernel, kernel.complete(code, len(code)))
            assert {"mlp", "self_attn"} <= set(completion["matches"]), completion
            assert completion["cursor_start"] == completion["cursor_end"] == len(code)
        code = '%mlxq save layers.8 @ "Fra'
        completion = shell_reply(kernel, kernel.complete(code, len(code)))
        assert completion["matches"] == ['"France"'] and completion["cursor_start"] == len(code) - 4
        long_query = "\n".join(f'lens @ -1 top 1 in "Country number {i} has a capital"' for i in range(400))
        progress, interrupted_at = [], []

        def on_message(message):
            if message["msg_type"] in ("display_data", "update_display_data"):
                text = message["content"]["data"].get("text/plain", "")
                if text:
                    progress.append(text)
                if len(progress) == 3 and not interrupted_at:  # a few statements in: press the button
                    interrupted_at.append(time.monotonic())
                    manager.interrupt_kernel()

        reply, messages = execute(kernel, "%%mlxq\n" + long_query, on_message=on_message)
        stopped = time.monotonic() - interrupted_at[0]
        assert progress[0].startswith("1/400: lens")  # the progress line, updated in place
        assert any(m["msg_type"] == "update_display_data" for m in messages)
        assert reply["status"] == "error" and "interrupted" in stderr_of(messages), (reply, stderr_of(messages), stopped)
        assert stopped < 5, f"the query went on for {stopped:.1f} s after the interrupt"
        reply, messages = execute(kernel, '%mlxq save layers.2 @ "France" as $x\nprint(mlxq.vars["x"].shape)')
        assert reply["status"] == "ok", stderr_of(messages)
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)
