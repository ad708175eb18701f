"""End to end: `mlxterp repl` in a real terminal (tmux on a private server socket), starting
its own daemon in a private runtime directory; keys typed with send-keys, answers read off
the screen with capture-pane."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxterp_repl import client as daemon_client
from mlxterp_repl import paths as daemon_files

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

SERVER = f"mlxterp-test-{os.getpid()}"
LONG_TEXT = "Paris is the capital of France. " * 28


def tmux(*args: str) -> str:
    done = subprocess.run(["tmux", "-L", SERVER, "-f", "/dev/null", *args], capture_output=True, text=True,
                          timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr}")
    return done.stdout


def screen() -> str:
    return tmux("capture-pane", "-p", "-S", "-1000", "-t", "repl")  # with the scrollback


def wait_for(text: str, timeout: float = 20.0, after: str | None = None) -> str:
    """Poll the screen until `text` shows (below the last `after`, when given)."""
    deadline = time.monotonic() + timeout
    shown = ""
    while time.monotonic() < deadline:
        shown = screen()
        part = shown.rsplit(after, 1)[-1] if after and after in shown else ("" if after else shown)
        if text in part:
            return part
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared on the screen:\n{shown}")


def keys(*sequence: str) -> None:
    tmux("send-keys", "-t", "repl", *sequence)


def type_text(text: str) -> None:
    tmux("send-keys", "-t", "repl", "-l", text)


@pytest.fixture
def repl(tmp_path):
    runtime = tmp_path / "rt"
    env = {"MLXTERP_RUNTIME_DIR": str(runtime), "MLXTERP_HISTORY": str(tmp_path / "history"), "PAGER": "cat",
           "TERM": "xterm-256color", "HOME": str(tmp_path)}
    command = ("env -u MLXTERP_SOCKET " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
               + f" {shlex.quote(sys.executable)} -m mlxterp_repl.cli repl; echo REPL-EXITED $?; sleep 60")
    tmux("new-session", "-d", "-s", "repl", "-x", "80", "-y", "30", "-c", os.getcwd(), command)
    files = daemon_files.daemon_paths(runtime)
    server_socket = tmux("display-message", "-p", "#{socket_path}").strip()
    try:
        yield files
    finally:
        try:
            tmux("kill-server")
        except RuntimeError:
            pass
        if server_socket:
            Path(server_socket).unlink(missing_ok=True)
        try:
            with daemon_client.connect(runtime_dir=runtime, autostart=False) as client:
                client.shutdown()
        except (daemon_client.DaemonNotRunning, ConnectionError):
            pass
        deadline = time.monotonic() + 10
        while daemon_files.daemon_alive(files) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_session_in_a_real_terminal(repl):
    # starting: the REPL starts the daemon and shows the model loading
    deadline, saw_loading = time.monotonic() + 60, False
    while time.monotonic() < deadline:
        shown = screen()
        saw_loading = saw_loading or "loading the model" in shown
        if "mlxterp>" in shown:
            break
        time.sleep(0.03)
    else:
        raise AssertionError(f"no prompt after 60 s:\n{screen()}")
    assert saw_loading
    assert "demo" in shown and "16 layers" in shown  # the banner and the bottom toolbar

    type_text('prompt "The capital of France is"')
    keys("Enter")
    wait_for("prompt set")

    # completion: the sub-modules of a layer, with their types beside them
    type_text("save layers.8.")
    time.sleep(0.3)
    keys("Tab")
    menu = wait_for("input_layernorm", after="save layers.8.")
    assert "self_attn" in menu and "mlp" in menu and "Attention" in menu
    keys("C-c")  # at the prompt: clears the line

    # a query, its answer read off the screen: the demo model knows the capital
    type_text("lens @ -1")
    keys("Enter")
    answer = wait_for("15 ", after="logit lens at position")
    assert "Paris" in answer

    # an error: underlined, with the suggestion, and the REPL stays
    type_text("save layers.8.mpl")
    keys("Enter")
    error = wait_for("valid here", after="save layers.8.mpl")
    assert "^^^" in error and "layers.8.mlp" in error

    # a long query (pasted: 40 statements), interrupted with Ctrl-C
    pasted = repl.runtime_dir.parent / "long.mlxq"
    pasted.write_text("\n".join(f'save layers.* in "{i}: {LONG_TEXT}"' for i in range(40)))
    tmux("load-buffer", "-b", "long", str(pasted))
    tmux("paste-buffer", "-p", "-d", "-b", "long", "-t", "repl")
    keys("Enter")
    wait_for("/40: ", timeout=10)  # a progress line (the first statement may be done before a look)
    started = time.monotonic()
    keys("C-c")
    wait_for("interrupted", timeout=10)
    assert time.monotonic() - started < 5.0  # the 40 statements take over 10 s
    type_text("tokens")
    keys("Enter")
    wait_for("France", after="interrupted")

    # leaving: Ctrl-D ends the REPL, the daemon keeps running. (Sent once the prompt is back:
    # while a query runs the terminal is in cooked mode, where Ctrl-D is the tty's end-of-file.)
    wait_for("mlxterp>", after="France")
    keys("C-d")
    wait_for("REPL-EXITED 0")
    with daemon_client.connect(runtime_dir=repl.runtime_dir, autostart=False) as client:
        assert client.ping()["pong"] is True


def test_progress_lines_leave_no_trace_and_the_toolbar_shows_both_memories(repl):
    wait_for("mlxterp>", timeout=60)
    type_text('prompt "The capital of France is"')
    keys("Enter")
    wait_for("prompt set")
    # each shows a progress line while it runs: a plain query, a query two lines long, a query
    # wider than the screen, and a query typed ahead while another still runs (the terminal echoes it)
    type_text("lens @ -1 top 3")
    keys("Enter")
    wait_for("mlxterp>", after="logit lens at position")
    type_text("with layers.6 scale 1.0: \\")
    keys("Enter")  # after a trailing `\` the REPL continues the statement on the next line
    type_text("  lens @ -1 top 3")
    keys("Enter")
    wait_for("...    lens @ -1 top 3")  # the continued line, before its answer
    type_text(f'save layers.* in "{LONG_TEXT[:300]}"')
    keys("Enter")
    # each step waits for its own answer: a prompt matched too early would type the next one
    # into a running query
    wait_for("mlxterp>", after="positions of 'Paris")
    shown = screen()  # the statement typed ahead shows once, at its prompt: never echoed into an answer
    assert shown.count("logit lens at position") == 2 and shown.count('save layers.* in "Paris') == 1, shown
    pasted = repl.runtime_dir.parent / "many.mlxq"
    pasted.write_text("\n".join(f'save layers.* in "{i}: {LONG_TEXT}"' for i in range(20)))
    tmux("load-buffer", "-b", "many", str(pasted))
    tmux("paste-buffer", "-p", "-d", "-b", "many", "-t", "repl")
    keys("Enter")
    wait_for("/20: ", timeout=10)
    type_text("tokens")
    keys("Enter")
    wait_for("France", after="mlxterp> tokens")
    wait_for("│ daemon ready", after="mlxterp> tokens")  # the toolbar, drawn again
    shown = screen()
    assert "1/1:" not in shown and "1/2:" not in shown and "/20:" not in shown, shown
    toolbar = [line for line in shown.splitlines() if "│ daemon ready" in line][-1]
    assert "MB resident" in toolbar and "MB MLX" in toolbar, shown
