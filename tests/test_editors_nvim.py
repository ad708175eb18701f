"""The Neovim plugin in editors/nvim, driven for real: `nvim --headless` with the plugin on a
.mlxq file, `mlxterp lsp` as its language server and a daemon with the demo model in a
private runtime directory. Needs `nvim` (Debian's 0.7.2 is enough; .ci/run installs it):
the test FAILS, not skips, without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_support import daemon_env, start_daemon

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "editors" / "nvim"
DRIVER = Path(__file__).with_name("nvim_driver.lua")
MLXTERP = Path(sys.executable).with_name("mlxterp")

SOURCE = """prompt "The capital of France is"
save layers.8.mlpp @ -1
save layers.8.
save layers.8 @ -1
"""

PYTHON_SOURCE = """with model.trace("The capital of France is") as trace:
    x = trace.activations["layrs.8"]
    y = trace.activations["layers.8.
"""


def nvim() -> str:
    path = shutil.which("nvim")
    if path is None:
        pytest.fail("the Neovim plugin test needs `nvim` on PATH (apt-get install neovim; .ci/run does it)")
    return path


@pytest.fixture
def daemon(tmp_path):
    running = start_daemon(tmp_path / "rt", model="demo")
    yield running
    running.stop()


def drive(tmp_path: Path, daemon) -> dict:
    source = tmp_path / "query.mlxq"
    source.write_text(SOURCE)
    python_file = tmp_path / "analysis.py"
    python_file.write_text(PYTHON_SOURCE)
    out = tmp_path / "out.json"
    env = daemon_env(daemon.files.runtime_dir)
    env.update(MLXQ_PLUGIN=str(PLUGIN), MLXQ_FILE=str(source), MLXQ_PY_FILE=str(python_file), MLXQ_OUT=str(out),
               MLXQ_CMD=json.dumps([str(MLXTERP), "lsp"]), MLXQ_STATUS_CMD=json.dumps([str(MLXTERP), "status"]),
               MLXQ_RUNTIME_DIR=str(daemon.files.runtime_dir), HOME=str(tmp_path))  # HOME: a private :LspLog
    done = subprocess.run([nvim(), "--headless", "--clean", "-u", "NONE", "-c", f"luafile {DRIVER}"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert out.exists(), f"nvim wrote nothing (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    seen = json.loads(out.read_text())
    assert "error" not in seen, f"{seen['error']}\nsteps done: {seen['steps']}\n{done.stderr}\n{daemon.log()[-2000:]}"
    return seen


def at_lines(shown: list[dict]) -> dict[int, dict]:
    return {result["line"]: result for result in shown}


def test_neovim_plugin_against_a_real_daemon(tmp_path, daemon):
    seen = drive(tmp_path, daemon)
    assert seen["filetype"] == "mlxq"
    assert seen["omnifunc"] == "v:lua.vim.lsp.omnifunc"

    # the misspelt module, on its line, with the closest real name suggested
    misspelt = [d for d in seen["diagnostics"] if "mlpp" in d["message"]]
    assert [d["line"] for d in misspelt] == [1]
    assert "mlp" in misspelt[0]["message"].replace("mlpp", "")

    # completion after `layers.8.`: the children of a decoder layer
    assert {"mlp", "self_attn"} <= set(seen["completion"]), seen["completion"]

    # running line 4 (after the prompt above it) draws its result at the end of that line
    shown = at_lines(seen["after_run"])
    assert set(shown) == {0, 3}
    assert shown[0]["text"].startswith("prompt")
    result = shown[3]
    assert result["group"] == "MlxqResult" and result["text"].strip() and len(result["text"]) <= 40
    assert "norm" in result["text"] and not result["text"].startswith("(stale)")

    # a line inserted above moves it down, still fresh; editing its line dims it, and only it
    moved = at_lines(seen["after_insert"])
    assert set(moved) == {1, 4}
    assert (moved[4]["group"], moved[4]["text"]) == ("MlxqResult", result["text"])
    edited = at_lines(seen["after_edit"])
    assert edited[4]["group"] == "MlxqResultStale" and edited[4]["text"].startswith("(stale)")
    assert edited[1]["group"] == "MlxqResult"

    # :MlxqRunFile's error says which line of the file it is on (the third)
    [note] = [n for n in seen["run_file_notes"] if "Germany" in n]
    assert note.startswith("mlxq: line 3: no token of the input matches 'Germany'"), note

    ran = at_lines(seen["after_run_file"])
    assert set(ran) == {0, 1, 3} and {r["group"] for r in ran.values()} == {"MlxqResult"}

    assert "mlp" in seen["hover"].lower() and "save layers.8.mlp @ -1" in seen["hover"], seen["hover"]

    # the Python buffer: the same server, only inside mlxterp names
    assert seen["py_filetype"] == "python"
    [unknown] = seen["py_diagnostics"]
    assert unknown["line"] == 1 and "layrs.8" in unknown["message"] and "layers.8" in unknown["message"]
    assert PYTHON_SOURCE.split("\n")[1][unknown["col"]:unknown["end_col"]] == "layrs.8"
    assert {"mlp", "self_attn"} <= set(seen["py_completion"]), seen["py_completion"]

    status = seen["status"]  # the plugin's own line first; then `mlxterp status`
    assert f"daemon pid {daemon.proc.pid}, connected" in status[0], status


def test_help_file_has_a_tag_for_every_command(tmp_path):
    plugin = tmp_path / "nvim"
    shutil.copytree(PLUGIN, plugin)
    out = tmp_path / "help.txt"
    script = tmp_path / "help.lua"
    script.write_text(f"""
vim.opt.runtimepath:prepend({json.dumps(str(plugin))})
vim.cmd("helptags " .. {json.dumps(str(plugin / "doc"))})
local found = {{}}
for _, tag in ipairs({{"mlxq.txt", ":MlxqRun", ":MlxqRunFile", ":MlxqStatus", "mlxq-results"}}) do
  local ok = pcall(vim.cmd, "help " .. tag)
  table.insert(found, tag .. "=" .. tostring(ok and vim.fn.expand("%:t") == "mlxq.txt"))
end
vim.fn.writefile(found, {json.dumps(str(out))})
vim.cmd("qa!")
""")
    subprocess.run([nvim(), "--headless", "--clean", "-u", "NONE", "-c", f"luafile {script}"], timeout=30,
                   capture_output=True, stdin=subprocess.DEVNULL, env=dict(os.environ, HOME=str(tmp_path)))
    assert out.read_text().split() == [f"{tag}=true" for tag in
                                      ("mlxq.txt", ":MlxqRun", ":MlxqRunFile", ":MlxqStatus", "mlxq-results")]
