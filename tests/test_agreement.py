"""The language server, hover and the evaluator agree on every statement (issue 13).

Hypothesis writes statements over the demo model -- valid and invalid module names, layers in
paths and in `layers` options, positions by index, slice, list and token text -- and each one is
judged three ways with the real code: the language server's checks (`mlxterp_lsp.checks.all_findings`
over the name table the daemon sends and the model's real token strings), hover's positions
(`mlxterp_lsp.checks.positions_for`, what the hover shows) and a real `Session` running it. They
must agree: an error in one is an error in the others, at the same place, and what runs selects
the layers and positions hover shows.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlxterp.core.paths import NameTable, parse_layers
from mlxterp_lsp.checks import all_findings, inputs_of, position_statements, positions_for
from mlxterp_lsp.documents import Document
from mlxterp_repl.dsl import QueryError, Session

PROMPT = "The capital of France is"
CORRUPT = "The capital of Italy is"


class ModelLink:
    """What the checks ask the daemon for (`modules`' name table, `tokens`' strings), answered by
    the same model in this process; the table goes through JSON as it does on the wire."""

    def __init__(self, model):
        self.model = model
        self.table = NameTable.from_data(json.loads(json.dumps(model.names.table.to_data())))

    async def load_table(self):
        return self.table

    async def prompt_tokens(self, text):
        return self.model.token_strings(self.model.encode(text))


@pytest.fixture(scope="module")
def world(demo_model):
    session = Session(demo_model)
    session.execute(f'prompt "{PROMPT}"')
    return session, ModelLink(demo_model)


def judge(world, statement: str):
    """(evaluator: result or QueryError, findings on the statement's line, hover: positions or QueryError)."""
    session, link = world
    try:
        outcome = session.execute(statement)[0]
    except QueryError as error:
        outcome = error
    document = Document("file:///agreement.mlxq", f'prompt "{PROMPT}"\n{statement}')
    findings = asyncio.run(all_findings(document, link))
    findings = [f for f in findings if f.range[0] == 1]
    hover = None
    located = document.statement_at(1)
    owners = position_statements(located.statement) if located is not None else []
    if owners:
        owner = owners[0]
        lists = [asyncio.run(link.prompt_tokens(text)) for text, _ in inputs_of(document, located, owner)]
        try:
            hover = positions_for(owner, owner.position, lists)
        except QueryError as error:
            hover = error
    return outcome, findings, hover


def check(world, statement: str):
    outcome, findings, hover = judge(world, statement)
    failed = isinstance(outcome, QueryError)
    assert failed == bool(findings), (statement, outcome, [f.message for f in findings])
    if failed:  # a finding sits where the run's error points
        span = outcome.span
        assert any(f.range[1] < span.end_col - 1 and span.col - 1 < f.range[3] or span.col == span.end_col
                   for f in findings), (statement, outcome, [(f.message, f.range) for f in findings])
    if isinstance(hover, QueryError):
        assert failed, (statement, hover)
    elif not failed and hover is not None and hasattr(outcome, "positions") and outcome.positions is not None:
        shown = list(dict.fromkeys(hover)) if statement.startswith("patch") else hover  # patch runs each once
        assert list(outcome.positions) == shown, (statement, outcome.positions, hover)
    if not failed and type(outcome).__name__ == "LogitLens":
        written = statement.split(" layers ", 1)[1].split(" @")[0] if " layers " in statement else "*"
        assert list(outcome.layers) == parse_layers(written).indices(world[1].table.n_layers)
    return outcome, findings, hover


# --- the statements ---------------------------------------------------------------------------

index = st.integers(-18, 17)
layer_seg = st.one_of(
    index.map(str),
    st.tuples(index, index).map(lambda t: f"{t[0]}..{t[1]}"),
    st.lists(index, min_size=1, max_size=3).map(lambda v: "[" + ", ".join(map(str, v)) + "]"),
    st.just("*"),
)
path = st.one_of(
    st.sampled_from(["embed", "norm", "lm_head", "embd", "foo", "output", "mlp", "layers"]),
    st.tuples(layer_seg.map(lambda s: s.replace(" ", "")),
              st.sampled_from(["", ".mlp", ".attn", ".self_attn.q_proj", ".mpl", ".self_attn.q_prj", ".mlp.*"]))
    .map(lambda t: f"layers.{t[0]}{t[1]}"),
)
texts = st.sampled_from(["France", " France", "France ", "ance ", "", "capital", "Berlin", "The", " ", "<s>", "is",
                         "Italy"]).map(lambda t: json.dumps(t))
small = st.integers(-8, 8)
item = st.one_of(small.map(str), texts)
position = st.one_of(
    item,
    st.tuples(st.one_of(st.none(), small), st.one_of(st.none(), small))
    .map(lambda t: f"{'' if t[0] is None else t[0]}:{'' if t[1] is None else t[1]}")
    .filter(lambda s: s != ":"),
    st.lists(item, min_size=1, max_size=3).map(lambda v: "[" + ", ".join(v) + "]"),
    st.just("*"),
)
save = st.tuples(path, position).map(lambda t: f"save {t[0]} @ {t[1]}")
lens = st.tuples(layer_seg, position).map(lambda t: f"lens layers {t[0]} @ {t[1]} top 1")
patch = st.tuples(st.sampled_from(["mlp", "attn", "layer", "mpl", "self_attn.q_proj"]), index, item).map(
    lambda t: f'patch {t[0]} clean "{PROMPT}" corrupt "{CORRUPT}" layers {t[1]} @ {t[2]}')
statement = st.one_of(save, lens, patch)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(statement)
@example('save layers.3 @ "ance "')
@example('save layers.3 @ ""')
@example("lens layers 20")
@example(f'patch mlp clean "{PROMPT}" corrupt "{CORRUPT}" layers 30')
@example("save layers.7..0.mlp @ -1")
def test_language_server_hover_and_evaluator_agree(world, statement):
    check(world, statement)


# --- the disagreements issue 13 found, one by one ---------------------------------------------

def test_text_that_is_only_part_of_a_token_selects_nothing_anywhere(world):
    outcome, findings, hover = check(world, 'save layers.3 @ "ance "')  # the evaluator used to pick " France"
    assert isinstance(outcome, QueryError) and "did you mean 'France'" in outcome.message
    assert [f.code for f in findings] == ["token"] and isinstance(hover, QueryError)
    outcome, findings, hover = check(world, 'save layers.3 @ "France "')  # spaces around are ignored
    assert not isinstance(outcome, QueryError) and hover == [4] and not findings


def test_empty_token_text_is_the_same_error_everywhere(world):
    outcome, findings, hover = check(world, 'save layers.3 @ ""')  # hover used to show position 0
    assert isinstance(outcome, QueryError) and 'empty token text ""' in outcome.message
    assert isinstance(hover, QueryError) and hover.message == outcome.message
    assert len(findings) == 1 and findings[0].message.startswith(outcome.message)


def test_layers_options_out_of_range_are_found_by_the_language_server(world):
    for statement in ("lens layers 20", f'patch mlp clean "{PROMPT}" corrupt "{CORRUPT}" layers 30',
                      "lens layers 0..16", "lens layers [3, -17]"):
        outcome, findings, _ = check(world, statement)
        assert isinstance(outcome, QueryError) and [f.code for f in findings] == ["layer-index"]


def test_descending_ranges_mean_the_same_in_paths_and_options(world):
    saved, findings, _ = check(world, "save layers.7..0 @ -1")  # was refused as a path
    assert not findings and [label for label, _ in saved.arrays] == [f"layers.{i}" for i in range(7, -1, -1)]
    lens, findings, _ = check(world, "lens layers 7..0 @ -1 top 1")
    assert not findings and list(lens.layers) == list(range(7, -1, -1))


def test_language_server_and_core_import_no_mlx():
    code = ("import sys, mlxterp.core, mlxterp.errors, mlxterp_lsp.server, mlxterp_lsp.checks, mlxterp_repl.dsl.selection;"
            "print(sorted(m for m in ('mlx', 'mlx.core') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
    code = "import sys, mlxterp.core; print('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
