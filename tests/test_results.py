"""The library's typed results: guide-style access, data round trips, terminal and notebook views.

Also the query language's `lens` served from the trace cache and its `top` honoured
(issue 14, items 3 and 4)."""

from __future__ import annotations

import io
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

from mlxterp.results import (ActivationPatching, ActivationStats, AttentionPatterns, LogitLens, TextResult,
                             TokenPredictions, ValuesResult, result_from_data)
from mlxterp_repl import protocol as p
from mlxterp_repl.dsl import QueryError, Session, TraceCache

PROMPT = "The capital of France is"
CLEAN, CORRUPT = "Paris is the capital of France", "London is the capital of France"


@pytest.fixture(scope="module")
def results(demo_model):
    """One result of every type, made by the library's own functions."""
    model = demo_model
    with model.trace(PROMPT):
        hidden = model.layers[8].output.save()
    return {
        "lens": model.logit_lens(PROMPT, layers=[0, 8, 15], top_k=2),
        "lens_at": model.logit_lens(PROMPT, layers=[4, 15], top_k=3, position=-1),
        "predictions": model.get_token_predictions(hidden[0, -1], top_k=4),
        "batch_predictions": model.get_token_predictions(hidden[0], top_k=2, return_scores=True),
        "patching": model.activation_patching(CLEAN, CORRUPT, component="mlp", layers=[0, 7, 15]),
        "grid": model.activation_patching(CLEAN, CORRUPT, component="layer", layers=[0, 3], positions=[0, -1]),
        "attention": model.get_attention_patterns(PROMPT, layers=[0, 3]),
        "stats": ActivationStats.of({"layers.8": np.array(hidden[0]), "x": np.arange(5.0)}, title="hidden"),
        "values": ValuesResult([("layers.8", np.array(hidden[0, -1]))], kind="save", name="h", where="at -1"),
        "text": TextResult("prompt set", kind="prompt", fields={"tokens": ["a", "b"]}, notes=["a note"]),
    }


def drawn(result, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(result)  # through __rich__
    return console.file.getvalue()


def test_every_result_round_trips_through_its_data(results):
    for name, result in results.items():
        data = result.to_data()
        assert data["kind"] == result.kind and "text" not in data
        rebuilt = type(result).from_data(data)
        assert rebuilt == result, name
        assert result_from_data(data) == result, name
        wire = p.unpack_body(p.pack({"r": data})[4:], arrays=True)["r"]  # as a daemon client gets it
        assert result_from_data(wire) == result, name
        assert drawn(result_from_data(wire)) == drawn(result), name


def test_every_result_draws_in_a_terminal_and_in_a_notebook(results):
    for name, result in results.items():
        text = drawn(result)
        assert text.strip() and "\x1b" not in text, name
        page = result._repr_html_()
        assert page.startswith("<table") and "</table>" in page, name
        assert 0 < len(result.summary(40)) <= 40, name
        assert result.to_data(text=True)["text"].strip(), name


def test_logit_lens_keeps_the_guides_structure(results, demo_model):
    lens = results["lens"]
    assert isinstance(lens, LogitLens) and sorted(lens) == [0, 8, 15] and len(lens) == 3
    n = len(demo_model.encode(PROMPT))
    assert len(lens[15]) == n and len(lens[15][-1]) == 2
    token_id, score, token = lens[15][-1][0]
    assert isinstance(token_id, int) and isinstance(score, float) and token == demo_model.token_to_str(token_id)
    assert lens.to_dict()[8] == lens[8] and dict(lens.items()) == lens.to_dict()
    at = results["lens_at"]
    assert list(at) == [4, 15] and [t for t, _, _ in at[15][:2]] == [t for t, _, _ in lens[15][-1]]
    for layer, predictions in at.items():
        assert len(predictions) == 3 and all(len(cell) == 3 for cell in predictions)
    assert token in drawn(lens) and token in lens._repr_html_()


def test_token_predictions_are_the_documented_lists(results, demo_model):
    ids = results["predictions"]
    assert isinstance(ids, TokenPredictions) and len(ids) == 4 and all(isinstance(i, int) for i in ids)
    assert ids == list(ids) and ids[0] == ids.predictions[0][0][0]
    rows = results["batch_predictions"]
    assert len(rows) == len(demo_model.encode(PROMPT)) and all(len(row) == 2 for row in rows)
    token_id, logit = rows[-1][0]
    assert isinstance(logit, float) and demo_model.token_to_str(token_id) in drawn(rows)


def test_patching_keeps_the_guides_structure(results):
    patching = results["patching"]
    assert isinstance(patching, ActivationPatching) and list(patching) == [0, 7, 15]
    best = sorted(patching.items(), key=lambda x: x[1], reverse=True)[0]
    assert patching.best()[0] == best[0] and isinstance(best[1], float)
    assert patching == patching.to_dict() and f"{patching[7]:+.1f}%" in drawn(patching)
    grid = results["grid"]
    n = grid.positions[-1] + 1
    assert grid.positions == [0, n - 1] and set(grid[3]) == {0, n - 1}
    assert f"{grid[3][n - 1]:+.1f}" in drawn(grid) and f"{grid[3][n - 1]:.4g}" in grid._repr_html_()


def test_attention_patterns_are_arrays_per_layer(results):
    patterns = results["attention"]
    assert isinstance(patterns, AttentionPatterns) and list(patterns) == [0, 3]
    assert isinstance(patterns[3], mx.array) and patterns[3].shape[0] == 1
    rebuilt = result_from_data(patterns.to_data())
    assert isinstance(rebuilt[3], np.ndarray) and np.allclose(rebuilt[3], np.array(patterns[3]))
    head, key, probability = patterns.strongest(3)[0]
    assert f"{probability:.3f}" in drawn(patterns)


def test_activation_stats_have_one_row_per_module(results):
    stats = results["stats"]
    assert list(stats) == ["layers.8", "x"]
    assert stats["x"]["mean"] == 2.0 and stats["x"]["max"] == 4.0 and stats["x"]["first"] == [0, 1, 2, 3, 4]
    label, shape, norm, mean, std, low, high = stats.rows[1]
    assert (label, shape, low, high) == ("x", "(5,)", 0.0, 4.0) and np.isclose(norm, np.linalg.norm(np.arange(5.0)))
    assert "<td>x</td>" in stats._repr_html_()


def test_a_plot_is_embedded_in_the_notebook_view(demo_model, tmp_path):
    lens = demo_model.logit_lens(PROMPT, layers=[0, 15], save_path=str(tmp_path / "sub" / "lens.png"))
    assert lens.plot == str(tmp_path / "sub" / "lens.png") and Path(lens.plot).read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in lens._repr_html_()


# ---- the query language's lens (issue 14, items 3 and 4) ---------------------------------------


def test_lens_is_served_by_the_trace_cache_and_a_later_save_reuses_it(demo_model):
    session, cache = Session(demo_model), TraceCache()
    session.execute(f'prompt "{PROMPT}"')
    [first] = session.execute("lens", trace_cache=cache)
    assert (cache.misses, cache.hits) == (1, 0)
    [again] = session.execute("lens @ -1 top 3", trace_cache=cache)
    [saved] = session.execute("save layers.15 @ -1", trace_cache=cache)
    assert (cache.misses, cache.hits) == (1, 2) and len(cache) == 1
    assert again[15][0][0] == first[15][-1][0][0] == demo_model.logit_lens(PROMPT, layers=[15])[15][-1][0][0]
    [steered] = session.execute("with layers.3 scale 1.0: lens", trace_cache=cache)  # another run: a miss
    assert cache.misses == 2 and steered.to_dict() == first.to_dict()


def test_lens_honours_top_or_says_why_not(demo_model):
    session = Session(demo_model)
    session.execute(f'prompt "{PROMPT}"')
    [grid] = session.execute("lens @ [0,-1] top 2 layers 14..15")
    assert grid.positions == [0, len(demo_model.encode(PROMPT)) - 1] and grid.top_k == 2
    second = grid[15][1][1][2]  # the second-ranked token at the last position
    assert repr(second).strip("'") in drawn(grid) or second.strip() in drawn(grid)
    [wide] = session.execute("lens @ -1 top 500 layers 15")
    assert wide.top_k == 500 and len(wide[15]) == 500 and "top 10 of 500" in drawn(wide)
    with pytest.raises(QueryError, match="vocabulary has \\(1996\\)"):
        session.execute("lens top 5000")


def test_interventions_on_one_module_combine_in_order_whatever_name_they_use(demo_model):
    from mlxterp import interventions as iv

    steering = {"layers.3": iv.scale(2.0)}
    patch = {demo_model.resolve("layers.3"): lambda a: a + 1.0, "layers.4": iv.zero_out}
    merged = iv.combined(steering, patch, resolve=demo_model.expand)
    assert sorted(merged) == sorted([demo_model.resolve("layers.3"), demo_model.resolve("layers.4")])
    assert merged[demo_model.resolve("layers.3")](mx.array([1.0, -2.0])).tolist() == [3.0, -3.0]  # scale, then add
    assert iv.combined({"a": iv.zero_out}, None) == {"a": iv.zero_out}
