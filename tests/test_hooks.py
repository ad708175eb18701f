"""Hook points on the demo model: reading, saving and intervening on them from Python and the
query language, head selection, positions, run_with_cache, embed/unembed/final_norm, and what
completion, hover and diagnostics say of them through the core table."""

import mlx.core as mx
import numpy as np
import pytest

from mlxterp import interventions as iv
from mlxterp.core.paths import NameTable
from mlxterp.errors import MlxterpError, UnknownModuleError
from mlxterp_lsp.checks import module_paths, path_findings
from mlxterp_lsp.documents import Document
from mlxterp_repl.dsl.complete import CompletionContext, complete
from mlxterp_repl.dsl.errors import QueryError
from mlxterp_repl.dsl.evaluator import Session

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(demo_model):
    return demo_model


@pytest.fixture(scope="module")
def cache(model):
    names = [f"layers.*.{h}" for h in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")]
    return model.run_with_cache(PROMPT, names=names + ["layers.8.attn", "layers.8.attn.z", "layers.8.attn.q",
                                                       "layers.8.attn.pattern"])


def test_residual_stream_invariants_hold_exactly_on_the_demo(model, cache):
    _, c = cache
    for n in range(model.n_layers):
        if n + 1 < model.n_layers:
            assert mx.array_equal(c["resid_post", n], c["resid_pre", n + 1])
        # resid_mid is read from the post-attention norm's input: the model's own sum
        assert mx.array_equal(c["resid_mid", n], c["resid_pre", n] + c["attn_out", n])
        assert mx.array_equal(c["resid_post", n], c["resid_mid", n] + c["mlp_out", n])


def test_heads_z_concatenated_through_o_proj_is_the_attention_output(model, cache):
    _, c = cache
    z = c["layers.8.attn.z"]
    assert z.shape == (1, 6, 4, 32)
    out = model.module("layers.8.attn.o_proj")(z.reshape(1, 6, -1))
    assert np.allclose(np.array(out), np.array(c["layers.8.attn"]), atol=1e-4)
    assert c["layers.8.attn.q"].shape == (1, 6, 4, 32)
    pattern = c["layers.8.attn.pattern"]
    assert pattern.shape == (1, 4, 6, 6) and np.allclose(np.array(pattern.sum(-1)), 1.0, atol=1e-5)


def test_head_selection_reads_one_head_or_several(model):
    with model.trace(PROMPT) as trace:
        z = trace.activations["layers.8.attn.z"]
        head = model.layers[8].attn.z.head[3].save()
        pair = trace.activations["layers.8.attn.z.head[1,3]"]
        pattern = trace.activations["layers.8.attn.pattern.head[2]"]
    assert mx.array_equal(head, z[:, :, 3])
    assert mx.array_equal(pair, z[:, :, [1, 3]])
    assert pattern.shape == (1, 6, 6)
    with pytest.raises(UnknownModuleError, match="4 heads"):
        model.resolve("layers.8.attn.z.head[4]")


def test_python_proxies_save_hook_points_and_module_inputs(model, cache):
    _, c = cache
    with model.trace(PROMPT):
        pre = model.layers[9].resid_pre.save()
        given = model.layers[9].input.save()
    assert mx.array_equal(pre, c["resid_pre", 9]) and mx.array_equal(given, pre)
    assert mx.array_equal(pre, c["layers.8.resid_post"])


def test_ablating_mlp_out_removes_only_the_mlps_contribution(model, cache):
    _, clean = cache
    with model.trace(PROMPT, interventions={"layers.4.mlp_out": iv.zero_out}) as trace:
        post = trace.activations["layers.4.resid_post"]
        mid = trace.activations["layers.4.resid_mid"]
    assert mx.array_equal(mid, clean["resid_mid", 4])  # attention ran as before
    assert mx.array_equal(post, mid)  # the block added nothing after it
    with model.trace(PROMPT, interventions={"layers.4": iv.zero_out}) as trace:
        wiped = trace.activations["layers.4.resid_post"]
    assert not mx.any(wiped).item()  # the old way: the residual stream itself is gone


def test_ablating_one_head_changes_only_that_head(model, cache):
    _, clean = cache
    with model.trace(PROMPT, interventions={"layers.8.attn.z.head[3]": iv.zero_out}) as trace:
        z = trace.activations["layers.8.attn.z"]
        out = trace.activations["layers.8.attn"]
    assert not mx.any(z[:, :, 3]).item()
    assert mx.array_equal(z[:, :, :3], clean["layers.8.attn.z"][:, :, :3])
    expected = model.module("layers.8.attn.o_proj")(z.reshape(1, 6, -1))
    assert np.allclose(np.array(out), np.array(expected), atol=1e-4)
    assert not np.allclose(np.array(out), np.array(clean["layers.8.attn"]), atol=1e-3)


def test_patching_one_head_from_another_prompt(model):
    other = "The capital of Japan is"
    with model.trace(other) as trace:
        source = trace.activations["layers.8.attn.z.head[3]"]
    with model.trace(PROMPT, interventions={"layers.8.attn.z.head[3]": iv.replace_with(source)}) as trace:
        patched = trace.activations["layers.8.attn.z.head[3]"]
    assert mx.array_equal(patched, source)


def test_resid_mid_and_input_interventions(model, cache):
    _, clean = cache
    with model.trace(PROMPT, interventions={"layers.6.resid_mid": iv.zero_out}) as trace:
        mid = trace.activations["layers.6.resid_mid"]
        post = trace.activations["layers.6.resid_post"]
    assert not mx.any(mid).item()
    assert mx.array_equal(post, trace.activations["layers.6.mlp_out"])
    with model.trace(PROMPT, interventions={"layers.9.input": iv.scale(2.0)}) as trace:
        given = trace.activations["layers.9.resid_pre"]
    assert mx.array_equal(given, 2.0 * clean["resid_pre", 9])


def test_q_k_v_and_pattern_are_read_only(model):
    with pytest.raises(MlxterpError, match="read-only"):
        with model.trace(PROMPT, interventions={"layers.3.attn.pattern": iv.zero_out}):
            pass


def test_add_vector_at_positions_and_any_intervention_at_positions(model, cache):
    _, clean = cache
    vector = mx.ones((model.hidden_size,))
    with model.trace(PROMPT, interventions={"layers.5.resid_post": iv.add_vector(vector, positions=[-1, 0])}) as trace:
        steered = trace.activations["layers.5.resid_post"]
    delta = np.array(steered - clean["resid_post", 5])[0]
    assert np.allclose(delta[[0, 5]], 1.0, atol=1e-4) and not delta[1:5].any()
    with model.trace(PROMPT, interventions={"layers.5.mlp_out": iv.at_positions(iv.zero_out, slice(2, 4))}) as trace:
        mlp = np.array(trace.activations["layers.5.mlp_out"])[0]
    assert not mlp[2:4].any() and mlp[[0, 1, 4, 5]].any()
    with pytest.raises(MlxterpError, match="position 9"):
        with model.trace(PROMPT, interventions={"layers.5": iv.at_positions(iv.zero_out, [9])}):
            pass


def test_run_with_cache_names_as_string_list_function_or_none(model):
    logits, one = model.run_with_cache(PROMPT, names="layers.3.resid_post")
    assert list(one) == [model.resolve("layers.3.resid_post")]
    assert mx.array_equal(logits, model(PROMPT))
    _, several = model.run_with_cache(PROMPT, names=["layers.3.mlp_out", "layers.2.attn.z.head[0]"])
    assert len(several) == 2 and several["layers.2.attn.z.head[0]"].shape == (1, 6, 32)
    _, chosen = model.run_with_cache(PROMPT, names=lambda name: name.endswith(".attn_out"))
    assert len(chosen) == model.n_layers
    _, every = model.run_with_cache(PROMPT)
    assert "layers.15.resid_mid" in every and "layers.0.mlp.down_proj" in every
    assert "layers.0.attn.pattern" not in every  # recomputed ones are asked for by name
    with pytest.raises(KeyError, match="not in this cache"):
        one["layers.4.resid_post"]


def test_embed_final_norm_and_unembed(model, cache):
    logits, c = cache
    assert mx.array_equal(model.embed(PROMPT), c["resid_pre", 0])  # llama feeds the embedding unscaled
    last = c["resid_post", model.n_layers - 1]
    assert np.allclose(np.array(model.unembed(model.final_norm(last))), np.array(logits), atol=1e-3)
    assert mx.array_equal(model.unembed(last, norm=True), model.unembed(model.final_norm(last)))


# -- the query language ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def session(model):
    session = Session(model)
    session.execute(f'prompt "{PROMPT}"')
    return session


def value(session, query):
    return session.execute(query)[-1].arrays[0][1]


def test_query_language_saves_hook_points_heads_and_inputs(session, cache):
    _, c = cache
    assert np.array_equal(value(session, "save layers.8.resid_mid @ -1"), np.array(c["resid_mid", 8])[0, -1])
    assert np.array_equal(value(session, "save layers.9.input @ -1"), np.array(c["resid_pre", 9])[0, -1])
    head = value(session, "save layers.8.attn.z.head[3] @ -1")
    assert np.array_equal(head, np.array(c["layers.8.attn.z"])[0, -1, 3])
    pattern = value(session, "save layers.8.attn.pattern.head[0..1] @ -1")
    assert pattern.shape == (2, 6)  # two heads' rows of the last query


def test_query_language_interventions_on_hook_points_heads_and_positions(session, cache):
    _, c = cache
    assert not value(session, "with layers.4.mlp_out zero: save layers.4.mlp_out").any()
    z = value(session, "with layers.8.attn.z.head[3] zero @ -1: save layers.8.attn.z")
    assert not z[-1, 3].any() and np.array_equal(z[:-1], np.array(c["layers.8.attn.z"])[0, :-1])
    mid = value(session, 'with layers.6.resid_mid zero @ "France": save layers.6.resid_mid')
    assert not mid[4].any() and mid[3].any()
    session.execute('save layers.6 @ -1 in "The capital of Japan is" as $japan')
    session.execute("steer layers.6.resid_post add $japan * 0.5 @ -1")
    try:
        post = value(session, "save layers.6.resid_post")
    finally:
        session.execute("steer clear")
    assert np.allclose(post[:-1], np.array(c["resid_post", 6])[0, :-1])
    assert not np.allclose(post[-1], np.array(c["resid_post", 6])[0, -1])


def test_query_language_errors_name_what_is_wrong(session):
    with pytest.raises(QueryError, match="4 heads"):
        session.execute("save layers.8.attn.z.head[7]")
    with pytest.raises(QueryError, match="read-only"):
        session.execute("with layers.8.attn.q zero: lens @ -1")


# -- completion, hover and diagnostics through the core table -------------------------------

def test_completion_offers_hook_points_after_a_layer_and_an_attention(model):
    context = CompletionContext(table=NameTable.from_data(model.names.table.to_data()), n_layers=model.n_layers)
    after_layer = {c.label for c in complete("save layers.8.", len("save layers.8."), context)}
    assert {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "input", "mlp"} <= after_layer
    after_attn = {c.label for c in complete("save layers.8.attn.", len("save layers.8.attn."), context)}
    assert {"q", "k", "v", "z", "pattern", "o_proj"} <= after_attn


def test_diagnostics_and_hover_of_hook_points(model):
    table = NameTable.from_data(model.names.table.to_data())
    document = Document("u", "save layers.8.resid_mad\nsave layers.8.attn.z.head[9]\nsave layers.8.attn.z.head[2]\n")
    findings = []
    for located in document.statements:
        for path, prefix in module_paths(located.statement):
            findings.append(path_findings(table, located, path, prefix))
    assert findings[0] and "layers.8.resid_mid" in findings[0][0].suggestions
    assert findings[1] and "4 heads" in findings[1][0].message
    assert findings[2] == []
    assert "between attention and MLP" in table.describe_hook("layers.8.resid_mid")
    assert table.describe_hook("layers.8.mlp") is None


def test_the_repl_session_completes_hook_points(session):
    context = session.completion_context()
    found = {c.label for c in complete("save layers.3.attn.", len("save layers.3.attn."), context)}
    assert {"z", "pattern", "q_proj"} <= found


def test_python_files_check_hook_point_names_in_strings_and_attribute_chains(model):
    from mlxterp_lsp.python_files import PythonDocument, findings

    table = NameTable.from_data(model.names.table.to_data())
    text = ('with model.trace(p, interventions={"layers.4.mlp_out": f, "layers.8.attn.z.head[3]": g}) as t:\n'
            '    a = t.activations["layers.8.resid_mad"]\n'
            '    b = model.layers[8].attn.z.head[3].save()\n'
            '    c = model.layers[9].resid_pre.save()\n')
    found = findings(PythonDocument("file:///x.py", text), table)
    assert [f.message.split(";")[0] for f in found] == ["no module named 'layers.8.resid_mad'"]
