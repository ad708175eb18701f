"""The edges of the command-line tools a new user meets first (issue 14, items 12-17): scripts
parsed whole before they run, `mlxterp lsp` in a terminal, `collect`'s prompt file, the REPL's
progress line and toolbar, and daemons started for you stopping by themselves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_support import daemon_env
from mlxterp_repl import paths as daemon_files


def mlxterp(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120,
            **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxterp_repl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


# --- item 13: scripts --------------------------------------------------------------

BROKEN = 'prompt "The capital of France is"\nexport $nothing to out.npz\nsav layers.8 @ -1\nlens @ -1\n'


def test_a_syntax_error_on_line_3_runs_nothing_and_names_line_3(tmp_path):
    (tmp_path / "broken.mlxq").write_text(BROKEN)
    done = mlxterp("run", "--local", "broken.mlxq", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""  # not even line 1's `prompt` ran
    assert done.stderr.startswith("line 3, column 1: 'sav' is not a statement"), done.stderr
    assert "  3 | sav layers.8 @ -1" in done.stderr

    as_json = mlxterp("run", "--local", "--json", "broken.mlxq", cwd=tmp_path)
    [record] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (record["line"], record["ok"], record["statement"]) == (3, False, "sav layers.8 @ -1")


def test_a_script_with_a_byte_order_mark_runs(tmp_path):
    (tmp_path / "bom.mlxq").write_bytes("\ufeffprompt \"The capital of France is\"\nlens @ -1 top 3\n".encode())
    done = mlxterp("run", "--local", "bom.mlxq", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1: prompt" in done.stdout and "Paris" in done.stdout


def test_run_local_loads_the_daemons_default_model(tmp_path):
    (tmp_path / "s.mlxq").write_text('prompt "The capital of France is"\ninfo\n')
    done = mlxterp("run", "--local", "s.mlxq", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "16 layers" in done.stdout  # the demo model, as `mlxterp run` without --local starts


def test_run_on_a_directory_says_it_is_one(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "tour.mlxq").write_text("tokens\n")
    done = mlxterp("run", "scripts", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mlxterp run: scripts is a directory; give a .mlxq script in it, such as {Path('scripts', 'tour.mlxq')}"]


# --- item 14: `mlxterp lsp` in a terminal --------------------------------------------

def read_until(fd: int, text: str, timeout: float) -> str:
    import select

    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the other end closed
                break
    return seen.decode(errors="replace")


def test_lsp_in_a_terminal_says_what_it_is_and_leaves_on_ctrl_c(tmp_path):
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mlxterp_repl.cli", "lsp"], stdin=follower, stdout=follower,
                            stderr=follower, cwd=tmp_path, start_new_session=True)
    os.close(follower)
    try:
        said = read_until(leader, "Ctrl-C", timeout=30)
        assert "speaking LSP on stdin/stdout" in said, said
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        said += read_until(leader, "never", timeout=0.5)
        assert "Traceback" not in said, said
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_lsp_log_file_in_a_missing_directory_is_a_one_line_error(tmp_path):
    done = mlxterp("lsp", "--log-file", str(tmp_path / "nowhere" / "lsp.log"), cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"mlxterp lsp: cannot write the log file {tmp_path / 'nowhere' / 'lsp.log'}: No such file or directory"]


# --- item 16: `mlxterp collect` -------------------------------------------------------

def test_collect_says_how_many_blank_lines_it_skipped_and_writes_layers_in_order(tmp_path):
    (tmp_path / "prompts.txt").write_text("The capital of France is\n\n   \nHello world\n\n")
    done = mlxterp("collect", "prompts.txt", "--layers", "0..11,layers.5.mlp", "--out", "acts", "--no-progress",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped 3 blank lines of prompts.txt" in done.stderr
    wanted = [f"layer_{i}" for i in range(12)] + ["layers.5.mlp"]
    assert list(json.loads((tmp_path / "acts" / "meta.json").read_text())["keys"]) == wanted
    assert f"2 prompts ({', '.join(wanted)})" in done.stdout


# --- item 17: a daemon started for you stops by itself ---------------------------------

def stop_daemon(files) -> None:
    pid = daemon_files.read_pid_file(files).get("pid")
    if pid:
        os.kill(pid, signal.SIGTERM)


def test_a_daemon_started_for_you_stops_after_30_idle_minutes_and_serve_never(tmp_path):
    from mlxterp_repl.client import connect

    env = daemon_env(tmp_path / "rt")
    env.pop("MLXTERP_IDLE_TIMEOUT", None)
    (tmp_path / "s.mlxq").write_text("tokens\n")
    files = daemon_files.daemon_paths(tmp_path / "rt")
    try:
        done = mlxterp("run", "s.mlxq", cwd=tmp_path, env=env)  # starts the daemon
        assert daemon_files.daemon_alive(files), done.stderr
        with connect(runtime_dir=tmp_path / "rt", autostart=False) as client:
            assert client.stats()["idle_timeout"] == 30 * 60
    finally:
        stop_daemon(files)

    # configurable: MLXTERP_IDLE_TIMEOUT in the environment of the client that starts it
    files = daemon_files.daemon_paths(tmp_path / "rt2")
    env = {**daemon_env(tmp_path / "rt2"), "MLXTERP_IDLE_TIMEOUT": "1"}
    try:
        mlxterp("run", "s.mlxq", cwd=tmp_path, env=env)
        deadline = time.monotonic() + 20
        while daemon_files.daemon_alive(files) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not daemon_files.daemon_alive(files), "the auto-started daemon outlived its 1 s idle timeout"
    finally:
        stop_daemon(files)

    # `mlxterp serve` keeps running unless given one
    from daemon_support import start_daemon

    served = start_daemon(tmp_path / "rt3")
    try:
        with connect(runtime_dir=tmp_path / "rt3", autostart=False) as client:
            assert client.stats()["idle_timeout"] is None
    finally:
        served.stop()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


MIXED = [
    'prompt "{text}"', "tokens", "save layers.8 @ -1", "lens @ -1 top 3", "predict layers.15 @ -1 top 3",
    "stats layers.0..3 @ -1", "save layers.*.mlp @ -1 as $m",     'patch mlp clean "{text}" corrupt "{other}" layers 4..6',
]


@pytest.mark.slow
def test_the_daemons_memory_stays_bounded_over_500_mixed_queries(tmp_path):
    from daemon_support import start_daemon
    from mlxterp_repl.client import connect

    served = start_daemon(tmp_path / "rt", "--cache-mb", "32")
    try:
        with connect(runtime_dir=tmp_path / "rt", autostart=False) as client:
            pid = client.hello["pid"]

            def query(number: int) -> None:
                text = f"The capital of France number {number % 97} is"  # new prompts keep the cache turning over
                code = MIXED[number % len(MIXED)].format(text=text, other=text.replace("France", "Italy"))
                client.exec(code)

            for number in range(100):  # warm: the cache fills to its budget, allocators settle
                query(number)
            warm = rss_bytes(pid)
            sizes = []
            for number in range(100, 500):
                query(number)
                if number % 100 == 99:
                    sizes.append(rss_bytes(pid))
            print(f"daemon RSS after 100 queries {warm / 1e6:.0f} MB, then every 100: "
                  + ", ".join(f"{size / 1e6:.0f}" for size in sizes))
            # Bounded by the budgets: the last 200 queries add little, whatever the first ones did.
            assert sizes[-1] - warm < 64e6, f"RSS grew {(sizes[-1] - warm) / 1e6:.0f} MB over 400 queries"
            assert sizes[-1] - sizes[1] < 16e6, f"RSS still grows: {[round(s / 1e6) for s in sizes]} MB"
    finally:
        served.stop()


# --- item 15: `patch` components -------------------------------------------------------

def test_patch_completion_offers_only_components_and_the_error_lists_layer_and_attn(demo_model):
    from mlxterp_repl.dsl import QueryError, Session, complete

    session = Session(demo_model)
    context = session.completion_context()
    offered = {c.label for c in complete("patch ", 6, context)}
    assert {"layer", "heads", "mlp", "attn", "self_attn", "input_layernorm"} <= offered, offered
    # what patching cannot take: whole-model modules, layer indices and patterns
    assert not offered & {"output", "layers", "embed_tokens", "norm", "lm_head", "*", "0..15", "8"}, offered
    inside = {c.label for c in complete("patch self_attn.", 16, context)}
    assert {"q_proj", "o_proj"} <= inside and not inside & {"layers", "*"}, inside
    text = "with steer layers.6 scale 2\n  patch m"
    in_a_with = {c.label for c in complete(text, len(text), context)}
    assert in_a_with == {"mlp", "mlp_out"}, in_a_with

    code = 'patch foo clean "Paris is" corrupt "Rome is"'
    with pytest.raises(QueryError) as raised:
        session.execute(code)
    assert {"layer", "attn", "mlp"} <= set(raised.value.suggestions), raised.value.suggestions
    for component in raised.value.suggestions:  # every name offered is one patch takes
        session.execute(f'patch {component} clean "Paris is" corrupt "Rome is" layers 0..1')
