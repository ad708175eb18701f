"""`mlxterp lsp`: the language server for `.mlxq` files (pygls, stdio).

One thin handler per LSP feature, each translating between LSP types and the query
language (`mlxterp_repl.dsl`, parsing only) or the daemon (through `DaemonLink`). Per
document state lives in `documents.py`, checks in `checks.py`, inline results in
`inline.py`. The server never imports mlx: the model lives in the daemon, which this
server starts when it needs one. See docs/lsp.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import re
import signal
import sys

from lsprotocol import types
from pygls.exceptions import FeatureNotificationError
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol

from mlxterp_repl.dsl import ast
from mlxterp.core.paths import is_layer_segment, split_path
from mlxterp_repl.dsl.complete import CompletionContext, complete
from mlxterp_repl.dsl.errors import QueryError
from mlxterp.core.statements import OPTIONS, STATEMENTS

from mlxterp_lsp import __version__, python_files
from mlxterp_lsp.checks import Finding, all_findings, input_of, inputs_of, module_paths, parse_findings, positions_for, variable_findings
from mlxterp_lsp.documents import Document, from_client, lex_chunk, to_client, walk
from mlxterp_lsp.inline import InlineResult, apply_edit, full_text, recheck, summary_text
from mlxterp_lsp.link import DaemonLink, DaemonUnavailable, Settings

log = logging.getLogger(__name__)

RUN_COMMAND = "mlxterp.run"
INFO_COMMAND = "mlxterp.serverInfo"
RESULTS_NOTIFICATION = "mlxterp/results"
TRIGGERS = [".", "@", "$", '"', "'"]  # ' for Python files (python_files.py)
TOKEN_TYPES = ["keyword", "namespace", "enumMember", "string", "variable", "number", "operator"]
COMPLETION_KINDS = {
    "statement": types.CompletionItemKind.Keyword, "keyword": types.CompletionItemKind.Keyword,
    "module": types.CompletionItemKind.Module, "variable": types.CompletionItemKind.Variable,
    "token": types.CompletionItemKind.Constant, "intervention": types.CompletionItemKind.Function,
    "metric": types.CompletionItemKind.EnumMember, "function": types.CompletionItemKind.Function,
    "value": types.CompletionItemKind.Value,
}
POSITION_NODES = (ast.Index, ast.Match, ast.Slice, ast.PositionList, ast.AllPositions)


class MlxqProtocol(LanguageServerProtocol):
    """Also stops a running `mlxterp.run` when the client cancels its request."""

    def _handle_cancel_notification(self, msg_id):
        super()._handle_cancel_notification(msg_id)
        task = self._server.runs_by_request.get(msg_id)
        if task is not None:
            task.cancel()


class MlxqServer(LanguageServer):
    def __init__(self):
        super().__init__("mlxterp-lsp", __version__, protocol_cls=MlxqProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.settings = Settings()
        self.link = DaemonLink(self.settings, on_change=self.daemon_changed)
        self.documents: dict[str, Document] = {}
        self.results: dict[str, list[InlineResult]] = {}
        self.run_errors: dict[str, list[tuple[Finding, str]]] = {}  # finding, text of its line when it ran
        self.pending: dict[str, asyncio.Task] = {}
        self.warming: asyncio.Task | None = None
        self.runs_by_token: dict[str, asyncio.Task] = {}
        self.runs_by_request: dict[object, asyncio.Task] = {}
        self.tokens = itertools.count(1)

    # --- helpers used by the handlers ------------------------------------------

    @property
    def utf16(self) -> bool:
        encoding = getattr(self.server_capabilities, "position_encoding", None)
        return encoding in (None, types.PositionEncodingKind.Utf16)

    def client_supports(self, *path: str) -> bool:
        value = self.client_capabilities
        for name in path:
            value = getattr(value, name, None)
            if value is None:
                return False
        return bool(value)

    def document(self, uri: str) -> Document:
        document = self.documents.get(uri)
        if document is None:
            text = self.workspace.get_text_document(uri).source
            kind = python_files.PythonDocument if python_files.is_python(uri) else Document
            document = self.documents[uri] = kind(uri, text)
        return document

    def position(self, document: Document, position: types.Position) -> tuple[int, int]:
        line = max(0, min(position.line, len(document.lines) - 1))
        return line, from_client(document.lines[line], position.character, self.utf16)

    def lsp_range(self, document: Document, r) -> types.Range:
        line, col, end_line, end_col = r
        last = len(document.lines) - 1
        line, end_line = max(0, min(line, last)), max(0, min(end_line, last))
        start = types.Position(line, to_client(document.lines[line], col, self.utf16))
        end = types.Position(end_line, to_client(document.lines[end_line], end_col, self.utf16))
        return types.Range(start, end)

    def diagnostic(self, document: Document, finding: Finding) -> types.Diagnostic:
        related = [types.DiagnosticRelatedInformation(types.Location(document.uri, self.lsp_range(document, r)), text)
                   for r, text in finding.related] or None
        return types.Diagnostic(range=self.lsp_range(document, finding.range), message=finding.message,
                                severity=types.DiagnosticSeverity.Error, source="mlxterp", code=finding.code,
                                related_information=related,
                                data={"suggestions": finding.suggestions} if finding.suggestions else None)

    # --- diagnostics -------------------------------------------------------------

    def schedule_diagnostics(self, uri: str, delay: float | None = None) -> None:
        old = self.pending.pop(uri, None)
        if old is not None and not old.done():
            old.cancel()
        delay = self.settings.debounce_ms / 1000 if delay is None else delay
        self.pending[uri] = self.background(self.publish_diagnostics(uri, delay))

    def background(self, coroutine) -> asyncio.Task:
        """A task whose failure is shown to the user (pygls only reports handler failures)."""
        task = asyncio.get_running_loop().create_task(coroutine)

        def done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                error = task.exception()
                log.error("background task failed", exc_info=error)
                self.report_server_error(error, FeatureNotificationError)

        task.add_done_callback(done)
        return task

    async def publish_diagnostics(self, uri: str, delay: float) -> None:
        await asyncio.sleep(delay)
        document = self.documents.get(uri)
        if document is None:
            return
        version = document.version
        runs = [finding for finding, _source in self.run_errors.get(uri, [])]
        if isinstance(document, python_files.PythonDocument):
            findings = python_files.findings(document, self.link.table) if self.link.connected else []
            if not self.link.modules:
                self.warm_up()
        elif self.link.connected and self.link.modules:
            findings = await all_findings(document, self.link)
        else:
            findings = parse_findings(document) + variable_findings(document)
            self.warm_up()
        if self.documents.get(uri) is not document or document.version != version:
            return
        checked_lines = {f.range[0] for f in findings}
        runs = [f for f in runs if f.range[0] not in checked_lines]  # the static check already says it
        diagnostics = [self.diagnostic(document, f) for f in findings + runs]
        self.text_document_publish_diagnostics(
            types.PublishDiagnosticsParams(uri=uri, diagnostics=diagnostics, version=version))

    def warm_up(self) -> None:
        """Connect to the daemon and read the module tree in the background, then re-check."""
        if self.warming is not None and not self.warming.done():
            return

        async def run():
            try:
                await self.link.load_modules()
            except DaemonUnavailable as exc:
                log.info("daemon not available: %s", exc)
                return
            except Exception as exc:  # noqa: BLE001
                log.warning("could not read the module tree: %s", exc)
                return
            for uri in list(self.documents):
                self.schedule_diagnostics(uri, 0)

        self.warming = self.background(run())

    def daemon_changed(self) -> None:
        for uri in list(self.documents):
            self.schedule_diagnostics(uri, 0)

    # --- inline results -------------------------------------------------------------

    def show_results(self, uri: str) -> None:
        document = self.documents.get(uri)
        if document is None:
            return
        limit = self.settings.inline_max_length
        results = self.results.get(uri, [])
        payload = {"uri": uri, "version": document.version,
                   "results": [r.to_data(limit) for r in sorted(results, key=lambda r: r.line)]}
        self.protocol.notify(RESULTS_NOTIFICATION, payload)
        if self.client_supports("workspace", "inlay_hint", "refresh_support"):
            self.workspace_inlay_hint_refresh(None)

    def store_result(self, uri: str, document: Document, line: int, data, statement_text: str) -> None:
        limit = self.settings.inline_max_length
        results = [r for r in self.results.get(uri, []) if r.line != line]
        results.append(InlineResult(line=line, source=document.lines[line], summary=summary_text(data, limit),
                                    full=full_text(data, statement_text)))
        self.results[uri] = results


server = MlxqServer()


# --- lifecycle ------------------------------------------------------------------------

@server.feature(types.INITIALIZE)
def initialize(ls: MlxqServer, params: types.InitializeParams):
    ls.settings = Settings.from_options(params.initialization_options)
    ls.link.settings = ls.settings


@server.feature(types.INITIALIZED)
def initialized(ls: MlxqServer, params: types.InitializedParams):
    ls.warm_up()


@server.feature(types.SHUTDOWN)
async def shutdown(ls: MlxqServer, params):
    await ls.link.close()


# --- documents --------------------------------------------------------------------------

@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: MlxqServer, params: types.DidOpenTextDocumentParams):
    item = params.text_document
    kind = python_files.PythonDocument if python_files.is_python(item.uri, item.language_id) else Document
    ls.documents[item.uri] = kind(item.uri, item.text, item.version)
    ls.schedule_diagnostics(item.uri, 0)


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: MlxqServer, params: types.DidChangeTextDocumentParams):
    uri = params.text_document.uri
    results = ls.results.get(uri, [])
    document = ls.documents.get(uri)
    if results and document is not None:
        lines = list(document.lines)
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start, end = change.range.start, change.range.end
                if not 0 <= start.line <= end.line < len(lines):
                    continue
                lines = apply_edit(results, lines, (start.line, from_client(lines[start.line], start.character, ls.utf16)),
                                   (end.line, from_client(lines[end.line], end.character, ls.utf16)), change.text)
    text = ls.workspace.get_text_document(uri).source
    if document is None:
        document = ls.documents[uri] = Document(uri, text, params.text_document.version)
    else:
        document.set_text(text)
        document.version = params.text_document.version
    if uri in ls.results:
        ls.results[uri] = recheck(results, document.lines)
    if uri in ls.run_errors:
        ls.run_errors[uri] = [(f, source) for f, source in ls.run_errors[uri]
                              if f.range[0] < len(document.lines) and document.lines[f.range[0]] == source]
    if results:
        ls.show_results(uri)
    ls.schedule_diagnostics(uri)


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: MlxqServer, params: types.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.documents.pop(uri, None)
    ls.results.pop(uri, None)
    ls.run_errors.pop(uri, None)
    task = ls.pending.pop(uri, None)
    if task is not None:
        task.cancel()
    ls.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=uri, diagnostics=[]))


# --- completion --------------------------------------------------------------------------

@server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=TRIGGERS))
async def completion(ls: MlxqServer, params: types.CompletionParams):
    document = ls.document(params.text_document.uri)
    line, col = ls.position(document, params.position)
    if isinstance(document, python_files.PythonDocument):
        return python_completion(ls, document, line, col)
    chunk = document.chunk_at(line)
    if chunk is None:
        return types.CompletionList(is_incomplete=False, items=[])
    offset = document.chunk_offset(chunk, line, col)
    before = chunk.text[:offset]
    if not ls.link.modules:
        ls.warm_up()
    tokens = []
    if "@" in before:
        located = document.statement_at(line)
        text = None
        if located is not None:
            text, _where = input_of(document, located, located.statement)
        else:
            prompt = document.prompt_before(chunk.line0)
            text = prompt.statement.prompt.value if prompt else None
        if text is not None:
            tokens = ls.link.tokens.get(text)
            if tokens is None and ls.link.connected:
                try:
                    tokens = await asyncio.wait_for(ls.link.prompt_tokens(text), 0.5)
                except Exception:  # noqa: BLE001 -- no tokens: complete without them
                    tokens = []
    context = CompletionContext(modules=ls.link.modules, n_layers=ls.link.n_layers, table=ls.link.table,
                                variables=document.variables_before(chunk.line0), prompt_tokens=tokens or [])
    items = []
    for item in complete(chunk.text, offset, context):
        start = item.start if item.start is not None else offset
        edit_range = ls.lsp_range(document, chunk_range(document, chunk, start, offset))
        items.append(types.CompletionItem(
            label=item.label, kind=COMPLETION_KINDS.get(item.kind, types.CompletionItemKind.Text),
            detail=completion_detail(ls, item, chunk.text[:start]),
            text_edit=types.TextEdit(edit_range, item.insert_text or item.label),
            sort_text=f"{len(items):04d}"))
    # Without the module tree yet, ask the editor to come back as the user types.
    return types.CompletionList(is_incomplete=not ls.link.modules, items=items)


def chunk_range(document: Document, chunk, start: int, end: int):
    """Offsets in a chunk's text as a document range (0-based, code points)."""
    def at(offset):
        line = chunk.line0 + chunk.text.count("\n", 0, offset)
        col = offset - (chunk.text.rfind("\n", 0, offset) + 1)
        return line, col
    return (*at(start), *at(end))


def completion_detail(ls: MlxqServer, item, before: str) -> str:
    if item.kind != "module":
        return item.detail or item.kind
    typed = before.split()[-1] if before.split() else ""
    prefix = typed if typed.endswith(".") else ""
    name = prefix + item.label
    parts = [p if p.isdigit() or not is_layer_segment(p) else "0" for p in split_path(name)]  # a pattern: layer 0
    info = ls.link.modules_by_name.get(".".join(parts)) or ls.link.modules_by_name.get(name)
    if info is None:
        return item.detail or "module"
    return f"{info.get('type', item.detail)} · {info.get('params', 0):,} parameters"


# --- hover -------------------------------------------------------------------------------

@server.feature(types.TEXT_DOCUMENT_HOVER)
async def hover(ls: MlxqServer, params: types.HoverParams):
    document = ls.document(params.text_document.uri)
    line, col = ls.position(document, params.position)
    if isinstance(document, python_files.PythonDocument):
        return await python_hover(ls, document, line, col)
    chunk = document.chunk_at(line)
    if chunk is None:
        return None
    offset = document.chunk_offset(chunk, line, col)
    token = next((t for t in lex_chunk(chunk.text) if t.start <= offset <= t.end and t.kind not in ("EOF", "NEWLINE")), None)
    sections = []
    located = document.statement_at(line)
    if token is not None and located is not None:
        node = innermost(located.statement, token.span.line, token.span.col)
        sections += await describe_node(ls, document, located, node, token)
    result = next((r for r in ls.results.get(document.uri, []) if r.line == line), None)
    if result is not None:
        sections.append(("*(stale: the line changed since it ran)*\n\n" if result.stale else "") + result.full)
    if not sections:
        return None
    return types.Hover(contents=types.MarkupContent(types.MarkupKind.Markdown, "\n\n---\n\n".join(sections)))


async def ask_daemon(ls: MlxqServer, question):
    """The daemon's answer, or None when it is not connected (it is then started in the
    background: a hover never waits for a daemon to start) or cannot answer."""
    if not ls.link.connected:
        question.close()
        ls.warm_up()
        return None
    try:
        return await question
    except Exception:  # noqa: BLE001 -- the hover shows what it knows without the daemon
        return None


def innermost(statement, line: int, col: int):
    best = None
    for node in walk(statement):
        s = node.span
        if (s.line, s.col) <= (line, col) < (s.end_line, s.end_col) or (s.line, s.col) == (line, col):
            best = node
    return best


async def describe_node(ls: MlxqServer, document: Document, located, node, token) -> list[str]:
    statement = located.statement
    starts_statement = isinstance(node, ast.Statement) and (node.span.line, node.span.col) == (
        token.span.line, token.span.col)
    if token.kind == "NAME" and token.value in STATEMENTS and starts_statement:  # the statement's keyword
        return [statement_hover(token.value)]
    if isinstance(node, ast.Path):
        prefixed = next((prefix + node.text for path, prefix in module_paths(statement) if path is node), node.text)
        hook = ls.link.table.describe_hook(prefixed) if ls.link.table is not None else None
        if hook:  # a hook point (layers.8.resid_mid, layers.8.attn.z.head[3]): the core table says what it is
            return [hook]
        answer = await ask_daemon(ls, ls.link.hover(prefixed, 0))
        if isinstance(answer, dict) and answer.get("text"):
            return [answer["text"]]
        info = ls.link.modules_by_name.get(prefixed)
        if info:
            return [f"**{info.get('name')}** `{info.get('type', '?')}`\n\nparameters: {info.get('params', 0):,}"]
        return [f"module path `{node.text}`"]
    if isinstance(node, ast.Var):
        lines = [f"`${node.name}`"]
        definitions = document.definitions().get(node.name, [])
        before = [d for d in definitions if d.last_line <= located.last_line]
        if before:
            lines.append(f"defined at line {before[-1].chunk.line0 + 1}: `{before[-1].statement.text}`")
        answer = await ask_daemon(ls, ls.link.hover("$" + node.name, 0))
        if isinstance(answer, dict) and answer.get("text") and "not set" not in answer["text"]:
            lines.append(answer["text"])
        return ["\n\n".join(lines)]
    if isinstance(node, POSITION_NODES):
        owner = next((s for s in walk(statement) if getattr(s, "position", None) is not None
                      and any(n is node for n in walk(s.position))), None)
        inputs = inputs_of(document, located, owner) if owner is not None else []
        if not inputs:
            return ["position (no prompt above: set one with `prompt \"...\"`)"]
        token_lists = []
        for text, _where in inputs:
            strings = ls.link.tokens.get(text) or await ask_daemon(ls, ls.link.prompt_tokens(text))
            if strings is None:
                return [f"position in {text!r} (the tokens come from the daemon, which is not ready yet)"]
            token_lists.append(strings)
        text, strings = inputs[0][0], token_lists[0]
        try:  # the evaluator's own selection rule, so hover shows what running it selects
            chosen = positions_for(owner, node, token_lists)
        except QueryError as error:
            return [f"selects no token of {text!r}: {error.message}"]
        rows = [f"- {i}: `{strings[i]!r}`" for i in chosen[:20]]
        more = f"\n- ... {len(chosen) - 20} more" if len(chosen) > 20 else ""
        return [f"selects {len(chosen)} of {len(strings)} tokens:\n" + "\n".join(rows) + more]
    if isinstance(statement, ast.Statement):
        name = type(statement).__name__.lower()
        if name in STATEMENTS and node is statement:
            return [statement_hover(name)]
    return []


def statement_hover(name: str) -> str:
    """Markdown for a statement's keyword, from the statement table: syntax, summary, options."""
    spec = STATEMENTS[name]
    options = "".join(f"\n- `{OPTIONS[k].syntax()}`: {OPTIONS[k].description}" for k in spec.options)
    return f"```mlxq\n{spec.syntax}\n```\n{spec.summary}" + (f"\n{options}" if options else "")


# --- Python files (python_files.py): only where mlxterp names are written ----------------

def python_completion(ls: MlxqServer, document, line: int, col: int) -> types.CompletionList:
    place = python_files.place_at(document, line, col)
    if place is None:
        return types.CompletionList(is_incomplete=False, items=[])
    if not ls.link.modules:
        ls.warm_up()
    text = document.lines[line]
    items = []
    for item in python_files.candidates(place, ls.link.modules, ls.link.table):
        edit_range = types.Range(types.Position(line, to_client(text, item.start, ls.utf16)),
                                 types.Position(line, to_client(text, col, ls.utf16)))
        kind = types.CompletionItemKind.Module if item.kind == "module" else types.CompletionItemKind.Property
        items.append(types.CompletionItem(label=item.label, kind=kind, detail=item.detail or item.kind,
                                          text_edit=types.TextEdit(edit_range, item.label),
                                          sort_text=f"{len(items):04d}"))
    return types.CompletionList(is_incomplete=not ls.link.modules, items=items)


async def python_hover(ls: MlxqServer, document, line: int, col: int):
    found = python_files.name_at(document, line, col)
    if found is None or ls.link.table is None:
        if found is not None:
            ls.warm_up()
        return None
    kind, name, where = found
    modules = ls.link.modules_by_name
    fresh = await ask_daemon(ls, ls.link.call("modules"))  # shapes change with every trace
    if isinstance(fresh, dict) and fresh.get("modules"):
        modules = {m.get("name"): m for m in fresh["modules"]}
    text = python_files.hover_text(kind, name, ls.link.table, modules)
    return types.Hover(contents=types.MarkupContent(types.MarkupKind.Markdown, text),
                       range=ls.lsp_range(document, where))


# --- running queries ---------------------------------------------------------------------

@server.feature(types.TEXT_DOCUMENT_CODE_LENS)
def code_lens(ls: MlxqServer, params: types.CodeLensParams):
    document = ls.document(params.text_document.uri)
    if isinstance(document, python_files.PythonDocument):
        return []
    uri = document.uri
    zero = types.Range(types.Position(0, 0), types.Position(0, 0))
    lenses = [types.CodeLens(zero, types.Command(title="▶ Run file", command=RUN_COMMAND, arguments=[uri]))]
    for located in document.statements:
        line = located.chunk.line0
        where = types.Range(types.Position(line, 0), types.Position(line, 0))
        lenses.append(types.CodeLens(where, types.Command(title="▶ Run", command=RUN_COMMAND, arguments=[uri, line])))
    return lenses


@server.command(RUN_COMMAND)
async def run(ls: MlxqServer, *args):
    """`mlxterp.run URI [LINE]`: run the file, or the query on LINE (after the prompt above it)."""
    if not args or not isinstance(args[0], str):
        return {"ok": False, "error": "mlxterp.run takes the document URI and, optionally, a 0-based line"}
    uri = args[0]
    line = args[1] if len(args) > 1 and isinstance(args[1], int) and not isinstance(args[1], bool) else None
    if uri not in ls.documents:
        return {"ok": False, "error": f"{uri} is not open"}
    document = ls.documents[uri]
    pieces = plan_run(document, line)
    if not pieces:
        return {"ok": False, "error": "nothing to run here"}
    code = document.text if line is None else "\n".join(p.statement.text for p in pieces)
    task = asyncio.current_task()
    request_id = getattr(ls.protocol, "_ctx_msg_id", None)
    request_id = request_id.get(None) if request_id is not None else None
    token = f"mlxterp-run-{next(ls.tokens)}" if ls.client_supports("window", "work_done_progress") else None
    if request_id is not None:
        ls.runs_by_request[request_id] = task
    if token is not None:
        ls.runs_by_token[token] = task
        try:
            await ls.work_done_progress.create_async(token)
        except Exception:  # noqa: BLE001 -- the client refused: run without progress
            token = None
    try:
        outcome = await execute(ls, document, pieces, code, line, token)
        if outcome.get("lost") and not outcome["results"]:
            outcome = await execute(ls, document, pieces, code, line, None)  # the daemon died: once more
        outcome.pop("lost", None)
        return outcome
    except asyncio.CancelledError:
        return {"ok": False, "status": "interrupted", "error": "cancelled"}
    finally:
        ls.runs_by_request.pop(request_id, None)
        if token is not None:
            ls.runs_by_token.pop(token, None)


def plan_run(document: Document, line: int | None) -> list:
    if line is None:
        return list(document.statements)
    target = document.statement_at(line)
    if target is None:
        return []
    prompt = document.prompt_before(target.chunk.line0)
    return [target] if prompt is None or isinstance(target.statement, ast.Prompt) else [prompt, target]


async def execute(ls: MlxqServer, document: Document, pieces: list, code: str, line, token) -> dict:
    uri = document.uri
    progress = ls.work_done_progress
    title = "mlxterp: running " + ("the file" if line is None else f"line {line + 1}")
    if token is not None:
        progress.begin(token, types.WorkDoneProgressBegin(title=title, cancellable=True, message="connecting"))
    outcome = {"ok": True, "status": "ok", "results": 0}
    ls.run_errors[uri] = [] if line is None else [(f, s) for f, s in ls.run_errors.get(uri, [])
                                                  if f.range[0] not in {p.last_line for p in pieces}]
    client = None
    request_id = None
    try:
        try:
            client = await ls.link.get()
        except DaemonUnavailable as exc:
            return {"ok": False, "status": "error", "error": f"no daemon: {exc}"}
        request_id = client.start("exec", code=code, text=True)
        async for frame in client.frames(request_id):
            kind = frame.get("type")
            if kind == "progress" and token is not None:
                percentage = progress_percentage(frame)
                progress.report(token, types.WorkDoneProgressReport(message=str(frame.get("message", "")),
                                                                    percentage=percentage))
            elif kind == "result":
                index = frame.get("index", outcome["results"])
                outcome["results"] += 1
                if isinstance(index, int) and 0 <= index < len(pieces):
                    piece = pieces[index]
                    ls.store_result(uri, document, piece.last_line, frame.get("result"), piece.statement.text)
                    if isinstance(piece.statement, ast.Load):
                        ls.link.model_changed()
            elif kind == "error":
                error = frame.get("error") or {}
                outcome.update(ok=False, error=error.get("message", "error"), status=error.get("code", "error"))
                if error.get("code") not in ("interrupted",):
                    finding = run_finding(document, pieces, line, error)
                    if finding is not None:
                        ls.run_errors[uri].append((finding, document.lines[finding.range[0]]))
                        outcome["line"] = finding.range[0]  # 0-based, so an editor can say where
            elif kind == "done" and frame.get("status") == "interrupted":
                outcome.update(ok=False, status="interrupted")
        outcome["lost"] = client.closed
        return outcome
    except asyncio.CancelledError:
        if client is not None and request_id is not None and not client.closed:
            client.start("interrupt", target=request_id)
        raise
    finally:
        if token is not None:
            progress.end(token, types.WorkDoneProgressEnd(message=outcome.get("status", "done")))
        if ls.documents.get(uri) is document:
            ls.show_results(uri)
            ls.schedule_diagnostics(uri, 0)


def progress_percentage(frame: dict) -> int | None:
    """0..100 from a progress frame's `fraction`, or from a message starting `i/n:`."""
    fraction = frame.get("fraction")
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
        return max(0, min(100, int(100 * fraction)))
    match = re.match(r"\s*(\d+)/(\d+)\b", str(frame.get("message", "")))
    if match and int(match.group(2)) > 0:
        return max(0, min(100, int(100 * (int(match.group(1)) - 1) / int(match.group(2)))))
    return None


def run_finding(document: Document, pieces: list, line, error: dict) -> Finding | None:
    """A daemon error as a finding at the document position its span points to."""
    span = error.get("span")
    suggestions = list(error.get("suggestions") or [])
    message = error.get("message", "error")
    if not isinstance(span, dict):
        target = pieces[-1] if line is not None else pieces[0]
        return Finding(message, target.range(), "run", suggestions)
    l, c, el, ec = (int(span.get(k, 1)) for k in ("line", "col", "end_line", "end_col"))
    if line is None:
        return Finding(message, (l - 1, c - 1, el - 1, ec - 1), "run", suggestions)
    first = 1
    for piece in pieces:
        n = piece.statement.text.count("\n") + 1
        if first <= l < first + n:
            base_line = piece.chunk.line0 + piece.statement.span.line - 1
            shift_col = piece.statement.span.col - 1
            start = (base_line + l - first, c - 1 + (shift_col if l == first else 0))
            end = (base_line + el - first, ec - 1 + (shift_col if el == first else 0))
            return Finding(message, (*start, *end), "run", suggestions)
        first += n
    return Finding(message, pieces[-1].range(), "run", suggestions)


@server.feature(types.WINDOW_WORK_DONE_PROGRESS_CANCEL)
def cancel_progress(ls: MlxqServer, params: types.WorkDoneProgressCancelParams):
    task = ls.runs_by_token.get(params.token)
    if task is not None:
        task.cancel()


@server.feature(types.TEXT_DOCUMENT_INLAY_HINT, types.InlayHintOptions(resolve_provider=False))
def inlay_hints(ls: MlxqServer, params: types.InlayHintParams):
    document = ls.document(params.text_document.uri)
    first, last = params.range.start.line, params.range.end.line
    hints = []
    for result in sorted(ls.results.get(document.uri, []), key=lambda r: r.line):
        if first <= result.line <= last and result.line < len(document.lines):
            text = document.lines[result.line]
            hints.append(types.InlayHint(
                position=types.Position(result.line, to_client(text, len(text.rstrip("\r")), ls.utf16)),
                label=result.shown(ls.settings.inline_max_length), padding_left=True))
    return hints


# --- semantic tokens ----------------------------------------------------------------------

LEGEND = types.SemanticTokensLegend(token_types=TOKEN_TYPES, token_modifiers=[])


@server.feature(types.TEXT_DOCUMENT_SEMANTIC_TOKENS_FULL, LEGEND)
def semantic_tokens(ls: MlxqServer, params: types.SemanticTokensParams):
    document = ls.document(params.text_document.uri)
    if isinstance(document, python_files.PythonDocument):
        return None  # Python's colours are the Python language server's
    data, last_line, last_col = [], 0, 0
    for chunk in document.chunks:
        marks = []
        for statement in chunk.parsed.statements:
            for node in walk(statement):
                kind = node_type(node)
                if kind is not None:
                    marks.append((node.span, kind))
        for token in lex_chunk(chunk.text):
            kind = token_type(token, marks)
            if kind is None or token.span.line != token.span.end_line:
                continue
            line = chunk.line0 + token.span.line - 1
            text = document.lines[line] if line < len(document.lines) else ""
            col = to_client(text, token.span.col - 1, ls.utf16)
            length = to_client(text, token.span.end_col - 1, ls.utf16) - col
            if length <= 0:
                continue
            delta_line = line - last_line
            data += [delta_line, col - last_col if delta_line == 0 else col, length, TOKEN_TYPES.index(kind), 0]
            last_line, last_col = line, col
    return types.SemanticTokens(data=data)


def node_type(node) -> str | None:
    if isinstance(node, ast.Path):
        return "namespace"
    if isinstance(node, ast.Var):
        return "variable"
    if isinstance(node, POSITION_NODES):
        return "enumMember"
    if isinstance(node, ast.String):
        return "string"
    if isinstance(node, (ast.Number, ast.Layers)):
        return "number"
    return None


def token_type(token, marks) -> str | None:
    inside = [(span, kind) for span, kind in marks
              if (span.line, span.col) <= (token.span.line, token.span.col)
              and (token.span.end_line, token.span.end_col) <= (span.end_line, span.end_col)]
    if inside:
        span, kind = min(inside, key=lambda m: (m[0].end_line - m[0].line, m[0].end_col - m[0].col))
        return kind
    return {"NAME": "keyword", "STRING": "string", "NUMBER": "number", "VAR": "variable",
            "AT": "operator", "COLON": "operator"}.get(token.kind)


# --- introspection ------------------------------------------------------------------------

@server.command(INFO_COMMAND)
def server_info(ls: MlxqServer, *args):
    """What the server process holds: used by tests and for bug reports."""
    return {
        "version": __version__,
        "mlx_loaded": "mlx" in sys.modules or any(name.startswith("mlx.") for name in sys.modules),
        "daemon_connected": ls.link.connected,
        "daemon_id": ls.link.daemon_id,
        "daemon_pid": (ls.link.client.hello or {}).get("pid") if ls.link.connected else None,
        "modules": len(ls.link.modules),
        "last_error": ls.link.last_error,
    }


# --- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxterp lsp", description="Language server for .mlxq files (stdio).")
    parser.add_argument("--stdio", action="store_true", help="talk over stdin/stdout (the default; editors pass it)")
    parser.add_argument("--log-file", help="write the server's log here (stderr by default)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    options = parser.parse_args(argv)
    try:
        logging.basicConfig(filename=options.log_file, level=logging.DEBUG if options.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    except OSError as error:
        print(f"mlxterp lsp: cannot write the log file {options.log_file}: {error.strerror}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():  # someone typed `mlxterp lsp`; an editor gives it pipes
        # Nothing to save without an editor: leave at once, whatever the event loop is doing.
        signal.signal(signal.SIGINT, lambda *_: os._exit(0))
        print("mlxterp lsp: a language server speaking LSP on stdin/stdout; your editor starts it "
              "(docs/lsp.md). Ctrl-C leaves.", file=sys.stderr)
    try:
        server.start_io()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
