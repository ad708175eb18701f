"""`mlxterp lsp` in Python files, end to end: a real server process driven by pytest-lsp as VS Code
and as Neovim 0.7 would, with a real daemon holding the demo model. The server answers only
where mlxterp names are written (activations, interventions, capture, expand, layer chains)."""

from __future__ import annotations

import asyncio

import pytest
from lsprotocol import types

from daemon_support import start_daemon
from lsp_support import CLIENTS, diagnostics_for, start_server, stop_daemon, stop_server
from mlxterp_repl.client import connect

pytestmark = pytest.mark.slow

URI = "file:///tmp/mlxterp-test/analysis.py"
DOC = types.TextDocumentIdentifier(URI)

SOURCE = '''\
from mlxterp import InterpretableModel
import mlxterp.interventions as iv

model = InterpretableModel("demo")
with model.trace("The capital of France is", capture=["layers.8.mlp", "layers.*.attn"],
                 interventions={"layers.3.mlp": iv.scale(2.0), "layers.40": iv.zero_out}) as trace:
    out = model.layers[8].mlp.output.save()
    late = model.layers[20].output.save()
    typo = model.layers[2].mpl.output.save()
x = trace.activations["layers.8.mlp"]
y = trace.activations["layrs.8"]
names = model.expand("layers.0..3.mlp")
print("layrs.8 is just a string here", {"layers.99": 1})
'''


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lsp-py-rt")
    daemon = start_daemon(directory, model="demo")
    with connect(runtime_dir=directory, autostart=False) as client:
        client.modules()  # the model is loaded before the tests ask
    yield directory
    daemon.stop()
    stop_daemon(directory)


@pytest.fixture(params=CLIENTS)
async def lsp(request, runtime_dir):
    client = await start_server(runtime_dir, request.param, {"model": "demo"})
    yield client
    await stop_server(client)


def open_python(client, text: str, uri: str = URI) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))


async def labels_at(client, line: int, character: int, uri: str = URI) -> list[str]:
    """Completion labels once the server has the model's names (it asks the daemon on first use)."""
    for _ in range(300):
        result = await client.text_document_completion_async(
            types.CompletionParams(types.TextDocumentIdentifier(uri), types.Position(line, character)))
        if result is not None and not result.is_incomplete:
            return [item.label for item in result.items]
        await asyncio.sleep(0.05)
    raise AssertionError("the server never had the model's module names")


async def test_completion_in_activations_string_offers_sub_modules(lsp):
    text = 'with model.trace("hi") as trace:\n    a = trace.activations["layers.8.'
    open_python(lsp, text)
    labels = await labels_at(lsp, 1, len(text.split("\n")[1]))
    assert {"mlp", "self_attn", "input_layernorm"} <= set(labels)
    assert "*" not in labels  # one module goes here, not a pattern


async def test_completion_text_edit_replaces_only_the_typed_segment(lsp):
    line = "    a = trace.activations['layers.8.se"
    open_python(lsp, "with model.trace('hi') as trace:\n" + line)
    labels = await labels_at(lsp, 1, len(line))
    assert labels == ["self_attn"]
    result = await lsp.text_document_completion_async(types.CompletionParams(DOC, types.Position(1, len(line))))
    edit = result.items[0].text_edit
    assert (edit.range.start.character, edit.range.end.character) == (len(line) - 2, len(line))


async def test_completion_after_layer_index_offers_modules_and_hook_points(lsp):
    line = "    h = model.layers[8]."
    open_python(lsp, "with model.trace('hi'):\n" + line)
    labels = await labels_at(lsp, 1, len(line))
    assert {"mlp", "self_attn", "output", "input"} <= set(labels)
    assert not any(label[0].isdigit() for label in labels)


async def test_completion_in_capture_and_intervention_keys_offers_patterns(lsp):
    line = 'model.trace("hi", interventions={"layers.3": f(1, 2), "layers.'
    open_python(lsp, line)
    labels = await labels_at(lsp, 0, len(line))
    assert "*" in labels and "0..15" in labels and "3" in labels
    line = 'model.trace("hi", capture=["layers.2.mlp", "lay'
    other = "file:///tmp/mlxterp-test/capture.py"
    open_python(lsp, line, other)
    assert await labels_at(lsp, 0, len(line), other) == ["layers"]


async def test_no_completion_in_other_strings_or_code(lsp):
    open_python(lsp, 'print("layers.8.\nx = config.layers.')
    for line, character in ((0, 16), (1, 18)):
        result = await lsp.text_document_completion_async(
            types.CompletionParams(DOC, types.Position(line, character)))
        assert result is None or not result.items


async def test_diagnostics_name_unknown_modules_and_layers_out_of_range(lsp):
    open_python(lsp, SOURCE)
    found = await diagnostics_for(lsp, 1, uri=URI, where=lambda d: len(d) >= 4)
    by_line = {d.range.start.line: d for d in found}
    assert sorted(by_line) == [5, 7, 8, 10]  # nothing on the valid names nor on line 12's plain strings
    key = by_line[5]
    assert key.code == "layer-index" and "out of range" in key.message and "16 layers" in key.message
    assert SOURCE.split("\n")[5][key.range.start.character:key.range.end.character] == "layers.40"
    late = by_line[7]
    assert late.code == "layer-index" and SOURCE.split("\n")[7][late.range.start.character:late.range.end.character] == "20"
    typo = by_line[8]
    assert typo.code == "unknown-module" and "layers.2.mlp" in typo.data["suggestions"]
    assert SOURCE.split("\n")[8][typo.range.start.character:typo.range.end.character] == "mpl"
    unknown = by_line[10]
    assert unknown.code == "unknown-module" and unknown.data["suggestions"][0] == "layers.8"


async def hover_at(client, line: int, character: int) -> str | None:
    result = await client.text_document_hover_async(types.HoverParams(DOC, types.Position(line, character)))
    return None if result is None else result.contents.value


async def test_hover_shows_module_and_the_shape_of_the_last_trace(lsp, runtime_dir):
    open_python(lsp, SOURCE)
    await labels_at(lsp, 9, 30)  # the server has the names once completion is complete
    line = SOURCE.split("\n")[9]
    text = await hover_at(lsp, 9, line.index("layers.8.mlp") + 3)
    assert "layers.8.mlp" in text and "model.model.layers.8.mlp" in text and "MLP" in text
    assert "output shape" not in text  # nothing traced yet
    with connect(runtime_dir=runtime_dir, autostart=False) as notebook:  # another session traces
        notebook.exec('save layers.8.mlp @ -1 in "The capital of France is"')
        n_tokens = len(notebook.tokens("The capital of France is")["ids"])
        hidden = notebook.hello["model"]["hidden_size"]
        text = await hover_at(lsp, 9, line.index("layers.8.mlp") + 3)
    assert f"output shape: (1, {n_tokens}, {hidden})" in text
    assert await hover_at(lsp, 12, 10) is None  # a plain string is not ours


async def test_python_files_get_no_code_lens_or_semantic_tokens_and_no_mlx(lsp):
    open_python(lsp, SOURCE)
    assert not await lsp.text_document_code_lens_async(types.CodeLensParams(DOC))
    tokens = await lsp.text_document_semantic_tokens_full_async(types.SemanticTokensParams(DOC))
    assert tokens is None or tokens.data == []
    info = await lsp.workspace_execute_command_async(types.ExecuteCommandParams("mlxterp.serverInfo", []))
    assert info["mlx_loaded"] is False


# --- where names are found (no server) ------------------------------------------------------

def test_names_are_found_only_where_mlxterp_reads_them():
    from mlxterp_lsp.python_files import PythonDocument

    text = '''\
model.trace(x, capture="layers.3")   # capture="layers.4" in a comment
t.activations[f"layers.{i}"], t.activations["a\\\\b"], d["layers.5"], print("layers.6")
model.trace(x, interventions={"layers.7": f("layers.8", k=[1, 2]), 'layers.9': g})
'''
    document = PythonDocument("file:///x.py", text)
    assert [(s.kind, s.text) for s in document.sites] == [
        ("pattern", "layers.3"), ("pattern", "layers.7"), ("pattern", "layers.9")]
    line, col, _, end = document.sites[2].range
    assert text.split("\n")[line][col:end] == "layers.9"
