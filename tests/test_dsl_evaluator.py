"""The evaluator on the demo model: each statement's values equal the library called directly."""

import math

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

import mlxterp.interventions as iv
from mlxterp.errors import Interrupted
from mlxterp_repl.dsl import QueryError, Session, TraceCache
from mlxterp_repl.dsl.results import result_from_data

PROMPT = "The capital of France is"
CLEAN = "Paris is the capital of France"
CORRUPT = "London is the capital of France"


@pytest.fixture
def model(demo_model):
    return demo_model


@pytest.fixture
def session(model):
    s = Session(model)
    s.execute(f'prompt "{PROMPT}"')
    return s


def run(session, text, **options):
    (result,) = session.execute(text, **options)
    return result


def traced(model, text, name, interventions=None):
    """One module's output (1, L, ...) from the library directly; name "output" = logits."""
    with model.trace(text, interventions=interventions) as tr:
        if name == "output":
            value = model.output.save()
        else:
            value = tr.activations[name]
    return np.array(value.astype(mx.float32))


def error_of(session, text):
    with pytest.raises(QueryError) as info:
        session.execute(text)
    return info.value


# ---- save and positions ------------------------------------------------------------------


def test_save_equals_the_library_trace(session, model):
    result = run(session, "save layers.8 @ -1")
    ((label, array),) = result.arrays
    assert label == "layers.8"
    with model.trace(PROMPT):
        expected = model.layers[8].output.save()
    np.testing.assert_allclose(array, np.array(expected)[0, -1], rtol=1e-6)


def test_save_pattern_gives_one_array_per_module_in_layer_order(session, model):
    result = run(session, "save layers.*.mlp @ 2 as $mlps")
    names = model.expand("layers.*.mlp")
    assert [label for label, _ in result.arrays] == [model.short_name(n) for n in names]
    for (_, array), name in zip(result.arrays, names):
        np.testing.assert_allclose(array, traced(model, PROMPT, name)[0, 2], rtol=1e-6)
    assert session.variables["mlps"] is result


def test_position_forms_select_the_right_tokens(session, model):
    tokens = model.token_strings(model.encode(PROMPT))
    full = traced(model, PROMPT, model.resolve("layers.3"))[0]
    france = next(i for i, t in enumerate(tokens) if t.strip() == "France")
    np.testing.assert_allclose(run(session, 'save layers.3 @ "France"').arrays[0][1], full[france], rtol=1e-6)
    np.testing.assert_allclose(run(session, 'save layers.3 @ "France "').arrays[0][1], full[france], rtol=1e-6)
    np.testing.assert_allclose(run(session, "save layers.3 @ 1:3").arrays[0][1], full[1:3], rtol=1e-6)
    np.testing.assert_allclose(run(session, "save layers.3 @ [0, -1]").arrays[0][1], full[[0, -1]], rtol=1e-6)
    np.testing.assert_allclose(run(session, "save layers.3 @ *").arrays[0][1], full, rtol=1e-6)
    np.testing.assert_allclose(run(session, "save layers.3").arrays[0][1], full, rtol=1e-6)


def test_save_output_in_another_input_is_its_logits(session, model):
    result = run(session, 'save output @ -1 in "Paris is"')
    np.testing.assert_allclose(result.arrays[0][1], traced(model, "Paris is", "output")[0, -1], rtol=1e-5)


def test_token_not_found_lists_the_prompt_tokens(session, model):
    error = error_of(session, 'save layers.3 @ "Germany"')
    assert error.span.col == len("save layers.3 @ ") + 1
    assert error.span.end_col == len('save layers.3 @ "Germany"') + 1
    tokens = model.token_strings(model.encode(PROMPT))
    assert len(error.suggestions) == len(tokens)
    assert "Germany" in error.message and any("France" in s for s in error.suggestions)


def test_position_out_of_range_names_the_valid_range(session):
    error = error_of(session, "save layers.3 @ 40")
    n = len(session.model.encode(PROMPT))
    assert f"0..{n - 1}" in error.message
    assert error.span.col == len("save layers.3 @ ") + 1


def test_unknown_module_suggests_the_closest(session):
    error = error_of(session, "save layers.8.mpl @ -1")
    assert (error.span.col, error.span.end_col) == (6, 18)
    assert "layers.8.mlp" in error.suggestions


def test_layer_out_of_range_gives_the_layer_range(session, model):
    error = error_of(session, "save layers.99")
    assert error.suggestions[0] == f"0..{model.n_layers - 1}"
    assert (error.span.col, error.span.end_col) == (6, 15)


def test_attn_alias_and_full_names_resolve_like_the_library(session, model):
    via_alias = run(session, "save layers.2.attn @ -1").arrays[0]
    assert via_alias[0] == model.short_name(model.resolve("layers.2.attn"))
    full = run(session, f"save {model.resolve('layers.2')} @ -1").arrays[0][1]
    np.testing.assert_allclose(full, run(session, "save layers.2 @ -1").arrays[0][1])


def test_no_prompt_and_unknown_variable_are_clear_errors(model):
    fresh = Session(model)
    assert "no prompt" in error_of(fresh, "save layers.1").message
    fresh.execute("prompt \"x\"\nsave layers.1 @ -1 as $abc")
    error = error_of(fresh, "let $y = $abd * 2")
    assert error.suggestions == ["$abc"]
    assert "no model" in error_of(Session(), "lens").message


# ---- let -----------------------------------------------------------------------------------


def test_let_arithmetic_equals_numpy_on_the_saved_values(session):
    session.execute(f'save layers.8 @ -1 in "{CLEAN}" as $paris\nsave layers.8 @ -1 in "{CORRUPT}" as $london')
    paris, london = session.variables["paris"].arrays[0][1], session.variables["london"].arrays[0][1]
    v = run(session, "let $v = $paris - $london").arrays[0][1]
    np.testing.assert_allclose(v, paris - london, rtol=1e-6)
    w = run(session, "let $w = ($paris + $london) / 2 * -1").arrays[0][1]
    np.testing.assert_allclose(w, -(paris + london) / 2, rtol=1e-6)
    n = run(session, "let $n = norm($v)").arrays[0][1]
    assert math.isclose(float(n), float(np.linalg.norm(paris - london)), rel_tol=1e-5)


def test_mean_of_a_pattern_averages_its_modules(session):
    session.execute("save layers.*.mlp @ -1 as $mlps")
    arrays = [a for _, a in session.variables["mlps"].arrays]
    m = run(session, "let $m = mean($mlps)").arrays[0][1]
    np.testing.assert_allclose(m, np.mean(arrays, axis=0), rtol=1e-5, atol=1e-7)
    session.execute("save layers.2 @ * as $all")
    positions_mean = run(session, "let $p = mean($all)").arrays[0][1]
    np.testing.assert_allclose(positions_mean, session.variables["all"].arrays[0][1].mean(axis=0), rtol=1e-5)


def test_let_shape_mismatch_is_an_error_with_the_span(session):
    session.execute("save layers.2 @ * as $all\nsave output @ -1 as $logits")
    error = error_of(session, "let $bad = $all + $logits")
    assert "do not fit" in error.message and error.span.col == len("let $bad = ") + 1


# ---- lens, predict, patch ------------------------------------------------------------------


def test_lens_grid_equals_library_logit_lens(session, model):
    result = run(session, "lens")
    expected = model.logit_lens(PROMPT)
    assert result.layers == list(expected)
    for layer, row in zip(result.layers, result.predictions):
        assert [cell[0][0] for cell in row] == [cell[0][0] for cell in expected[layer]]


def test_lens_at_a_position_gives_top_k_with_scores(session, model):
    result = run(session, "lens @ -1 top 5 layers 0..3")
    expected = model.logit_lens(PROMPT, layers=[0, 1, 2, 3], top_k=5, position=-1)
    assert result.layers == [0, 1, 2, 3]
    for layer, row in zip(result.layers, result.predictions):
        assert [(i, round(s, 4)) for i, s, _ in row[0]] == [(i, round(s, 4)) for i, s, _ in expected[layer]]


def test_lens_under_a_neutral_intervention_equals_plain_lens(session):
    plain = run(session, "lens @ -1 top 3")
    neutral = run(session, "with layers.3 scale 1.0: lens @ -1 top 3")
    assert [[i for i, _, _ in row[0]] for row in neutral.predictions] == [[i for i, _, _ in row[0]] for row in plain.predictions]
    assert neutral.notes == ["interventions: layers.3 scale 1.0"]


def test_lens_under_zero_changes_only_later_layers(session):
    plain = run(session, "lens @ -1")
    zeroed = run(session, "with layers.4 zero: lens @ -1")
    assert zeroed.predictions[:4] == plain.predictions[:4]
    assert all(abs(score) < 1e-6 for _, score, _ in zeroed.predictions[4][0])


def test_predict_equals_get_token_predictions(session, model):
    result = run(session, "predict layers.6 @ -1 top 7")
    hidden = traced(model, PROMPT, model.resolve("layers.6"))[0, -1]
    expected = model.get_token_predictions(mx.array(hidden), top_k=7, return_scores=True)
    assert [i for i, _, _ in result.rows[0][1]] == [i for i, _ in expected]
    session.execute("save layers.6 @ -1 as $h")
    assert run(session, "predict $h top 7").rows[0][1] == result.rows[0][1]


def test_patch_equals_library_activation_patching(session, model):
    result = run(session, f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" metric mse layers 0..3')
    expected = model.activation_patching(CLEAN, CORRUPT, component="mlp", layers=[0, 1, 2, 3], metric="mse")
    assert list(result.recovery) == [0, 1, 2, 3]
    for layer in expected:
        assert math.isclose(result.recovery[layer], expected[layer], rel_tol=1e-4, abs_tol=1e-4)


def test_patch_at_positions_equals_library_per_position_logit_diff(session, model):
    result = run(session, f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" @ * metric logit_diff '
                          f'answers " Paris" " London" layers 0..2')
    expected = model.activation_patching(CLEAN, CORRUPT, component="mlp", layers=[0, 1, 2], positions="all",
                                         metric="logit_diff", answers=(" Paris", " London"))
    n = len(model.encode(CLEAN))
    assert result.positions == list(range(n))
    assert result.tokens == model.token_strings(model.encode(CLEAN))
    assert list(result.recovery) == [0, 1, 2]
    for layer in expected:
        assert list(result.recovery[layer]) == list(range(n))
        for position, value in expected[layer].items():
            assert math.isclose(result.recovery[layer][position], value, rel_tol=1e-4, abs_tol=1e-4)
    assert any(abs(v) > 1 for row in expected.values() for v in row.values())  # a sweep that moved something


def test_patch_positions_by_text_and_list_equal_the_library(session, model):
    result = run(session, f'patch attn clean "{CLEAN}" corrupt "{CORRUPT}" @ ["London", -1] layers [3, 7]')
    expected = model.activation_patching(CLEAN, CORRUPT, component="attn", layers=[3, 7], positions=[1, -1])
    n = len(model.encode(CLEAN))
    assert result.positions == [1, n - 1]
    for layer in (3, 7):
        assert math.isclose(result.recovery[layer][1], expected[layer][1], rel_tol=1e-4, abs_tol=1e-4)
        assert math.isclose(result.recovery[layer][n - 1], expected[layer][n - 1], rel_tol=1e-4, abs_tol=1e-4)


def test_patch_logit_diff_without_positions_equals_the_library(session, model):
    result = run(session, f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" metric logit_diff answers " Paris" " London"')
    expected = model.activation_patching(CLEAN, CORRUPT, component="mlp", metric="logit_diff",
                                         answers=(" Paris", " London"))
    assert result.positions is None and result.answers == [" Paris", " London"]
    for layer in expected:
        assert math.isclose(result.recovery[layer], expected[layer], rel_tol=1e-4, abs_tol=1e-4)


def test_patch_grid_renders_tokens_and_round_trips(session):
    result = run(session, f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" @ 1:3 layers 0..1')
    data = result.to_data(text=True)
    assert "Paris/London" in data["text"] and "' is'" in data["text"]
    assert data["layers"] == [0, 1] and data["positions"] == [1, 2] and data["percent"].shape == (2, 2)
    again = result_from_data(data)
    assert again.recovery == result.recovery and again == result
    layer, position, value = max(((l, p, v) for l, row in result.recovery.items() for p, v in row.items()),
                                 key=lambda cell: cell[2])
    assert result.summary(60) == f"best layer {layer} @ {position}: {value:+.1f}%"


def test_patch_answer_of_several_tokens_is_an_error_at_that_answer(session):
    text = f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" metric logit_diff answers " Paris" "Paris is"'
    error = error_of(session, text)
    start = text.index('"Paris is"') + 1
    assert (error.span.col, error.span.end_col) == (start, start + len('"Paris is"'))
    assert "2 tokens" in error.message and "single token" in error.message


def test_patch_position_not_in_either_prompt_lists_the_tokens(session):
    error = error_of(session, f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" @ "Berlin"')
    assert "Berlin" in error.message and "1:Paris" in error.suggestions


def test_patch_unknown_component_lists_components(session):
    error = error_of(session, f'patch mlpp clean "{CLEAN}" corrupt "{CORRUPT}"')
    assert (error.span.col, error.span.end_col) == (7, 11)
    assert "mlp" in error.suggestions


def test_plot_writes_a_png(session, tmp_path):
    lens = run(session, f"lens layers 0..3 plot to {tmp_path}/lens.png")
    patch = run(session, f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" layers 0..1 plot to {tmp_path}/p.png')
    for path in (lens.plot, patch.plot):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- interventions -----------------------------------------------------------------------


def test_with_interventions_equal_the_library_interventions(session, model):
    result = run(session, "with layers.3 scale 0.5, layers.5 clamp -1 1: save output @ -1")
    expected = traced(model, PROMPT, "output", {"layers.3": iv.scale(0.5), "layers.5": iv.clamp(-1.0, 1.0)})
    np.testing.assert_allclose(result.arrays[0][1], expected[0, -1], rtol=1e-5, atol=1e-5)
    plain = run(session, "save output @ -1").arrays[0][1]
    assert not np.allclose(plain, result.arrays[0][1])


def test_two_interventions_on_one_module_apply_in_order(session, model):
    result = run(session, "with layers.3 scale 3, layers.3 clamp -0.5 0.5: save layers.3 @ *")
    assert float(np.abs(result.arrays[0][1]).max()) <= 0.5 + 1e-6
    expected = traced(model, PROMPT, model.resolve("layers.3"), {"layers.3": iv.compose(iv.scale(3), iv.clamp(-0.5, 0.5)).build()})
    np.testing.assert_allclose(result.arrays[0][1], expected[0], rtol=1e-6)


def test_steer_stays_on_until_cleared(session, model):
    session.execute(f'save layers.8 @ -1 in "{CLEAN}" as $paris\nsave layers.8 @ -1 in "{CORRUPT}" as $london')
    session.execute("let $v = $paris - $london\nsteer layers.5 add $v * 2.0")
    vector = session.variables["v"].arrays[0][1]
    steered = run(session, "save output @ -1").arrays[0][1]
    expected = traced(model, PROMPT, "output", {"layers.5": iv.add_vector(mx.array(vector) * 2.0)})
    np.testing.assert_allclose(steered, expected[0, -1], rtol=1e-5, atol=1e-5)
    assert run(session, "steer").fields["steering"] == ["layers.5 add $v * 2.0"]
    session.execute("steer clear")
    np.testing.assert_allclose(run(session, "save output @ -1").arrays[0][1], traced(model, PROMPT, "output")[0, -1], rtol=1e-5)


def test_replace_patches_in_a_saved_activation(session, model):
    session.execute(f'save layers.4 @ * in "{CLEAN}" as $clean')
    result = run(session, f'with layers.4 replace $clean: save output @ -1 in "{CORRUPT}"')
    clean = session.variables["clean"].arrays[0][1]
    expected = traced(model, CORRUPT, "output", {"layers.4": iv.replace_with(mx.array(clean))})
    np.testing.assert_allclose(result.arrays[0][1], expected[0, -1], rtol=1e-5, atol=1e-5)


def test_intervention_on_unknown_module_points_at_it(session):
    error = error_of(session, "with layers.4.mpl zero: lens")
    assert (error.span.col, error.span.end_col) == (6, 18)
    assert "layers.4.mlp" in error.suggestions


def test_should_stop_interrupts_a_trace(session):
    with pytest.raises(Interrupted):
        session.execute("save layers.8 @ -1", should_stop=lambda: True)


# ---- the trace cache ---------------------------------------------------------------------


def test_trace_cache_answers_repeated_questions_without_a_forward_pass(session, model):
    cache = TraceCache(64 * 2**20)
    before = model.forward_count
    first = run(session, "save layers.8 @ -1", trace_cache=cache)
    again = session.execute("stats layers.*.mlp @ -1\nsave layers.8 @ -1", trace_cache=cache)
    assert model.forward_count == before + 1
    np.testing.assert_array_equal(first.arrays[0][1], again[1].arrays[0][1])
    run(session, "with layers.2 zero: save layers.8 @ -1", trace_cache=cache)
    assert model.forward_count == before + 2
    run(session, 'save layers.8 @ -1 in "Paris is"', trace_cache=cache)
    assert model.forward_count == before + 3
    assert cache.hits == 2 and len(cache) == 3


def test_unseeded_noise_is_never_cached(session, model):
    cache = TraceCache(64 * 2**20)
    before = model.forward_count
    a = run(session, "with layers.2 noise 0.5: save layers.8 @ -1", trace_cache=cache)
    b = run(session, "with layers.2 noise 0.5: save layers.8 @ -1", trace_cache=cache)
    assert model.forward_count == before + 2 and not np.allclose(a.arrays[0][1], b.arrays[0][1])
    c = run(session, "with layers.2 noise 0.5 seed 3: save layers.8 @ -1", trace_cache=cache)
    d = run(session, "with layers.2 noise 0.5 seed 3: save layers.8 @ -1", trace_cache=cache)
    np.testing.assert_array_equal(c.arrays[0][1], d.arrays[0][1])


def test_trace_cache_evicts_least_recently_used_within_its_budget():
    cache = TraceCache(100)
    a, b, c = (mx.zeros((10,), dtype=mx.float32) for _ in range(3))  # 40 bytes each
    cache.put("a", {"x": a}, 40)
    cache.put("b", {"x": b}, 40)
    assert cache.get("a")["x"] is a  # a is now the most recent
    cache.put("c", {"x": c}, 40)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", {"x": mx.zeros((250,), dtype=mx.float32)}, 1000)
    assert cache.get("huge") is None and cache.used_bytes == 80


# ---- the other statements --------------------------------------------------------------


def test_tokens_table_matches_the_tokenizer(session, model):
    result = run(session, 'tokens "Hello world"')
    ids = model.encode("Hello world")
    assert [row[1] for row in result.rows] == ids
    assert [row[2] for row in result.rows] == model.token_strings(ids)


def test_stats_rows_match_numpy(session, model):
    result = run(session, "stats layers.0..2 @ -1")
    assert [row[0] for row in result.rows] == ["layers.0", "layers.1", "layers.2"]
    array = traced(model, PROMPT, model.resolve("layers.1"))[0, -1].astype(np.float64)
    _, _, norm, mean, std, low, high = result.rows[1]
    assert math.isclose(norm, np.linalg.norm(array), rel_tol=1e-5)
    assert math.isclose(std, array.std(), rel_tol=1e-5) and (low, high) == (array.min(), array.max())


def test_export_writes_npz_and_safetensors(session, tmp_path):
    from safetensors.numpy import load_file

    session.execute("save layers.*.mlp @ -1 as $mlps")
    run(session, f"export $mlps to {tmp_path}/acts.safetensors")
    loaded = load_file(str(tmp_path / "acts.safetensors"))
    for label, array in session.variables["mlps"].arrays:
        np.testing.assert_array_equal(loaded[label], array)
    run(session, f"export layers.8 @ * to {tmp_path}/l8.npz")
    np.testing.assert_array_equal(np.load(tmp_path / "l8.npz")["layers.8"], run(session, "save layers.8").arrays[0][1])
    error = error_of(session, f"export $mlps to {tmp_path}/acts.txt")
    assert "acts.npz" in error.suggestions


def test_ls_lists_a_layer_and_its_children(session, model):
    result = run(session, "ls layers.0")
    names = [row[0] for row in result.rows]
    assert names[0] == "layers.0" and "layers.0.mlp" in names and "layers.1" not in names
    by_name = {m["name"]: m for m in model.module_info()}
    assert all(row[2] == by_name[row[0]]["params"] for row in result.rows)


def test_info_and_help(session, model):
    info = run(session, "info")
    assert info.fields["model"]["layers"] == model.n_layers
    assert "lens" in [row[0] for row in run(session, "help").rows]
    assert run(session, "help patch").fields["syntax"].startswith("patch COMPONENT")
    assert error_of(session, "help pach").suggestions[0] == "patch"


def test_an_error_keeps_the_results_before_it(session):
    with pytest.raises(QueryError) as info:
        session.execute("save layers.1 @ -1\nsave layers.1 @ 99\nlens")
    assert [r.kind for r in info.value.results] == ["save"]
    assert info.value.span.line == 2


# ---- result views --------------------------------------------------------------------------


def plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, bytes, np.ndarray))


def test_every_result_renders_summarises_and_serialises(session, tmp_path):
    script = "\n".join([
        "tokens", "save layers.*.mlp @ -1 as $m", "let $x = mean($m) * 2", "lens", "lens @ -1 top 3",
        "predict layers.6 @ -1", f'patch mlp clean "{CLEAN}" corrupt "{CORRUPT}" layers 0..1',
        "steer layers.2 scale 1.0", "steer clear", "ls", "stats layers.0", f"export $m to {tmp_path}/m.npz",
        "info", "help", "help lens",
    ])
    results = session.execute(script)
    console = Console(file=open(tmp_path / "out.txt", "w"), width=100)
    for result in results:
        data = result.to_data()
        assert data["kind"] == result.kind and plain(data)
        console.print(result.render())
        assert 0 < len(result.summary(40)) <= 40
    saved = results[1].to_data()["arrays"][0]
    np.testing.assert_array_equal(saved["array"], session.variables["m"].arrays[0][1])
