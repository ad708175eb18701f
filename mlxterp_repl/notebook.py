"""Jupyter and IPython: the `%mlxq` (line) and `%%mlxq` (cell) magics.

`%load_ext mlxterp` registers them (through the `mlxterp.ipython` entry point) and puts
`mlxq`, a `NotebookQueries`, in the notebook's namespace. Query-language text runs in the
daemon (started when none runs, as the REPL does), or in the kernel itself with `--local`.
Each result is the library's own object, displayed with its `_repr_html_` (tables, plots as
embedded PNGs) and its plain-text drawing; Python gets them back as:

    _mlxq                   the results of the last query (a list of result objects)
    mlxq.vars["x"]          what `$x` holds: an array, or {module: array} when it holds several
    mlxq.bind("x", array)   make `$x` hold a Python array (`%mlxq --bind x=array` does the same)
    mlxq.run(text)          run text from Python; its results (errors raise)

Tab completes query text in `%mlxq` lines and `%%mlxq` cells (the daemon's `complete` op).
Errors show the line, the span underlined and what is valid there, as in the REPL. While a
query runs a progress line is shown; the notebook's interrupt button stops the query in the
daemon (the session keeps its prompt and `$` names).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping

import numpy as np

from mlxterp_repl import client as daemon_client
from mlxterp_repl import protocol as p
from mlxterp.results import ValuesResult, plain_text, result_from_data

USAGE = """\
%mlxq [--local] [--quiet] [--model NAME] [--bind NAME=EXPR ...] QUERY
%%mlxq [options] on the first line, queries in the cell

  --local         run in this kernel (loads the model here) instead of the daemon
  --quiet         do not display the results (they are still in _mlxq)
  --model NAME    model the daemon (or --local) loads when it has to start one (default demo)
  --bind N=EXPR   set $N to the value of the Python expression EXPR before the query runs
"""
_BIND = re.compile(r"^([A-Za-z_]\w*)=(.+)$")


class QueryFailed(Exception):
    """A query the daemon or the local session rejected: `rendered` is the REPL's drawing of the
    error (line, underline, valid-here list); `results` what ran before it."""

    def __init__(self, rendered: str, results: list, code: str | None = None):
        super().__init__(rendered)
        self.rendered = rendered
        self.results = results
        self.code = code


class Variables(Mapping):
    """`mlxq.vars`: the `$` names of the session, as numpy arrays."""

    def __init__(self, owner: "NotebookQueries"):
        self.owner = owner

    def held(self) -> dict:
        return self.owner.session.variables if self.owner.local else self.owner.mirror

    def __getitem__(self, name: str):
        name = name[1:] if isinstance(name, str) and name.startswith("$") else name
        held = self.held()
        if name not in held:
            known = ", ".join("$" + n for n in held) or "none yet (save ... as $name)"
            raise KeyError(f"${name} is not set in this notebook's session; set: {known}")
        arrays = held[name].arrays
        if len(arrays) == 1:
            return arrays[0][1]
        return {label: array for label, array in arrays}

    def result(self, name: str) -> ValuesResult:
        """The result object `$name` holds (labels, arrays, statistics; displays as a table)."""
        self[name]  # the same error for an unknown name
        return self.held()[name.lstrip("$")]

    def __iter__(self):
        return iter(list(self.held()))

    def __len__(self) -> int:
        return len(self.held())

    def __repr__(self) -> str:
        return "{" + ", ".join(f"${n}: {self.held()[n].summary(60)!r}" for n in self.held()) + "}"


class NotebookQueries:
    """What the magics run queries with: a daemon connection (or a local session), the last
    results and the `$` names. One per kernel, as `mlxq`."""

    def __init__(self, model: str = "demo"):
        self.model = model
        self.local = False
        self.client: daemon_client.Client | None = None
        self._session = None
        self.mirror: dict[str, ValuesResult] = {}  # the daemon session's $ names, as they came back
        self.results: list = []
        self.vars = Variables(self)

    # --- where queries run -------------------------------------------------------

    @property
    def session(self):
        """The in-kernel query session of `--local` (the model loads on first use)."""
        if self._session is None:
            from mlxterp_repl.dsl.evaluator import Session, load_model

            with warnings.catch_warnings():  # tqdm's "IProgress not found" from the loaders, in a notebook
                warnings.filterwarnings("ignore", message="IProgress not found")
                self._session = Session(load_model(self.model), workdir=os.getcwd())
        return self._session

    def daemon(self) -> daemon_client.Client:
        if self.client is None:
            self.client = daemon_client.connect(model=self.model)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # --- Python API --------------------------------------------------------------

    def run(self, text: str, *, local: bool | None = None, on_progress=None) -> list:
        """Run query-language text; the result objects. Raises QueryFailed (with the drawing of
        the error and the results before it) or KeyboardInterrupt when interrupted."""
        if local is not None:
            self.local = local
        results = self._run_local(text, on_progress) if self.local else self._run_daemon(text, on_progress)
        self.results = results
        return results

    def bind(self, name: str, array, label: str | None = None) -> ValuesResult:
        """Make `$name` hold `array` (numpy, MLX or anything numpy can read) in the session."""
        name = name[1:] if isinstance(name, str) and name.startswith("$") else name
        values = as_array(array)
        if self.local:
            try:
                return self.session.bind(name, values, label)
            except ValueError as error:
                raise QueryFailed(str(error), []) from None
        try:
            data = self._daemon_call(lambda client: client.bind(name, values, label))
        except daemon_client.DaemonError as error:
            raise QueryFailed(error.render(), [], error.code) from None
        result = result_from_data(data)
        self.mirror[name] = result
        return result

    def complete(self, code: str, offset: int) -> list[dict]:
        """Completion items ({label, kind, detail, insert_text, start}) at `offset` of query text,
        from where queries run now; none before the first query (completion starts nothing)."""
        if self.local and self._session is not None:
            from mlxterp_repl.dsl import complete

            return [{"label": c.label, "kind": c.kind, "detail": c.detail, "insert_text": c.insert_text,
                     "start": c.start} for c in complete(code, offset, self._session.completion_context())]
        if self.local or self.client is None:
            return []
        try:
            return self.client.complete(code, offset)
        except (daemon_client.DaemonError, OSError):
            return []

    # --- running -----------------------------------------------------------------

    def _run_local(self, text: str, on_progress) -> list:
        from mlxterp_repl.dsl import QueryError

        try:
            return self.session.execute(text, on_progress=on_progress)
        except QueryError as error:
            raise QueryFailed(error.render(text), list(getattr(error, "results", []) or []), p.QUERY_ERROR) from None

    def _run_daemon(self, text: str, on_progress) -> list:
        running = {}

        def on_frame(message):
            running["id"] = message.get("id")
            if message.get("type") == p.PROGRESS and on_progress is not None:
                on_progress(progress_text(message))

        try:
            datas = self._daemon_call(lambda client: client.exec(text, on_frame=on_frame, workdir=os.getcwd()))
        except daemon_client.DaemonError as error:
            results = self._keep([result_from_data(d) for d in getattr(error, "results", [])])
            if error.code == p.INTERRUPTED:
                raise KeyboardInterrupt from None
            raise QueryFailed(error.render(text), results, error.code) from None
        except KeyboardInterrupt:
            # The client stops the query when Ctrl-C lands while it waits; a Ctrl-C that landed
            # elsewhere (in a progress update) is passed on here. Asking twice is harmless.
            if self.client is not None and running.get("id") is not None:
                try:
                    self.client.interrupt(running["id"])
                except OSError:
                    pass
            raise
        return self._keep([result_from_data(d) for d in datas])

    def _daemon_call(self, call):
        """`call(client)`, connecting first; once more on a fresh connection if the daemon went away
        (a new session: the prompt and $ names start empty)."""
        try:
            return call(self.daemon())
        except (ConnectionError, BrokenPipeError):
            self.close()
            self.mirror.clear()
            return call(self.daemon())

    def _keep(self, results: list) -> list:
        """Note the `$` names the results set (the daemon holds them; this mirrors them)."""
        for result in results:
            if isinstance(result, ValuesResult) and result.name:
                self.mirror[result.name] = result
        return results


def as_array(value) -> np.ndarray:
    """A Python value as a numpy array to send (MLX arrays included, without importing mlx)."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("mlx"):  # an mx.array: mlx is loaded already
        import mlx.core as mx

        return np.array(value.astype(mx.float32))
    return np.asarray(value)


def progress_text(message: dict) -> str:
    from mlxterp_repl.repl import progress_text as repl_progress_text  # the REPL's wording

    return repl_progress_text(message)


# --- IPython ----------------------------------------------------------------------------

def parse_options(line: str) -> tuple[dict, str]:
    """Leading `--options` of a magic line, and the rest (query text, kept verbatim)."""
    options = {"local": False, "quiet": False, "model": None, "bind": []}
    rest = line.lstrip()
    while rest.startswith("-"):
        word, _, after = rest.partition(" ")
        after = after.lstrip()
        if word in ("--local", "-l"):
            options["local"] = True
        elif word in ("--quiet", "-q"):
            options["quiet"] = True
        elif word in ("--model", "--bind"):
            value, _, after = after.partition(" ")
            if not value:
                raise ValueError(f"{word} needs a value\n\n{USAGE}")
            if word == "--bind":
                if not _BIND.match(value):
                    raise ValueError(f"--bind takes NAME=EXPR (e.g. --bind direction=my_array), got {value!r}")
                options["bind"].append(value)
            else:
                options["model"] = value
            after = after.lstrip()
        elif word in ("--help", "-h"):
            raise ValueError(USAGE)
        else:
            raise ValueError(f"unknown option {word!r}\n\n{USAGE}")
        rest = after
    return options, rest


def display_result(result) -> None:
    """One result in the notebook: its HTML table (with any plot) and its plain-text drawing."""
    from IPython.display import display

    bundle = {"text/plain": plain_text(result.render()).rstrip("\n")}
    try:
        bundle["text/html"] = result._repr_html_()
    except Exception:  # noqa: BLE001 -- the text drawing still shows it
        pass
    display(bundle, raw=True)


class Progress:
    """One line under the cell while a query runs, updated in place and removed at the end."""

    def __init__(self):
        self.handle = None

    def update(self, text: str = "", **fields) -> None:
        from IPython.display import display

        if "out" in fields:  # text a statement streams (the tokens of `generate`) accumulates on the line
            self.streamed = getattr(self, "streamed", "") + str(fields["out"])
            text = self.streamed
        elif not isinstance(text, str):
            return

        bundle = {"text/plain": text}
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)

    def clear(self) -> None:
        if self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True)


def run_magic(shell, queries: NotebookQueries, line: str, cell: str | None = None):
    from IPython.core.error import UsageError

    try:
        options, text = parse_options(line)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if cell is not None:
        text = (text + "\n" if text.strip() else "") + cell
    if not text.strip() and not options["bind"]:
        raise UsageError("%mlxq needs a query (or --bind)\n\n" + USAGE)
    if options["model"]:
        queries.model = options["model"]
    queries.local = options["local"]
    shown = []
    try:
        for binding in options["bind"]:
            name, expression = _BIND.match(binding).groups()
            try:
                value = eval(expression, shell.user_ns)  # noqa: S307 -- the user's own notebook expression
            except Exception as error:  # noqa: BLE001
                raise UsageError(f"--bind {name}=...: {expression!r} failed in Python: {type(error).__name__}: "
                                 f"{error}") from None
            shown.append(queries.bind(name, value))
        progress = Progress() if getattr(shell, "kernel", None) is not None else None  # a notebook, not a terminal
        try:
            results = queries.run(text, on_progress=progress and progress.update) if text.strip() else []
        finally:
            if progress is not None:
                progress.clear()
        shown += results
    except QueryFailed as failure:
        shown += failure.results
        finish(shell, queries, shown, options["quiet"])
        raise UsageError(failure.rendered) from None
    except KeyboardInterrupt:
        finish(shell, queries, shown, options["quiet"])
        raise UsageError("interrupted: the query was stopped (the session keeps its prompt and $ names)") from None
    except (daemon_client.DaemonNotRunning, daemon_client.DaemonError, OSError) as error:
        raise UsageError(f"mlxq: could not reach the daemon: {error}") from None
    finish(shell, queries, shown, options["quiet"])


def finish(shell, queries: NotebookQueries, shown: list, quiet: bool) -> None:
    queries.results = shown
    shell.user_ns["_mlxq"] = shown
    if not quiet:
        for result in shown:
            display_result(result)


_LINE_MAGIC = re.compile(r"^\s*%mlxq(?=\s|$)(.*)$")
_CELL_MAGIC = re.compile(r"^\s*%%mlxq(?=\s|$)[^\n]*\n")


def query_before_cursor(text: str) -> str | None:
    """The query text up to the cursor when the cursor is in a `%%mlxq` cell or on a `%mlxq`
    line (`text`: the cell up to the cursor), else None."""
    cell = _CELL_MAGIC.match(text)
    if cell is not None:
        return text[cell.end():]
    line = _LINE_MAGIC.match(text.rsplit("\n", 1)[-1])
    if line is None:
        return None
    try:
        return parse_options(line.group(1))[1]
    except ValueError:
        return None


def completion_matcher(queries: NotebookQueries):
    """An IPython matcher: completion of query text (statements, module paths, $ names, the
    prompt's tokens) inside `%mlxq` lines and `%%mlxq` cells, from the daemon's `complete` op."""
    from IPython.core.completer import SimpleCompletion, context_matcher

    @context_matcher(priority=10)  # before IPython's own (magics, Python names): this text is a query
    def mlxq_matcher(context):
        lines = context.full_text.split("\n")  # the cursor is a line and a column in the line
        before = "\n".join(lines[:context.cursor_line] + [lines[context.cursor_line][:context.cursor_position]])
        query = query_before_cursor(before)
        if query is None:
            return {"completions": [], "suppress": False}
        items = queries.complete(query, len(query))
        starts = {item.get("start", len(query)) for item in items}
        if len(starts) != 1:  # one fragment is replaced for all of them
            items = [item for item in items if item.get("start", len(query)) == max(starts)] if starts else []
        start = items[0].get("start", len(query)) if items else len(query)
        completions = [SimpleCompletion(item.get("insert_text") or item["label"], type=item.get("kind", "mlxq"))
                       for item in items]
        return {"completions": completions, "matched_fragment": query[start:], "suppress": bool(completions)}

    return mlxq_matcher


def load_ipython_extension(ipython) -> None:
    """Register `%mlxq` / `%%mlxq` and put `mlxq` in the namespace (`%load_ext mlxterp`)."""
    from IPython.core.magic import Magics, line_cell_magic, magics_class

    queries = ipython.user_ns.get("mlxq")
    if not isinstance(queries, NotebookQueries):
        queries = NotebookQueries()
        ipython.user_ns["mlxq"] = queries

    @magics_class
    class MlxqMagics(Magics):
        @line_cell_magic
        def mlxq(self, line, cell=None):
            """Run query-language text (see `mlxq?` and docs/notebooks.md).

            %mlxq [--local] [--quiet] [--model NAME] [--bind NAME=EXPR ...] QUERY
            %%mlxq [options]   (the cell holds the queries)
            """
            return run_magic(self.shell, queries, line, cell)

    ipython.register_magics(MlxqMagics)
    matchers = ipython.Completer.custom_matchers
    matchers[:] = [m for m in matchers if getattr(m, "__name__", "") != "mlxq_matcher"]  # %reload_ext
    matchers.append(completion_matcher(queries))
