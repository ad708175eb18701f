"""Record a REPL session on the demo model as an SVG for the docs (docs/repl-session.svg).

Runs the tour's queries through the REPL's own code path (`Repl.handle`, the daemon, the
result renderers) on a private daemon, echoing each query as the prompt shows it
(highlighted with the query language's lexer), and lets rich export the screen as SVG.

    python scripts/record_repl_session.py [--out docs/repl-session.svg] [--model demo]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import DummyInput
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from rich.padding import Padding
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from mlxterp_repl import client as daemon_client
from mlxterp_repl.dsl.highlight import MlxqLexer
from mlxterp_repl.repl import PROMPT, DaemonCompleter, QueryHistory, Repl, wait_for_model

SESSION = [
    'prompt "The capital of France is"',
    "save layers.8.",  # shown with its completion menu, not run
    'save layers.8 @ "France"',
    "lens @ -1 top 3 layers 10..15",
    "save layers.8.mpl",
    'patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France" layers 0..7',
]


def echo(console: Console, query: str) -> None:
    line = Text(PROMPT, style="bold green")
    highlighted = Syntax(query, MlxqLexer(), theme="ansi_dark").highlight(query)
    highlighted.rstrip()
    line.append_text(highlighted)
    console.print(line)


def menu(console: Console, repl: Repl, query: str) -> None:
    found = DaemonCompleter(repl.complete).get_completions(Document(query), CompleteEvent(completion_requested=True))
    table = Table.grid(padding=(0, 2))
    for completion in list(found)[:6]:
        table.add_row(Text(completion.display_text, style="black on white"),
                      Text(completion.display_meta_text, style="black on bright_white"))
    console.print(Padding(table, (0, 0, 0, len(PROMPT) + len(query) - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/repl-session.svg"))
    parser.add_argument("--model", default="demo")
    options = parser.parse_args()
    console = Console(record=True, width=80, force_terminal=True, color_system="truecolor", highlight=False,
                      file=io.StringIO())
    with tempfile.TemporaryDirectory() as runtime:
        client = daemon_client.connect(model=options.model, runtime_dir=runtime)
        try:
            assert wait_for_model(client, Console(stderr=True)) is None
            repl = Repl(client, console=console, history=QueryHistory(Path(runtime) / "history"), use_pager=False,
                        input=DummyInput(), output=DummyOutput())
            repl.refresh_status()
            for query in SESSION:
                echo(console, query)
                if query.endswith("."):
                    menu(console, repl, query)
                else:
                    repl.handle(query)
            console.print(Text(repl.toolbar()[:80].ljust(80), style="reverse"))
        finally:
            client.shutdown()
            client.close()
    console.save_svg(str(options.out), title="mlxterp repl")
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
