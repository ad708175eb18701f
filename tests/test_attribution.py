"""Heads and components on the demo model: direct logit attribution, head patching, attribution
patching (against exact patching: agreement and speed) and per-head attention heatmaps."""


import mlx.core as mx
import numpy as np
import pytest

from architectures import ARCHITECTURES

from mlxterp import attribution as at
from mlxterp import interventions as iv
from mlxterp.errors import InputError
from mlxterp.results import result_from_data

PROMPT = "The capital of France is"
CLEAN, CORRUPT, ANSWERS = "The capital of France is", "The capital of Japan is", (" Paris", " Tokyo")


@pytest.fixture(scope="module")
def dla(demo_model):
    return demo_model.direct_logit_attribution(PROMPT, " Paris", " London")


@pytest.fixture(scope="module")
def estimates(demo_model):
    return demo_model.attribution_patching(CLEAN, CORRUPT, ANSWERS)


@pytest.fixture(scope="module")
def exact(demo_model):
    return at.exact_patching(demo_model, CLEAN, CORRUPT, ANSWERS)


def logit_difference(model, text, a, b, interventions=None):
    with model.trace(text, interventions=interventions):
        logits = model.output.save()[0, -1]
    return (logits[a] - logits[b]).item()


# ---- direct logit attribution ----------------------------------------------------------------


def test_dla_parts_sum_to_the_models_logit_difference(demo_model, dla):
    paris, london = demo_model.encode(" Paris")[-1], demo_model.encode(" London")[-1]
    assert dla.logit == pytest.approx(logit_difference(demo_model, PROMPT, paris, london), rel=1e-4)
    assert dla.total == pytest.approx(dla.logit, rel=1e-3)
    assert len(dla.labels) == 1 + 2 * demo_model.n_layers


def test_dla_of_one_component_from_the_weights(demo_model, dla):
    # layer 10's attention output through RMSNorm (scale of the final residual) and the lm_head rows.
    base = demo_model.model.model
    with demo_model.trace(PROMPT):
        attn = demo_model.layers[10].attn.output.save()[0, -1]
        final = demo_model.layers[-1].output.save()[0, -1]
    norm = base.norm
    scale = mx.rsqrt(mx.mean(final * final) + norm.eps)
    head = demo_model.model.lm_head.weight
    paris, london = demo_model.encode(" Paris")[-1], demo_model.encode(" London")[-1]
    expected = ((attn * scale * norm.weight) * (head[paris] - head[london])).sum().item()
    assert dla["10 attn"] == pytest.approx(expected, rel=1e-4)


def test_dla_heads_sum_to_their_layers_attention(dla):
    for index, layer in enumerate(dla.layers):
        assert dla.heads[index].sum() == pytest.approx(dla[f"{layer} attn"], abs=1e-3)
    layer, head, value = dla.top_heads(1)[0]
    assert abs(value) == np.abs(dla.heads).max()


def test_dla_defaults_to_the_top_prediction_and_draws(demo_model, dla):
    single = demo_model.direct_logit_attribution(PROMPT, heads=False)
    assert single.answer == " Paris" and single.wrong is None and single.heads is None
    text = dla.to_data(text=True)["text"]
    assert "direct logit attribution" in text and "per head" in text
    assert result_from_data(dla.to_data()) == dla


# ---- head patching -----------------------------------------------------------------------------


def test_head_patching_matches_a_hand_made_patch(demo_model):
    result = demo_model.head_patching(CLEAN, CORRUPT, layers=[10, 12], answers=ANSWERS)
    assert result.percent.shape == (2, demo_model.names.table.n_heads)
    with demo_model.trace(CLEAN) as tr:
        clean_z = tr.activations["layers.10.attn.z.head[1]"]
    paris, tokyo = demo_model.encode(" Paris")[-1], demo_model.encode(" Tokyo")[-1]
    clean = logit_difference(demo_model, CLEAN, paris, tokyo)
    corrupt = logit_difference(demo_model, CORRUPT, paris, tokyo)
    patched = logit_difference(demo_model, CORRUPT, paris, tokyo, {"layers.10.attn.z.head[1]": iv.replace_with(clean_z)})
    assert result.recovery(10, 1) == pytest.approx(100 * (patched - corrupt) / (clean - corrupt), abs=1e-2)
    assert result_from_data(result.to_data()) == result
    assert "head patching" in result.to_data(text=True)["text"]


def test_head_by_position_patching(demo_model):
    result = demo_model.head_patching(CLEAN, CORRUPT, layers=[10], answers=ANSWERS, positions=[4, 5])
    assert result.percent.shape == (1, demo_model.names.table.n_heads, 2)
    with demo_model.trace(CLEAN) as tr:
        clean_z = tr.activations["layers.10.attn.z.head[1]"]
    keep = mx.array(np.arange(clean_z.shape[1]) == 5)[None, :, None]
    paris, tokyo = demo_model.encode(" Paris")[-1], demo_model.encode(" Tokyo")[-1]
    clean = logit_difference(demo_model, CLEAN, paris, tokyo)
    corrupt = logit_difference(demo_model, CORRUPT, paris, tokyo)
    patched = logit_difference(demo_model, CORRUPT, paris, tokyo,
                               {"layers.10.attn.z.head[1]": lambda z: mx.where(keep, clean_z, z)})
    assert result.recovery(10, 1, 5) == pytest.approx(100 * (patched - corrupt) / (clean - corrupt), abs=1e-2)
    assert "head (rows) x position" in result.to_data(text=True)["text"]


# ---- attribution patching ----------------------------------------------------------------------


def test_attribution_patching_gradient_matches_a_small_patch(demo_model, estimates):
    # A patch of 1 % of (clean - corrupted) at one layer and position changes the metric by 1 % of
    # the estimate (the estimate is the first-order term).
    with demo_model.trace(CLEAN) as tr:
        clean = tr.activations["layers.5.resid_pre"]
    with demo_model.trace(CORRUPT) as tr:
        corrupt = tr.activations["layers.5.resid_pre"]
    mask = np.zeros(clean.shape, np.float32)
    mask[0, 4] = 1
    step = mx.array(mask) * (clean - corrupt) * 0.01
    paris, tokyo = demo_model.encode(" Paris")[-1], demo_model.encode(" Tokyo")[-1]
    before = logit_difference(demo_model, CORRUPT, paris, tokyo)
    after = logit_difference(demo_model, CORRUPT, paris, tokyo, {"layers.5.resid_pre": lambda x: x + step})
    gap = estimates.clean_diff - estimates.corrupt_diff
    assert 100 * (after - before) / 0.01 / gap == pytest.approx(estimates["resid_pre"][5, 4], rel=0.1)


def test_attribution_patching_agrees_with_exact_patching(estimates, exact):
    assert estimates.heads.shape == exact.heads.shape
    correlations = {c: at.rank_correlation(estimates[c], exact[c]) for c in estimates.components}
    correlations["heads"] = at.rank_correlation(estimates.heads, exact.heads)
    every = [np.concatenate([r[c].ravel() for c in r.components] + [r.heads.ravel()]) for r in (estimates, exact)]
    correlations["all"] = at.rank_correlation(*every)
    print("rank correlation of attribution patching with exact patching:",
          {k: round(v, 3) for k, v in correlations.items()})
    assert correlations["all"] > 0.5
    assert min(correlations[c] for c in estimates.components) > 0.5 and correlations["heads"] > 0.4
    # The last layer's residual stream at the last position is the whole effect: both say so.
    assert exact["resid_pre"][-1, -1] == pytest.approx(100.0, abs=1e-3)


def test_attribution_patching_costs_one_forward_pass_where_exact_sweeps_cost_many(demo_model):
    # Work, not wall time (a timed ratio is noise on a launch-bound GPU; bench/attribution.py times it).
    before = demo_model.forward_count
    demo_model.attribution_patching(CLEAN, CORRUPT, ANSWERS)
    estimate = demo_model.forward_count - before
    before = demo_model.forward_count
    at.exact_patching(demo_model, CLEAN, CORRUPT, ANSWERS)
    sweeps = demo_model.forward_count - before
    assert estimate == 1 and sweeps >= 10 * estimate


def test_attribution_result_round_trips_and_draws(estimates):
    assert result_from_data(estimates.to_data()) == estimates
    text = estimates.to_data(text=True)["text"]
    assert "resid_pre" in text and "strongest" in text


@pytest.mark.parametrize("arguments, message", [
    (dict(answers=None), "answers"),
    (dict(answers=ANSWERS, corrupted_text="The capital of the Republic of Japan is"), "same number of tokens"),
    (dict(answers=ANSWERS, components=["resid_nowhere"]), "resid_nowhere"),
])
def test_attribution_patching_bad_input(demo_model, arguments, message):
    arguments = {"clean_text": CLEAN, "corrupted_text": CORRUPT, **arguments}
    with pytest.raises(Exception, match=message):
        demo_model.attribution_patching(**arguments)


def test_rank_correlation():
    assert at.rank_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert at.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(InputError):
        at.rank_correlation([1], [2])


# ---- attention heatmaps ------------------------------------------------------------------------


def test_head_attention_heatmap(demo_model, tmp_path):
    result = demo_model.head_attention(PROMPT, 2, heads=[0, 3])
    patterns = demo_model.get_attention_patterns(PROMPT, layers=[2])[2]
    np.testing.assert_allclose(result.patterns, np.array(patterns[0])[[0, 3]], atol=1e-6)
    text = result.to_data(text=True)["text"]
    assert "attention of layer 2" in text and "head 3" in text and "█" in text
    path = result.save_plot(tmp_path / "heads.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="heads run from 0 to 3"):
        demo_model.head_attention(PROMPT, 2, heads=[9])


# ---- the query language ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(demo_model):
    from mlxterp_repl.dsl.evaluator import Session

    return Session(demo_model)


def test_query_language_statements_give_the_librarys_results(session, dla, estimates):
    from mlxterp_repl.dsl.errors import QueryError

    (result,) = session.execute('dla "The capital of France is" answers " Paris" " London"')
    assert result == dla
    (result,) = session.execute(f'attribute clean "{CLEAN}" corrupt "{CORRUPT}" answers " Paris" " Tokyo"')
    assert result == estimates
    (result,) = session.execute(f'patch heads clean "{CLEAN}" corrupt "{CORRUPT}" metric logit_diff '
                                f'answers " Paris" " Tokyo" @ * layers 10')
    assert result.kind == "head_patching" and result.percent.shape == (1, 4, 6)
    (result,) = session.execute(f'attention layers.2.attn.pattern.head[3] in "{PROMPT}"')
    assert result.heads == [3] and result.layer == 2
    with pytest.raises(QueryError, match="one layer"):
        session.execute(f'attention layers.1..2 in "{PROMPT}"')
    with pytest.raises(QueryError, match="not both"):
        session.execute('dla "x" answer " Paris" answers " Paris" " London"')
    with pytest.raises(QueryError, match="attribute needs"):
        session.execute(f'attribute clean "{CLEAN}" corrupt "{CORRUPT}"')


def test_dla_attributes_the_run_under_with_interventions(session, dla):
    (result,) = session.execute('with layers.10.attn_out zero: dla "The capital of France is" answers " Paris" " London"')
    assert result["10 attn"] == 0.0 and result.logit != pytest.approx(dla.logit)
    assert result.total == pytest.approx(result.logit, rel=1e-3)


# ---- the architecture battery ------------------------------------------------------------------

# Logits with a part no component makes: a bias on the unembedding (phi, phimoe, gptj) or a scale on
# the logits (cohere, cohere2); the result says how much in a note.
NOT_FROM_COMPONENTS = {"phi", "phimoe", "gptj", "cohere", "cohere2"}
IDS, OTHER = [1, 5, 9, 14, 3, 7], [1, 5, 9, 20, 3, 7]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request):
    from architectures import tiny_model
    from mlxterp import InterpretableModel

    return request.param, InterpretableModel(tiny_model(request.param))


@pytest.mark.slow
def test_dla_and_attribution_patching_on_every_architecture(tiny):
    from mlxterp.attention import output_projection
    from mlxterp.errors import UnknownModuleError

    arch, model = tiny
    if "attn_out" not in model.names.table.hooks:  # granite, minicpm, glm4, recurrent mixers: see test_hooks_battery
        with pytest.raises(UnknownModuleError, match="attn_out"):
            model.direct_logit_attribution(IDS, 3, 7)
        return
    dla = model.direct_logit_attribution(IDS, 3, 7)
    if arch in NOT_FROM_COMPONENTS:
        assert any("from no component" in note for note in dla.notes)
    else:
        assert dla.total == pytest.approx(dla.logit, abs=1e-4 * max(1.0, abs(dla.logit)))
    if dla.heads is not None:
        attention = model.module("layers.0.attn")
        if "bias" not in output_projection(attention):  # with a bias, the heads sum to attn less the bias
            for index, layer in enumerate(dla.layers):
                assert dla.heads[index].sum() == pytest.approx(dla[f"{layer} attn"], abs=1e-4)
    estimates = model.attribution_patching(IDS, OTHER, (3, 7))
    assert all(np.isfinite(estimates[c]).all() for c in estimates.components)
    # Positions before the first difference (3) are the same in both runs: nothing to patch there.
    assert np.abs(estimates["resid_pre"][:, :3]).max() == 0
    assert (estimates.heads is not None) == bool(model.names.table.n_heads)
