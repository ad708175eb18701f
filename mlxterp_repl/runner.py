"""`mlxterp run FILE.mlxq`: run a query script in this process and print each result.

The whole script is parsed before anything runs: a syntax error anywhere is printed with
its line and runs nothing. Statements then run in order; the first error is printed with
its line, column and underlined span, and ends the run with exit status 1 unless
--keep-going (which also runs the statements around syntax errors). With --json each statement prints one JSON object on its own line:
{"line", "statement", "ok", "result" | "error"}; arrays carry their bytes base64-encoded.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxterp run", description="Run a .mlxq query script.")
    parser.add_argument("file", metavar="FILE.mlxq", help="the script to run ('-' reads standard input)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per statement")
    parser.add_argument("--keep-going", action="store_true", help="go on after an error (exit status is still 1)")
    parser.add_argument("--model", metavar="M", help="load this model first (demo, a directory or a hub id)")
    parser.add_argument("--local", action="store_true",
                        help="run in this process instead of through the daemon (which is started if needed)")
    parser.add_argument("--width", type=int, metavar="N",
                        help="draw results N columns wide (default: COLUMNS, else the terminal's width, "
                             "else each table at its natural width)")
    return parser


DEFAULT_MODEL = "demo"  # what the daemon loads when `mlxterp run` starts it, and what --local loads
NATURAL_WIDTH = 1000  # no terminal and no COLUMNS: tables at their natural width, text unwrapped
MIN_WIDTH = 20


def output_width(option: int | None = None, environ=None, streams=None) -> int:
    """Columns to draw results in: `--width`, else COLUMNS, else the width of the terminal that
    any of stdout/stderr/stdin is (so `mlxterp run x | less` still fits the screen), else
    NATURAL_WIDTH (output to a file is not wrapped at 80 columns)."""
    import os

    if option is not None:
        return max(int(option), MIN_WIDTH)
    environ = os.environ if environ is None else environ
    text = environ.get("COLUMNS", "")
    if text.strip().isdigit() and int(text) > 0:
        return max(int(text), MIN_WIDTH)
    for stream in (sys.stdout, sys.stderr, sys.stdin) if streams is None else streams:
        try:
            if stream is not None and stream.isatty():
                return max(os.get_terminal_size(stream.fileno()).columns, MIN_WIDTH)
        except (AttributeError, OSError, ValueError):
            continue
    return NATURAL_WIDTH


def jsonable(value):
    """Plain data with arrays in the protocol's form and bytes as base64 text, so json.dumps takes it."""
    from mlxterp_repl import protocol as p

    if p.is_array(value):
        value = p.encode_array(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        out = {str(k): jsonable(v) for k, v in value.items()}
        if isinstance(value.get("data"), bytes):
            out["encoding"] = "base64"
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def run_script(source: str, session, *, as_json: bool = False, keep_going: bool = False,
               out=None, err=None, trace_cache=None, width: int | None = None) -> int:
    """Run `source` in `session` (with `trace_cache` for its forward passes), printing as
    `mlxterp run` does (results drawn `width` columns wide: `output_width`); return the exit status."""
    from rich.console import Console

    from mlxterp_repl.dsl import parse

    out = out or sys.stdout
    err = err or sys.stderr
    console = Console(file=out, soft_wrap=False, width=width or output_width())
    parsed = parse(source)
    items = [(e.span.line, e.span.col, e) for e in parsed.errors]
    if not keep_going and items:  # a broken script runs nothing: report every syntax error
        items.sort(key=lambda item: (item[0], item[1]))
        for _line, _col, error in items:
            report_error(error, source, source_line(source, error.span.line), as_json, out, err)
        return 1
    items += [(s.span.line, s.span.col, s) for s in parsed.statements]
    items.sort(key=lambda item: (item[0], item[1]))
    status = 0
    for line, _col, item in items:
        error, result = None, None
        text = item.text if hasattr(item, "text") else source_line(source, line)
        if isinstance(item, Exception):
            error = item
        else:
            from mlxterp_repl.dsl import QueryError

            try:
                result = session.execute_statement(item, trace_cache=trace_cache)
            except QueryError as exc:
                error = exc
        if error is not None:
            report_error(error, source, text, as_json, out, err)
        elif as_json:
            record = {"line": line, "statement": text, "ok": True, "result": jsonable(result.to_data(text=True))}
            print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
        else:
            console.print(f"[dim]{line}:[/dim] [bold]{escape(echoed(text))}[/bold]")
            console.print(result.render())
        if error is not None:
            status = 1
            if not keep_going:
                break
    return status


def report_error(error, source: str, text: str, as_json: bool, out, err) -> None:
    """An error as `mlxterp run` prints it: a JSON record on stdout, or drawn with its line on stderr."""
    if as_json:
        record = {"line": error.span.line, "statement": text, "ok": False, "error": error.to_data()}
        print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
    else:
        print(error.render(source), file=err, flush=True)


def source_line(source: str, line: int) -> str:
    lines = source.split("\n")
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


ECHO_CHARS = 240  # a statement longer than this (a long prompt) is echoed by its start and end


def echoed(text: str) -> str:
    """A statement as echoed above its result: whole, or its start and end when it is long."""
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[:ECHO_CHARS - 70]} … ({len(text) - ECHO_CHARS + 10} characters) … {text[-60:]}"


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def main(argv: list[str]) -> int:
    options = build_parser().parse_args(argv)
    if options.file == "-":
        source = sys.stdin.read()
    else:
        path = Path(options.file)
        if path.is_dir():
            print(f"mlxterp run: {options.file} is a directory; give a .mlxq script in it, such as "
                  f"{next(iter(sorted(path.glob('*.mlxq'))), path / 'script.mlxq')}", file=sys.stderr)
            return 2
        if not path.is_file():
            print(f"mlxterp run: no such file: {options.file}", file=sys.stderr)
            return 2
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            print(f"mlxterp run: {options.file} is not UTF-8 text ({error.reason} at byte {error.start})",
                  file=sys.stderr)
            return 2
    source = source.removeprefix("\ufeff")  # a byte-order mark some editors write

    if not options.local:
        return run_through_daemon(source, options)

    from mlxterp.errors import MlxterpError

    from mlxterp_repl.dsl import Session, TraceCache

    # As the daemon path does (workdir, a trace cache of the daemon's default budget), so both print the same.
    # The daemon path's default model too (`demo`), so a script runs the same either way.
    session = Session(workdir=Path.cwd())
    from mlxterp import InterpretableModel

    try:
        session.model = InterpretableModel(options.model or DEFAULT_MODEL)
    except MlxterpError as error:
        print(f"mlxterp run: cannot load --model {options.model or DEFAULT_MODEL}: {error}", file=sys.stderr)
        return 2
    try:
        return run_script(source, session, as_json=options.json, keep_going=options.keep_going,
                          trace_cache=TraceCache(), width=output_width(options.width))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_through_daemon(source: str, options) -> int:
    """The same run in the daemon's session: the model stays loaded between runs and
    traces are cached. Output is identical to --local."""
    from mlxterp_repl.client import DaemonError, DaemonNotRunning, connect

    try:
        client = connect(model=options.model or DEFAULT_MODEL)
    except (DaemonNotRunning, OSError) as error:
        print(f"mlxterp run: cannot reach the daemon: {error}; --local runs without it", file=sys.stderr)
        return 2
    with client:
        try:
            if options.model and client.hello["model"]["name"] != options.model:
                client.exec(f'load "{options.model}"')
        except DaemonError as error:
            print(f"mlxterp run: cannot load --model {options.model}: {error.message}", file=sys.stderr)
            return 2
        try:
            return run_script(source, RemoteSession(client), as_json=options.json, keep_going=options.keep_going,
                              width=output_width(options.width))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


# --- a session in the daemon ---------------------------------------------------

class RemoteResult:
    """A result as the daemon sent it (arrays already numpy), with the views `run_script` uses."""

    def __init__(self, data: dict):
        self.data = data
        self.kind = data.get("kind")

    def to_data(self, text: bool = True) -> dict:
        return self.data  # asked for with its text drawing

    def render(self):
        from mlxterp_repl.dsl.results import result_from_data

        return result_from_data(self.data).render()


class RemoteSession:
    """Runs parsed statements in the daemon, one exec each, with the interface of
    `Session.execute_statement`: results come back, errors are QueryErrors whose spans
    point into the whole script (so they render exactly as in-process ones do)."""

    def __init__(self, client):
        self.client = client

    def execute_statement(self, statement, **_ignored):
        import os

        from mlxterp_repl import protocol as p
        from mlxterp_repl.client import DaemonError
        from mlxterp_repl.dsl.errors import QueryError

        span = statement.span
        reply = self.client.request("exec", code=statement.text, full=True, text=True, workdir=os.getcwd())
        if reply.errors:
            error = DaemonError(reply.errors[0])
            if error.code == p.INTERRUPTED:
                raise KeyboardInterrupt
            if error.span is None:
                raise QueryError(error.message, span, error.suggestions)
            raise QueryError(error.message, shifted(QueryError.from_data(error.data).span, span), error.suggestions)
        [data] = reply.results
        return RemoteResult(data)


def shifted(span, statement_span):
    """`span`, counted within a statement's text, counted within the whole script instead."""
    from mlxterp_repl.dsl.errors import Span

    def shift(line, col):
        return line + statement_span.line - 1, col + (statement_span.col - 1 if line == 1 else 0)

    return Span(*shift(span.line, span.col), *shift(span.end_line, span.end_col))
