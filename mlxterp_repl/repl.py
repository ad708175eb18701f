"""The terminal REPL, `mlxterp repl`: a prompt-toolkit prompt attached to the daemon.

It composes prompt-toolkit's pieces the way its `examples/prompts/` do: a `PromptSession`
with a completer (served by the daemon's `complete` op), the query language's Pygments
lexer, a file history that drops consecutive duplicates, a bottom toolbar and one key
binding (Enter after a trailing `\\` continues the statement on a new line). Queries run
in the daemon; their results come back as data and are drawn by the query language's own
result renderers. Ctrl-C while a query runs interrupts it in the daemon; Ctrl-D leaves the
REPL and the daemon keeps running for other clients.

Lines starting with `:` are the REPL's own commands (`:help`, `:model`, `:clear`,
`:history`, `:quit`); everything else is sent to the daemon as query-language text.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, ThreadedCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import Condition, has_focus
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.lexers import PygmentsLexer
from rich.console import Console
from rich.text import Text

from mlxterp_repl import client as daemon_client
from mlxterp_repl import protocol as p
from mlxterp_repl.commands import status_text
from mlxterp_repl.dsl.highlight import MlxqLexer
from mlxterp_repl.dsl.results import result_from_data

HISTORY_VAR = "MLXTERP_HISTORY"  # a history file path, overriding the default (tests use it)
PROMPT = "mlxterp> "
CONTINUATION = "    ...  "

# The REPL's own commands: name -> what it does (shown by :help, offered by completion)
COMMANDS = {
    ":help": "keys, these commands, and the query statements",
    ":model": "the daemon's model, clients and cache",
    ":clear": "clear the screen",
    ":history": "the last queries (`:history N` for N of them)",
    ":quit": "leave the REPL (the daemon keeps running); Ctrl-D does the same",
}

KEYS = [
    ("Tab", "complete: statements, module paths, $names, tokens after @ \""),
    ("Ctrl-R", "search the history"),
    ("\\ then Enter", "continue the statement on the next line"),
    ("Ctrl-C", "interrupt a running query; at the prompt, clear the line"),
    ("Ctrl-D", "leave (at an empty prompt)"),
]


# --- history -----------------------------------------------------------------

def history_path() -> Path:
    """$MLXTERP_HISTORY, else $XDG_DATA_HOME/mlxterp/history, else ~/.local/share/mlxterp/history."""
    explicit = os.environ.get(HISTORY_VAR)
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "mlxterp" / "history"


class QueryHistory(FileHistory):
    """A FileHistory that does not store an entry equal to the one just before it."""

    def __init__(self, filename: str | os.PathLike):
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename)

    def latest(self) -> str | None:
        if self._loaded_strings:
            return self._loaded_strings[0]
        return next(iter(self.load_history_strings()), None)

    def append_string(self, string: str) -> None:
        if string != self.latest():
            super().append_string(string)

    def entries(self) -> list[str]:
        """Every stored entry, oldest first."""
        return list(self.load_history_strings())[::-1]


# --- completion --------------------------------------------------------------

class DaemonCompleter(Completer):
    """Candidates from the daemon's `complete` op, with their type or description beside them.

    `ask(code, offset)` returns the daemon's items: label, kind, detail, insert_text and
    start (the offset where the word being replaced begins).
    """

    def __init__(self, ask):
        self.ask = ask

    def get_completions(self, document: Document, complete_event: CompleteEvent):
        before = document.text_before_cursor
        if before.lstrip().startswith(":") and "\n" not in before:
            word = before.lstrip()
            for name, description in COMMANDS.items():
                if name.startswith(word):
                    yield Completion(name, -len(word), display_meta=description)
            return
        try:
            items = self.ask(document.text, document.cursor_position)
        except (daemon_client.DaemonError, ConnectionError, OSError):
            return  # no candidates rather than an error in the middle of typing
        for item in items:
            start = item.get("start")
            if start is None:
                start = len(before)
            yield Completion(
                item.get("insert_text") or item["label"],
                start_position=min(start - len(before), 0),
                display=item["label"],
                display_meta=item.get("detail") or item.get("kind", ""),
            )


# --- the REPL ----------------------------------------------------------------

class Repl:
    """One interactive session on one daemon connection (a sync `Client`)."""

    def __init__(self, client: daemon_client.Client, console: Console | None = None,
                 history: QueryHistory | None = None, input=None, output=None, use_pager: bool | None = None):
        self.client = client
        self.console = console or Console(highlight=False)
        self.history = history if history is not None else QueryHistory(history_path())
        self.use_pager = self.console.is_terminal if use_pager is None else use_pager
        self.status: dict = {}
        self.memory: tuple[int | None, int | None] = (None, None)  # the daemon's resident size, MLX's memory
        self.last_time: float | None = None
        self.connected = True
        self.running_id = None  # id of the exec in flight, from its first frame
        # The connection carries one request at a time; completion runs in a thread.
        self.lock = threading.Lock()
        self.prompt = PromptSession(
            message=PROMPT,
            completer=ThreadedCompleter(DaemonCompleter(self.complete)),
            complete_while_typing=True,
            lexer=PygmentsLexer(MlxqLexer),
            history=self.history,
            key_bindings=self.key_bindings(),
            bottom_toolbar=self.toolbar,
            prompt_continuation=CONTINUATION,
            input=input,
            output=output,
        )

    # prompt-toolkit pieces
    def key_bindings(self) -> KeyBindings:
        bindings = KeyBindings()
        continues = Condition(lambda: ends_with_continuation(
            self.prompt.default_buffer.document.text_before_cursor))

        @bindings.add("enter", filter=has_focus(DEFAULT_BUFFER) & continues)
        def _continue_line(event):
            event.current_buffer.insert_text("\n")

        return bindings

    def complete(self, code: str, offset: int) -> list[dict]:
        if not self.lock.acquire(timeout=1.0):
            return []  # a query holds the connection
        try:
            return self.client.complete(code, offset)
        finally:
            self.lock.release()

    def toolbar(self) -> str:
        return toolbar_text(self.status, self.memory, self.last_time, self.connected,
                            width=self.prompt.app.output.get_size().columns)

    # the loop
    def run(self) -> int:
        self.refresh_status()
        self.console.print(Text(f"mlxterp: {self.model_line()}. :help for help, Ctrl-D to leave.",
                                style="dim"))
        # Echo stays off for the whole session, not only while a query runs: prompt-toolkit puts
        # back the terminal it found when a line is accepted, and text typed between that and the
        # query would be echoed into its output.
        with no_echo(self.console):
            while True:
                try:
                    text = self.prompt.prompt()
                except KeyboardInterrupt:
                    continue  # Ctrl-C at the prompt clears the line
                except EOFError:
                    break
                if not self.handle(text):
                    break
        return 0

    def handle(self, text: str) -> bool:
        """Run one input (a query or a :command). False when the REPL should end."""
        stripped = text.strip()
        if not stripped:
            return True
        if stripped.startswith(":") and "\n" not in stripped:
            return self.run_command(stripped)
        self.run_query(text)
        return True

    def run_query(self, text: str) -> None:
        started = time.perf_counter()
        progress = ProgressLine(self.console)
        self.running_id = None
        try:
            with self.lock:
                reply = self.client.request("exec", code=text, workdir=os.getcwd(),  # files go where you are
                                            on_frame=lambda m: self.on_frame(m, progress))
        except KeyboardInterrupt:
            # The client has already asked the daemon to stop the query when Ctrl-C came while it
            # waited; asking again covers a Ctrl-C that landed anywhere else, and is harmless.
            if self.running_id is not None:
                with self.lock:
                    try:
                        self.client.interrupt(self.running_id)
                    except OSError:
                        pass
            progress.clear()
            if progress.streaming:
                self.console.print()
            self.last_time = time.perf_counter() - started
            self.console.print(Text("interrupted", style="yellow"))
            return
        except (ConnectionError, OSError) as exc:
            progress.clear()
            self.lost_daemon(exc)
            return
        progress.clear()
        if progress.streaming:  # streamed text stopped mid-line (an interrupted generation)
            self.console.print()
        self.last_time = time.perf_counter() - started
        for data in reply.results:
            self.show_result(data)
        if reply.errors:
            self.show_error(daemon_client.DaemonError(reply.errors[0]), text)
        self.refresh_status()

    def on_frame(self, message: dict, progress: "ProgressLine") -> None:
        self.running_id = message.get("id")
        kind = message.get("type")
        if kind == p.PROGRESS:
            if not progress.streaming:  # a status line would erase the streamed text's open line
                progress.update(progress_text(message))
        elif kind == p.OUT:
            progress.clear()
            text = message.get("text", "")
            self.console.print(Text(text), end="")
            progress.streaming = bool(text) and not text.endswith("\n") or (progress.streaming and not text)

    def with_arrays(self, data: dict) -> dict:
        """The result with its big arrays (sent as handles) fetched."""
        with self.lock:
            return self.client.fetch_arrays(data)

    # showing things
    def show_result(self, data: dict) -> None:
        try:
            renderable = result_from_data(self.with_arrays(data)).render()
        except Exception as exc:  # noqa: BLE001 -- one undrawable result must not end the REPL
            renderable = Text(f"(cannot display this {data.get('kind', '?')} result: {type(exc).__name__}: {exc})",
                              style="red")
        self.show(renderable)

    def show_error(self, error: daemon_client.DaemonError, source: str) -> None:
        if error.code == p.INTERRUPTED:
            self.console.print(Text("interrupted", style="yellow"))
            return
        self.console.print(Text(error.render(source), style="red"))

    def show(self, renderable) -> None:
        """Print `renderable`; through a pager when it is taller than the screen."""
        if self.use_pager and len(self.console.render_lines(renderable, pad=False)) > self.console.height - 2:
            with self.console.capture() as captured:
                self.console.print(renderable)
            if page(captured.get()):
                return
        self.console.print(renderable)

    # status
    def refresh_status(self) -> None:
        try:
            with self.lock:
                self.status = self.client.stats()
            self.connected = True
        except (daemon_client.DaemonError, ConnectionError, OSError):
            self.connected = False
            return
        self.memory = (resident_memory(self.client.hello.get("pid")), mlx_memory(self.status))

    def model_line(self) -> str:
        model = self.status.get("model") or self.client.hello.get("model") or {}
        parts = [str(model.get("name", "?"))]
        if "n_layers" in model:
            parts.append(f"{model['n_layers']} layers, hidden size {model.get('hidden_size', '?')}")
        if model.get("device"):
            parts.append(f"on {model['device']}")
        return ", ".join(parts)

    def lost_daemon(self, exc: Exception) -> None:
        self.connected = False
        self.console.print(Text(f"lost the connection to the daemon ({exc}); reconnecting...", style="red"))
        try:
            files = self.client.files
            fresh = daemon_client.connect(runtime_dir=files.runtime_dir if files else None,
                                          socket_path=files.socket if files else None,
                                          model=(self.status.get("model") or {}).get("name", "demo"))
        except Exception as again:  # noqa: BLE001
            self.console.print(Text(f"could not reconnect: {again}. :quit and start `mlxterp repl` again.",
                                    style="red"))
            return
        self.client.close()
        self.client = fresh
        self.refresh_status()
        self.console.print(Text("reconnected; run the query again (this is a new session: the prompt and $ names "
                                "start empty)", style="yellow"))

    # :commands
    def run_command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        matches = [c for c in COMMANDS if c.startswith(name)] if name != ":" else []
        if len(matches) != 1:
            self.console.print(Text(f"unknown command {name!r}; the REPL's commands are: {', '.join(COMMANDS)}"
                                    + ("" if not matches else f" ({name!r} could be {', '.join(matches)})"),
                                    style="red"))
            return True
        command = matches[0]
        if command == ":quit":
            return False
        if command == ":help":
            self.show(help_text())
        elif command == ":model":
            self.refresh_status()
            if self.connected:
                self.console.print(Text(status_text(self.status)))
            else:
                self.console.print(Text("the daemon does not answer", style="red"))
        elif command == ":clear":
            output = self.prompt.output
            output.erase_screen()
            output.cursor_goto(0, 0)
            output.flush()
        elif command == ":history":
            self.show_history(rest.strip())
        return True

    def show_history(self, count_text: str) -> None:
        count = 20
        if count_text:
            if not count_text.isdigit():
                self.console.print(Text(f":history takes a number of entries, got {count_text!r}", style="red"))
                return
            count = int(count_text)
        entries = self.history.entries()
        first = max(len(entries) - count, 0)
        lines = Text()
        for number, entry in enumerate(entries[first:], start=first + 1):
            lines.append(f"{number:>5}  ", style="dim")
            lines.append(entry.replace("\n", "\n       ") + "\n")
        self.show(lines if entries else Text("(no history yet)", style="dim"))


# --- helpers -----------------------------------------------------------------

def ends_with_continuation(text_before_cursor: str) -> bool:
    """True when the current line ends in `\\` (the query language's line continuation)."""
    return text_before_cursor.rsplit("\n", 1)[-1].rstrip(" \t").endswith("\\")


def help_text() -> Text:
    text = Text()
    text.append("Keys\n", style="bold")
    for key, what in KEYS:
        text.append(f"  {key:<14}", style="cyan")
        text.append(f"{what}\n")
    text.append("Commands\n", style="bold")
    for name, what in COMMANDS.items():
        text.append(f"  {name:<14}", style="cyan")
        text.append(f"{what}\n")
    text.append("Anything else is a query; type ", style="")
    text.append("help", style="cyan")
    text.append(" for the statements, ")
    text.append("help patch", style="cyan")
    text.append(" for one of them.")
    return text


def progress_text(message: dict) -> str:
    words = [str(message.get("message") or message.get("stage") or "working")]
    fraction = message.get("fraction")
    if isinstance(fraction, (int, float)):
        words.append(f"{100 * fraction:.0f}%")
    return " ".join(words)


class ProgressLine:
    """One transient status line under the prompt while a query runs (terminals only): always one
    screen line (the first line of the text, cut to fit), so clearing that line leaves no trace."""

    def __init__(self, console: Console):
        self.console = console
        self.shown = False
        self.streaming = False  # streamed text (`out` frames, e.g. generated tokens) left its line open

    def update(self, text: str) -> None:
        if not self.console.is_terminal:
            return
        from rich.cells import cell_len, set_cell_size

        width = max(self.console.width - 1, 10)
        line = " ".join(text.split())  # a statement of several lines shows as one
        self.console.file.write("\r\x1b[K" + (set_cell_size(line, width).rstrip() if cell_len(line) > width else line))
        self.console.file.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.console.file.write("\r\x1b[K")
            self.console.file.flush()
            self.shown = False


class no_echo:
    """The terminal does not echo what is typed ahead of the prompt (prompt-toolkit draws what is
    typed at the prompt itself): it would land on a query's progress line or output and stay in
    the scrollback. The typed text is kept; the next prompt shows it."""

    def __init__(self, console: Console):
        self.fd = None
        if console.is_terminal and sys.stdin.isatty():
            self.fd = sys.stdin.fileno()

    def __enter__(self):
        self.saved = None
        if self.fd is not None:
            import termios

            try:
                self.saved = termios.tcgetattr(self.fd)
                quiet = list(self.saved)
                quiet[3] &= ~termios.ECHO
                termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
            except termios.error:
                self.saved = None
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)


def mlx_memory(stats: dict) -> int | None:
    """Bytes of MLX's active memory in the daemon, as it reports them."""
    reported = stats.get("memory") or (stats.get("model") or {}).get("memory")
    if isinstance(reported, dict):
        reported = reported.get("active")
    return int(reported) if isinstance(reported, (int, float)) else None


def resident_memory(pid: int | None) -> int | None:
    """The daemon's resident size (RSS), read from the OS: everything it holds, MLX's memory or not."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=2)
        return int(out.stdout.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def toolbar_text(stats: dict, memory: tuple, last_time: float | None, connected: bool,
                 width: int | None = None) -> str:
    """model · layers · hidden size · device · memory (resident, MLX) · daemon status · last query time."""
    if not connected:
        return " daemon: not connected (the next query reconnects) "
    model = stats.get("model") or {}
    name = str(model.get("name", "?"))
    parts = [name if len(name) <= 24 else "…" + name[-23:]]  # a long path keeps its end
    if "n_layers" in model:
        parts.append(f"{model['n_layers']} layers")
    if "hidden_size" in model:
        parts.append(f"hidden {model['hidden_size']}")
    device = model.get("device") or stats.get("device")
    if device:
        parts.append(str(device))
    resident, mlx = memory
    if resident is not None:
        parts.append(f"{resident / 1e6:.0f} MB resident" + (f", {mlx / 1e6:.0f} MB MLX" if mlx is not None else ""))
    elif mlx is not None:
        parts.append(f"{mlx / 1e6:.0f} MB MLX")
    state = model.get("state", "?")
    busy = stats.get("queued", 0)
    parts.append(f"daemon {state}" + (f", {busy} running" if busy else ""))
    if last_time is not None:
        parts.append(f"last {last_time * 1000:.0f} ms" if last_time < 1 else f"last {last_time:.1f} s")
    # Narrow terminals: leave out what is also in the banner (hidden size, layers), shorten the device
    # to its kind ("gpu (cuda: NVIDIA H200)" -> "gpu"), and leave that out last.
    kind = str(device).split(" ")[0]
    for spare, shorter in ((f"hidden {model.get('hidden_size')}", None), (str(device), kind),
                           (f"{model.get('n_layers')} layers", None), (kind, None)):
        if width is None or len(" │ ".join(parts)) + 2 <= width:
            break
        if spare in parts:
            at = parts.index(spare)
            if shorter is None:
                del parts[at]
            else:
                parts[at] = shorter
    return " " + " │ ".join(parts) + " "


def page(text: str) -> bool:
    """Show `text` through $PAGER (or `less -RFX`); False when there is no pager to use."""
    command = os.environ.get("PAGER")
    if command is None:
        command = "less" if shutil.which("less") else ""
    if not command.strip() or command.strip() == "cat":
        return False
    env = dict(os.environ)
    env.setdefault("LESS", "-RFX")  # keep colours, quit if it fits, leave the text on screen
    try:
        subprocess.run(shlex.split(command), input=text.encode(), env=env)
    except OSError:
        return False
    except KeyboardInterrupt:
        pass
    return True


def wait_for_model(client: daemon_client.Client, console: Console) -> dict | None:
    """Block until the daemon's model is ready, showing its load progress. The error if it failed."""
    progress = ProgressLine(console)

    def on_frame(message):
        if message.get("type") == p.PROGRESS:
            progress.update("loading the model: " + progress_text(message))

    try:
        reply = client.request("modules", on_frame=on_frame)
    finally:
        progress.clear()
    return reply.errors[0] if reply.errors else None


# --- `mlxterp repl` ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxterp repl", description=(
        "Interactive prompt for the query language, attached to the daemon (started if none runs)."))
    parser.add_argument("--model", help="model the daemon loads if it has to start one (default: demo)")
    parser.add_argument("--runtime-dir", help="the daemon's runtime directory (default: as `mlxterp serve`)")
    parser.add_argument("--socket", help="the daemon's socket path")
    parser.add_argument("--width", type=int, metavar="N",
                        help="draw results N columns wide (default: the terminal's width, or COLUMNS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    # No --width: the terminal's width at each result (rich asks again when the window changes).
    console = Console(highlight=False, width=max(options.width, 20) if options.width else None)
    try:
        client = daemon_client.connect(model=options.model or "demo", runtime_dir=options.runtime_dir,
                                       socket_path=options.socket)
    except (daemon_client.DaemonNotRunning, daemon_client.DaemonError, OSError) as exc:
        console.print(Text(f"mlxterp repl: could not reach the daemon: {exc}", style="red"))
        return 1
    try:
        running = (client.hello.get("model") or {}).get("name")
        if options.model and running and running != options.model:
            console.print(Text(f"the daemon already runs model {running!r}; --model {options.model} is not "
                               "loaded (use `load` in a query, or `mlxterp stop` and start again)", style="yellow"))
        try:
            error = wait_for_model(client, console)
        except KeyboardInterrupt:
            return 130
        if error is not None:
            console.print(Text(f"mlxterp repl: {error.get('message', 'the model did not load')}", style="red"))
            return 1
        return Repl(client, console=console).run()
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
