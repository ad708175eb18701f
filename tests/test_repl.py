"""The REPL in-process: prompt-toolkit pipe input and a dummy output, rich writing to a
string, talking to a real daemon (demo model) over a real socket in a private runtime dir."""

from __future__ import annotations

import io
import re
import signal
import threading
import time

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from daemon_support import start_daemon
from mlxterp_repl import client as daemon_client
from mlxterp_repl.repl import DaemonCompleter, QueryHistory, Repl, history_path, toolbar_text, wait_for_model

PROMPT = 'prompt "The capital of France is"\r'
CTRL_C, CTRL_D, CTRL_R, TAB = "\x03", "\x04", "\x12", "\t"
# 40 statements, each a full trace of its own long input (no trace cache hits); a trace
# stops at a module boundary once the daemon is asked to, so the whole text stops early.
# 40 statements, each patching every position of every layer of a ~90-token prompt on its own
# (about 1,400 rows in 45 batched passes): seconds of work even on a GPU, yet every step between
# two interrupt checks (one layer of one pass) is short on a busy CPU; short enough to paste.
LONG_QUERY = "\n".join(f'patch mlp clean "{i}: ' + "Paris is the capital of France. " * 12 + f'" corrupt "{i}: '
                       + "London is the capital of France. " * 12 + '" @ *' for i in range(40))
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = start_daemon(tmp_path_factory.mktemp("rt"))
    yield running
    running.stop()


@pytest.fixture
def client(daemon):
    connection = daemon_client.connect(runtime_dir=daemon.files.runtime_dir, autostart=False)
    assert wait_for_model(connection, Console(file=io.StringIO())) is None
    yield connection
    connection.close()


def make_console(width: int = 80, colour: bool = False, height: int = 24) -> Console:
    return Console(file=io.StringIO(), width=width, height=height, force_terminal=colour,
                   color_system="standard" if colour else None, highlight=False)


class Typist:
    """Runs a Repl on pipe input in the test's main thread while a helper thread types."""

    def __init__(self, client, tmp_path, console=None, use_pager=False):
        self.console = console or make_console()
        self.history = QueryHistory(tmp_path / "history")
        self.client = client
        self.use_pager = use_pager

    def run(self, keys: str = "", script=None) -> str:
        """Type `keys` (then run `script(pipe, repl)` in a thread, if given); the REPL's output."""
        with create_pipe_input() as pipe:
            self.repl = Repl(self.client, console=self.console, history=self.history, input=pipe,
                             output=DummyOutput(), use_pager=self.use_pager)
            pipe.send_text(keys)
            failures = []
            if script is not None:
                def typing():
                    try:
                        script(pipe, self.repl)
                    except BaseException as exc:  # noqa: BLE001 -- re-raised in the test below
                        failures.append(exc)
                        pipe.send_text(CTRL_C + CTRL_D)
                worker = threading.Thread(target=typing, daemon=True)
                worker.start()
            self.code = self.repl.run()
            if script is not None:
                worker.join(10)
            if failures:
                raise failures[0]
        return self.console.file.getvalue()


def wait_until(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pasted(text: str) -> str:
    """`text` as a terminal delivers a paste (newlines and all, without running it)."""
    return "\x1b[200~" + text + "\x1b[201~"


def completions(repl: Repl, text: str) -> dict:
    found = DaemonCompleter(repl.complete).get_completions(Document(text), CompleteEvent(completion_requested=True))
    return {c.display_text: c for c in found}


# --- completion ------------------------------------------------------------------------

def test_tab_after_a_layer_path_offers_its_submodules_with_their_types(client, tmp_path):
    typist = Typist(client, tmp_path)
    typist.run(CTRL_D)
    found = completions(typist.repl, "save layers.8.")
    assert {"mlp", "self_attn", "attn", "input_layernorm", "post_attention_layernorm"} <= set(found)
    assert found["self_attn"].display_meta_text == "Attention"
    assert "self_attn" in found["attn"].display_meta_text  # the alias says what it stands for
    assert all(c.start_position == 0 for c in found.values())  # nothing typed after the dot to replace


def test_completion_offers_statements_keywords_and_dollar_names(client, tmp_path):
    typist = Typist(client, tmp_path)
    typist.run(PROMPT + "save layers.8 @ -1 as $paris\r" + CTRL_D)
    statements = completions(typist.repl, "sa")
    assert "save" in statements and statements["save"].start_position == -2
    assert statements["save"].display_meta_text  # a short description beside it
    assert "top" in completions(typist.repl, "lens @ -1 t")
    names = completions(typist.repl, "predict $p")
    assert "$paris" in names and names["$paris"].start_position == -2
    assert {":help", ":history"} <= set(completions(typist.repl, ":h"))


def test_completion_after_at_quote_offers_the_prompt_tokens(client, tmp_path):
    typist = Typist(client, tmp_path)
    typist.run(PROMPT + CTRL_D)
    found = completions(typist.repl, 'save layers.8 @ "Fr')
    assert '"France"' in found
    assert found['"France"'].start_position == -3  # replaces the quote and the letters typed
    every_token = completions(typist.repl, 'save layers.8 @ "')
    assert {'"The"', '"capital"', '"of"', '"France"', '"is"'} <= set(every_token)


def test_tab_in_the_prompt_inserts_the_completion(client, tmp_path):
    def script(pipe, repl):
        pipe.send_text("save layers.8.input_l")
        buffer = repl.prompt.default_buffer
        # as a person types: the menu has come up (completion runs while typing) before Tab
        wait_until(lambda: buffer.complete_state and buffer.complete_state.completions, what="the menu")
        pipe.send_text(TAB)
        wait_until(lambda: buffer.text.endswith("input_layernorm"), what="Tab to complete")
        pipe.send_text("\r" + CTRL_D)

    typist = Typist(client, tmp_path)
    output = typist.run(PROMPT, script)
    assert typist.history.entries()[-1] == "save layers.8.input_layernorm"
    assert "shape" in output and "error" not in output  # the saved activation's table


# --- errors ------------------------------------------------------------------------------

def test_unknown_module_is_underlined_with_suggestions_and_the_repl_goes_on(client, tmp_path):
    output = Typist(client, tmp_path).run(PROMPT + "save layers.8.mpl\rtokens\r" + CTRL_D)
    lines = output.splitlines()
    source = next(i for i, line in enumerate(lines) if line.rstrip().endswith("| save layers.8.mpl"))
    assert lines[source + 1].index("^") == lines[source].index("layers.8.mpl")
    assert "layers.8.mlp" in output.split("save layers.8.mpl", 2)[-1]  # the suggestion
    assert "position" in output.split("valid here", 1)[1]  # the next query (a tokens table) still ran


def test_a_parse_error_names_what_would_be_valid(client, tmp_path):
    output = Typist(client, tmp_path).run("sav layers.8\r" + CTRL_D)
    assert "^^^" in output and "save" in output.split("sav layers.8", 1)[1]


# --- history -----------------------------------------------------------------------------

def test_history_drops_consecutive_duplicates_and_survives_a_restart(client, tmp_path):
    typist = Typist(client, tmp_path)
    typist.run(PROMPT + "info\rinfo\rls layers.0\rinfo\r" + CTRL_D)
    expected = ['prompt "The capital of France is"', "info", "ls layers.0", "info"]
    assert typist.history.entries() == expected
    assert QueryHistory(tmp_path / "history").entries() == expected


def test_history_file_lives_in_the_data_directory_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("MLXTERP_HISTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert history_path() == tmp_path / "data" / "mlxterp" / "history"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert history_path() == tmp_path / "home" / ".local" / "share" / "mlxterp" / "history"
    monkeypatch.setenv("MLXTERP_HISTORY", str(tmp_path / "elsewhere"))
    assert history_path() == tmp_path / "elsewhere"


def test_ctrl_r_finds_an_old_query_and_runs_it(client, tmp_path):
    typist = Typist(client, tmp_path)
    for entry in ['tokens "Hello world"', "info"]:
        typist.history.append_string(entry)
    output = typist.run(CTRL_R + "Hello" + "\r" + "\r" + CTRL_D)
    assert "'Hello world'" in output  # the title of the tokens table


def test_backslash_enter_continues_the_statement_on_the_next_line(client, tmp_path):
    typist = Typist(client, tmp_path)
    output = typist.run('tokens \\\r"Hello world"\r' + CTRL_D)
    assert "'Hello world'" in output
    assert typist.history.entries() == ['tokens \\\n"Hello world"']


# --- Ctrl-C and Ctrl-D --------------------------------------------------------------------

def test_ctrl_c_at_the_prompt_clears_the_line(client, tmp_path):
    typist = Typist(client, tmp_path)
    output = typist.run('tokens "never run"' + CTRL_C + 'tokens "Hello world"\r' + CTRL_D)
    assert "never run" not in output and "'Hello world'" in output
    assert typist.history.entries() == ['tokens "Hello world"']


def test_ctrl_c_while_a_query_runs_interrupts_it_and_returns_to_the_prompt(client, tmp_path):
    main = threading.get_ident()
    timings = {}

    def script(pipe, repl):
        wait_until(lambda: repl.running_id is not None, what="the query to start")
        time.sleep(0.1)
        timings["interrupt"] = time.monotonic()
        signal.pthread_kill(main, signal.SIGINT)  # what the terminal does on Ctrl-C
        wait_until(lambda: "interrupted" in repl.console.file.getvalue(), what="'interrupted'")
        timings["prompt"] = time.monotonic()
        pipe.send_text('tokens "Hello world"\r' + CTRL_D)

    output = Typist(client, tmp_path).run(pasted(LONG_QUERY) + "\r", script)
    assert timings["prompt"] - timings["interrupt"] < 5.0  # the 40 statements take over 10 s
    assert "'Hello world'" in output  # the next query ran on the same connection
    assert client.stats()["queued"] == 0  # nothing left running in the daemon


def test_ctrl_c_stops_a_long_patch_early(client, tmp_path):
    main = threading.get_ident()
    timings = {}

    def script(pipe, repl):
        wait_until(lambda: repl.running_id is not None, what="the patch to start")
        time.sleep(0.1)
        timings["interrupt"] = time.monotonic()
        signal.pthread_kill(main, signal.SIGINT)
        wait_until(lambda: "interrupted" in repl.console.file.getvalue(), what="'interrupted'")
        timings["prompt"] = time.monotonic()
        pipe.send_text(CTRL_D)

    # Patches of every position of every layer (LONG_QUERY): the first alone takes seconds on a CPU.
    Typist(client, tmp_path).run(pasted(LONG_QUERY) + "\r", script)
    assert timings["prompt"] - timings["interrupt"] < 1.0  # stopped at a layer boundary inside a pass


def test_ctrl_d_leaves_and_the_daemon_keeps_running(client, daemon, tmp_path):
    typist = Typist(client, tmp_path)
    typist.run(CTRL_D)
    assert typist.code == 0
    with daemon_client.connect(runtime_dir=daemon.files.runtime_dir, autostart=False) as other:
        assert other.ping()["pong"] is True


# --- rendering -------------------------------------------------------------------------------

TOUR = [
    'prompt "The capital of France is"',
    "tokens",
    "save layers.8 @ -1",
    "lens",
    "lens @ -1 top 3",
    'patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France"',
]


def test_the_tour_renders_in_80_columns_without_colour(client, tmp_path):
    output = Typist(client, tmp_path).run("\r".join(TOUR) + "\r" + CTRL_D)
    assert "\x1b[" not in output
    assert max(len(line) for line in output.splitlines()) <= 80
    assert "logit lens" in output
    assert "█" in output.split("patching", 1)[1]  # the bar chart
    save_part = output.split("layers.8", 1)[1]
    assert any(ch in save_part for ch in "▁▂▃▄▅▆▇")  # the sparkline of the saved values
    assert "error" not in output.lower() and "cannot display" not in output


def test_lens_grid_keeps_its_layer_numbers_in_80_columns(client, tmp_path):
    wide = 'lens in "The capital of France is Paris and the capital of Italy is"\r'  # more columns than fit
    output = Typist(client, tmp_path).run(wide + CTRL_D)
    grid = output.split("logit lens", 1)[1]
    assert re.search(r"^│\s*15\s*│", grid, re.M), grid
    assert "…" in grid  # the token columns gave way instead


def test_lens_grid_colours_each_token(client, tmp_path):
    console = make_console(width=120, colour=True)
    output = Typist(client, tmp_path, console=console).run(PROMPT + "lens\r" + CTRL_D)
    grid = output.split("logit lens", 1)[1]
    colours = set(re.findall(r"\x1b\[([0-9;]*3[0-7]|9[0-7])m", grid))
    assert len(colours) >= 3


def test_no_color_turns_colour_off(client, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    console = Console(file=io.StringIO(), width=100, force_terminal=True, highlight=False)
    output = Typist(client, tmp_path, console=console).run(PROMPT + "lens\r" + CTRL_D)
    assert "logit lens" in output
    assert not re.search(r"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;)", output)


def test_plot_writes_a_png_where_you_are_and_prints_its_path(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative file name means the REPL's directory, not the daemon's
    output = Typist(client, tmp_path).run(PROMPT + 'lens plot to "lens.png"\r' + CTRL_D)
    target = tmp_path / "lens.png"
    assert target.exists() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(target) in output.replace("\n", "")


def test_output_taller_than_the_screen_goes_through_the_pager(client, tmp_path, monkeypatch):
    paged = tmp_path / "paged.txt"
    monkeypatch.setenv("PAGER", f"tee {paged}")
    console = make_console(height=15)
    output = Typist(client, tmp_path, console=console, use_pager=True).run("help\r" + PROMPT + CTRL_D)
    assert "steer" in paged.read_text()  # the table of statements went to the pager
    assert "steer" not in output
    assert "prompt set" in output  # a one-line answer is printed directly


# --- toolbar and :commands ----------------------------------------------------------------------

def test_toolbar_shows_model_size_memory_status_and_last_query_time(client, tmp_path):
    typist = Typist(client, tmp_path)
    typist.run(PROMPT + CTRL_D)
    bar = typist.repl.toolbar()  # an 80-column terminal
    assert "demo" in bar
    assert re.search(r"│ (cpu|gpu) │", bar)  # the device MLX runs on, by its kind when space is short
    assert re.search(r"\d+ MB resident, \d+ MB MLX", bar)  # the daemon's whole size, and MLX's part of it
    assert "daemon ready" in bar and re.search(r"last \d+ ms", bar)
    assert len(bar) <= 80
    wide = toolbar_text(typist.repl.status, typist.repl.memory, typist.repl.last_time, True, width=160)
    assert "16 layers" in wide and "hidden 128" in wide  # also in the banner, so a narrow terminal leaves them out
    assert f"│ {client.hello['model']['device']} │" in wide


def test_toolbar_shortens_a_long_device_name_before_leaving_it_out():
    stats = {"model": {"name": "demo", "n_layers": 16, "hidden_size": 2048,
                       "device": "gpu (cuda: NVIDIA H200)", "state": "ready"}}
    memory = (1_635_000_000, 11_000_000)
    wide = toolbar_text(stats, memory, 0.002, True, width=200)
    assert "│ gpu (cuda: NVIDIA H200) │" in wide and "16 layers" in wide and "hidden 2048" in wide
    bar = toolbar_text(stats, memory, 0.002, True, width=80)
    assert "│ gpu │" in bar and len(bar) <= 80 and "hidden" not in bar
    narrow = toolbar_text(stats, memory, 0.002, True, width=60)
    assert "gpu" not in narrow and "layers" not in narrow and "daemon ready" in narrow


def test_colon_commands(client, tmp_path):
    typist = Typist(client, tmp_path)
    typist.history.append_string("info")
    output = typist.run(":help\r:model\r:history\r:nope\r:quit\rtokens\r")
    assert typist.code == 0
    assert all(name in output for name in (":help", ":model", ":clear", ":history", ":quit"))
    assert "model   demo: ready" in output  # :model
    assert re.search(r"hidden size 128, on (cpu|gpu)", output)  # with the device it runs on
    assert re.search(r"^\s+1\s+info$", output, re.M)  # :history
    assert "unknown command ':nope'" in output
    assert "no prompt is set" not in output  # `tokens` after :quit never ran
