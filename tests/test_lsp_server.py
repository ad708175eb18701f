"""`mlxterp lsp` end to end: a real server process driven by pytest-lsp, impersonating VS Code
and Neovim 0.7, with a real daemon holding the demo model in a private runtime directory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from lsprotocol import types
from pytest_lsp import client_capabilities

from daemon_support import start_daemon
from mlxterp_repl.client import connect
from lsp_support import (CLI_SERVER, CLIENTS, URI, change_document, daemon_pid, diagnostics_for, open_document, start_server,
                         stop_daemon, stop_server, wait_for)

MODEL = os.environ.get("MLXTERP_LSP_TEST_MODEL", "demo")  # a stand-in model directory while developing

DOC = types.TextDocumentIdentifier(URI)

QUERIES = """\
prompt "The capital of France is"
save layers.8 @ "France" as $paris
save layers.3.mpl @ -1
save layers.40 @ -1
save layers.2 @ "Berlin"
predict $london top 3
lens @ -1 top 3
let $london = $paris * 2
"""


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lsp-rt")
    daemon = start_daemon(directory, model=MODEL)
    with connect(runtime_dir=directory, autostart=False) as client:
        client.modules()  # returns once the model is loaded, so no test pays for loading it
    yield directory
    daemon.stop()
    stop_daemon(directory)


@pytest.fixture(params=CLIENTS)
async def lsp(request, runtime_dir):
    client = await start_server(runtime_dir, request.param, {"model": MODEL})
    client.name = request.param
    yield client
    await stop_server(client)


def position(line, character):
    return types.Position(line, character)


async def model_diagnostics(client, version=1):
    """Diagnostics once the model-dependent checks have run (they need the module tree)."""
    return await diagnostics_for(client, version, where=lambda found: any(d.code == "unknown-module" for d in found))


# --- diagnostics -----------------------------------------------------------------------

async def test_parse_error_is_reported_with_its_span_and_the_valid_statements(lsp):
    open_document(lsp, 'prompt "hi"\nsav layers.1\n')
    found = await diagnostics_for(lsp, 1, where=lambda d: bool(d))
    [error] = [d for d in found if d.code == "parse"]
    assert (error.range.start.line, error.range.start.character, error.range.end.character) == (1, 0, 3)
    assert "not a statement" in error.message
    assert "save" in error.data["suggestions"]


async def test_model_checks_name_closest_modules_layer_range_missing_tokens_and_names(lsp):
    open_document(lsp, QUERIES)
    found = await model_diagnostics(lsp)
    by_code = {}
    for d in found:
        by_code.setdefault(d.code, []).append(d)
    [module] = by_code["unknown-module"]
    assert module.range.start.line == 2 and "layers.3.mlp" in module.data["suggestions"]
    [layer] = by_code["layer-index"]
    assert layer.range.start.line == 3 and "out of range" in layer.message
    assert lsp_text(layer) == "40"
    [token] = by_code["token"]
    assert token.range.start.line == 4 and "Berlin" in token.message and "France" in token.message
    [related] = token.related_information
    assert related.location.range.start.line == 0  # points at the prompt statement
    [name] = by_code["unknown-name"]
    assert name.range.start.line == 5 and "$london" in name.message
    assert name.related_information[0].location.range.start.line == 7  # its (later) definition


def lsp_text(diagnostic):
    line = QUERIES.split("\n")[diagnostic.range.start.line]
    return line[diagnostic.range.start.character:diagnostic.range.end.character]


@pytest.mark.parametrize("lsp", ["visual-studio-code"], indirect=True)
async def test_fixing_a_line_clears_its_diagnostic(lsp):
    open_document(lsp, QUERIES)
    await model_diagnostics(lsp)
    change_document(lsp, 2, (2, 14), (2, 17), "mlp")
    found = await diagnostics_for(lsp, 2, where=lambda d: not any(x.code == "unknown-module" for x in d))
    assert any(d.code == "layer-index" for d in found)


# --- completion and hover ------------------------------------------------------------------

async def completion(client, line, character, trigger=None):
    context = types.CompletionContext(types.CompletionTriggerKind.TriggerCharacter, trigger) if trigger else None
    result = await client.text_document_completion_async(types.CompletionParams(DOC, position(line, character), context))
    return {item.label: item for item in result.items}


async def test_completion_lists_modules_names_tokens_and_statements_with_kind_and_detail(lsp):
    open_document(lsp, 'prompt "The capital of France is"\nsave layers.8 as $paris\nsave layers.8.\npredict $\nsave layers.8 @ "\nsa')
    modules = await wait_for_items(lsp, 2, 14, ".")
    assert {"mlp", "self_attn", "attn"} <= set(modules)
    assert modules["mlp"].kind == types.CompletionItemKind.Module
    assert "parameters" in modules["mlp"].detail
    names = await completion(lsp, 3, 9, "$")
    assert list(names) == ["$paris"] and names["$paris"].kind == types.CompletionItemKind.Variable
    tokens = await completion(lsp, 4, 17, '"')
    assert '"France"' in tokens and tokens['"France"'].kind == types.CompletionItemKind.Constant
    statements = await completion(lsp, 5, 2)
    assert set(statements) == {"save", "sae"} and statements["save"].kind == types.CompletionItemKind.Keyword


async def wait_for_items(client, line, character, trigger):
    """Completion items, once the server has read the module tree from the daemon."""
    deadline = time.monotonic() + 30
    while True:
        items = await completion(client, line, character, trigger)
        if items or time.monotonic() > deadline:
            return items
        await asyncio.sleep(0.1)


async def hover_text(client, line, character):
    result = await client.text_document_hover_async(types.HoverParams(DOC, position(line, character)))
    return result.contents.value if result else ""


async def test_hover_shows_module_type_selected_token_and_statement_help(lsp):
    open_document(lsp, QUERIES)
    await model_diagnostics(lsp)
    module = await hover_text(lsp, 1, 8)
    assert "layers.8" in module and "parameters" in module
    token = await hover_text(lsp, 1, 17)
    assert "France" in token and "selects 1" in token
    help_text = await hover_text(lsp, 6, 1)
    assert "logit lens" in help_text


# --- running queries, inline results --------------------------------------------------------

async def run(client, *arguments):
    return await client.workspace_execute_command_async(types.ExecuteCommandParams("mlxterp.run", list(arguments)))


async def inlay_hints(client):
    return await client.text_document_inlay_hint_async(
        types.InlayHintParams(DOC, types.Range(position(0, 0), position(100, 0))))


RUNNABLE = 'prompt "The capital of France is"\nsave layers.8 @ "France" as $paris\nlens @ -1 top 3\n'


async def test_code_lens_runs_the_file_and_results_appear_at_the_end_of_their_lines(lsp):
    open_document(lsp, RUNNABLE)
    lenses = await lsp.text_document_code_lens_async(types.CodeLensParams(DOC))
    assert lenses[0].command.title.endswith("Run file") and list(lenses[0].command.arguments) == [URI]
    assert [list(lens.command.arguments) for lens in lenses[1:]] == [[URI, 0], [URI, 1], [URI, 2]]
    outcome = await run(lsp, *lenses[0].command.arguments)
    assert outcome["ok"] and outcome["results"] == 3
    notice = await wait_for(lambda: lsp.results_notifications and lsp.results_notifications[-1])
    shown = {r["line"]: r for r in notice["results"]}
    assert set(shown) == {0, 1, 2}
    assert all(len(r["text"]) <= 40 and not r["stale"] for r in shown.values())
    assert "$paris" in shown[1]["text"]
    if lsp.name == "visual-studio-code":
        hints = await inlay_hints(lsp)
        lines = RUNNABLE.split("\n")
        assert [(h.position.line, h.position.character) for h in hints] == [(i, len(lines[i])) for i in range(3)]
        assert all(len(h.label) <= 40 for h in hints)
        # VS Code 1.65's capabilities do not declare inlayHint refresh support, so none is sent.
        assert lsp.inlay_refreshes == 0
    full = await hover_text(lsp, 1, 2)
    assert "norm" in full and "save layers.8" in full


@pytest.mark.parametrize("lsp", ["neovim@v0.7.0"], indirect=True)
async def test_running_one_line_runs_it_after_the_prompt_above(lsp):
    open_document(lsp, RUNNABLE)
    outcome = await run(lsp, URI, 2)
    assert outcome["ok"] and outcome["results"] == 2
    notice = await wait_for(lambda: lsp.results_notifications and lsp.results_notifications[-1])
    assert {r["line"] for r in notice["results"]} == {0, 2}


async def test_edited_line_result_is_stale_and_results_follow_inserted_lines(lsp):
    open_document(lsp, RUNNABLE)
    await run(lsp, URI)
    await wait_for(lambda: lsp.results_notifications)
    change_document(lsp, 2, (1, 14), (1, 14), " ")  # edit line 1
    change_document(lsp, 3, (0, 0), (0, 0), "# a comment\n")  # push everything down one line
    notice = await wait_for(lambda: lsp.results_notifications[-1]["version"] == 3 and lsp.results_notifications[-1])
    shown = {r["line"]: r for r in notice["results"]}
    assert set(shown) == {1, 2, 3}
    assert shown[2]["stale"] and "stale" in shown[2]["text"]
    assert not shown[1]["stale"] and not shown[3]["stale"]
    if lsp.name == "visual-studio-code":
        hints = await inlay_hints(lsp)
        assert [h.position.line for h in hints] == [1, 2, 3]
        assert "stale" in hints[1].label and "stale" not in hints[0].label


async def test_inlay_hints_are_refreshed_after_a_run_when_the_client_supports_it(runtime_dir):
    capabilities = client_capabilities("visual-studio-code")
    capabilities.workspace.inlay_hint = types.InlayHintWorkspaceClientCapabilities(refresh_support=True)
    client = await start_server(runtime_dir, options={"model": MODEL}, capabilities=capabilities)
    try:
        open_document(client, RUNNABLE)
        assert (await run(client, URI))["ok"]
        await wait_for(lambda: client.inlay_refreshes >= 1)
        assert len(await inlay_hints(client)) == 3
    finally:
        await stop_server(client)


def long_run(n: int) -> list[str]:
    """Queries that each run the model (a new prompt every time, so the trace cache cannot help)."""
    lines = []
    for i in range(n):
        lines += [f'prompt "text number {i} for the model"', "save layers.*.mlp"]
    return lines


async def test_cancelling_a_long_run_interrupts_the_daemon(runtime_dir):
    client = await start_server(runtime_dir, "visual-studio-code", {"model": MODEL})
    try:
        lines = long_run(400)
        open_document(client, "\n".join(lines))
        started = time.monotonic()
        task = asyncio.ensure_future(run(client, URI))
        reports = await wait_for(lambda: next((r for r in client.progress_reports.values() if len(r) >= 3), None))
        [token] = [t for t, r in client.progress_reports.items() if r is reports]
        assert reports[0].cancellable
        client.window_work_done_progress_cancel(types.WorkDoneProgressCancelParams(token=token))
        outcome = await asyncio.wait_for(task, 10)
        assert outcome["status"] == "interrupted" and not outcome["ok"]
        assert isinstance(client.progress_reports[token][-1], types.WorkDoneProgressEnd)
        assert time.monotonic() - started < 15
        # The daemon is free again: a short run goes through.
        open_document(client, RUNNABLE, uri=URI.replace("query", "other"))
        again = await run(client, URI.replace("query", "other"))
        assert again["ok"] and again["results"] == 3
    finally:
        await stop_server(client)


async def test_cancel_request_of_a_run_interrupts_the_daemon(runtime_dir):
    client = await start_server(runtime_dir, "neovim@v0.7.0", {"model": MODEL})
    try:
        lines = long_run(1000)
        open_document(client, "\n".join(lines))
        request = asyncio.ensure_future(client.protocol.send_request_async(
            types.WORKSPACE_EXECUTE_COMMAND, types.ExecuteCommandParams("mlxterp.run", [URI]), msg_id="long-run"))
        await wait_for(lambda: any(len(r) >= 3 for r in client.progress_reports.values()))
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="long-run"))
        with pytest.raises(Exception, match="cancel"):
            await asyncio.wait_for(request, 10)
        cancelled = time.monotonic()
        open_document(client, RUNNABLE, uri=URI.replace("query", "other"))
        again = await run(client, URI.replace("query", "other"))
        assert again["ok"] and again["results"] == 3
        assert time.monotonic() - cancelled < 5  # the 1,000 queries left did not keep the daemon busy
    finally:
        await stop_server(client)


# --- the process ------------------------------------------------------------------------------

def test_importing_the_server_does_not_import_mlx():
    code = "import sys, mlxterp_lsp.server; assert not [m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_server_starts_the_daemon_and_reconnects_after_it_dies(tmp_path):
    client = await start_server(tmp_path, "neovim@v0.7.0", {"model": MODEL}, command=CLI_SERVER)
    try:
        open_document(client, RUNNABLE)
        first = await run(client, URI)
        assert first["ok"]
        pid = daemon_pid(tmp_path)
        assert pid is not None
        info = await client.workspace_execute_command_async(types.ExecuteCommandParams("mlxterp.serverInfo"))
        assert info["daemon_pid"] == pid and not info["mlx_loaded"]
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: daemon_pid(tmp_path) != pid or not os.path.exists(f"/proc/{pid}"))
        second = await run(client, URI)
        assert second["ok"] and second["results"] == 3
        assert daemon_pid(tmp_path) not in (None, pid)
    finally:
        await stop_server(client)
        stop_daemon(tmp_path)


# --- fuzz -----------------------------------------------------------------------------------

FRAGMENTS = ['save ', 'lens ', 'prompt ', 'let ', 'with ', 'steer ', 'patch ', 'predict ', 'layers', '.', '..', '*',
             '@ ', '$x', '$', '"', '\\', '\n', ' ', '# ', '-1', '8', '99', ':', ',', '=', 'mlp', 'attn', 'in ', 'as ',
             'top ', '(', ')', '😀', '\t', 'France', '[1,3]', 'zero', 'scale 2', '"The capital of France is"']


async def test_no_request_on_arbitrary_text_raises(runtime_dir):
    import random

    rng = random.Random(1234)
    client = await start_server(runtime_dir, "visual-studio-code", {"model": MODEL})
    try:
        for n in range(30):
            uri = f"file:///tmp/mlxterp-fuzz/{n}.mlxq"
            text = "".join(rng.choice(FRAGMENTS) if rng.random() < 0.9 else chr(rng.randrange(32, 0x2FFF))
                           for _ in range(rng.randrange(1, 60)))
            open_document(client, text, uri=uri)
            doc = types.TextDocumentIdentifier(uri)
            lines = text.split("\n")
            for _ in range(3):
                line = rng.randrange(len(lines) + 1)
                where = types.Position(line, rng.randrange(len(lines[line]) + 3) if line < len(lines) else 0)
                await client.text_document_completion_async(types.CompletionParams(doc, where))
                await client.text_document_hover_async(types.HoverParams(doc, where))
            await client.text_document_semantic_tokens_full_async(types.SemanticTokensParams(doc))
            await client.text_document_code_lens_async(types.CodeLensParams(doc))
            await client.text_document_inlay_hint_async(types.InlayHintParams(doc, types.Range(position(0, 0), position(99, 0))))
            line = rng.randrange(len(lines))
            change_document(client, 2, (line, 0), (line, len(lines[line])), rng.choice(FRAGMENTS), uri=uri)
            await diagnostics_for(client, 2, uri=uri)
        errors = [m.message for m in client.messages if m.type == types.MessageType.Error]
        assert errors == []
    finally:
        await stop_server(client)
