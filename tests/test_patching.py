"""Activation patching: recovery per layer (and position), batched, finite on large vocabularies."""

import math

import mlx.core as mx
import pytest
from conftest import tiny_llama

from mlxterp import InterpretableModel
from mlxterp.analysis import activation_patching, distance
from mlxterp.errors import InputError, UnknownModuleError
from mlxterp.interventions import replace_with

CLEAN, CORRUPTED = "Paris is the capital of France", "London is the capital of France"
CLEAN_IDS, CORRUPTED_IDS = [1, 5, 7, 9, 11, 13], [1, 6, 7, 9, 11, 13]


@pytest.fixture(scope="module")
def tiny():
    return InterpretableModel(tiny_llama(n_layers=4, vocab=100))


def one_run_per_layer(model, clean, corrupted, component, metric):
    """The slow reference: one patched forward pass per layer."""
    with model.trace([clean]) as tr:
        acts = [tr.save(model.resolve(f"layers.{i}.{component}")) for i in range(model.n_layers)]
        clean_logits = model.output.save()[0, -1]
    with model.trace([corrupted]):
        corrupted_logits = model.output.save()[0, -1]
    base = distance(metric, corrupted_logits, clean_logits).item()
    out = {}
    for layer in range(model.n_layers):
        with model.trace([corrupted], interventions={f"layers.{layer}.{component}": replace_with(acts[layer])}):
            patched = model.output.save()[0, -1]
        out[layer] = 100 * (base - distance(metric, patched, clean_logits).item()) / base
    return out


@pytest.mark.parametrize("component", ["mlp", "attn", "mlp.gate_proj", "self_attn.q_proj"])
@pytest.mark.parametrize("metric", ["l2", "mse", "cosine"])
def test_batched_sweep_equals_one_run_per_layer(tiny, component, metric):
    batched = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component=component, metric=metric)
    reference = one_run_per_layer(tiny, CLEAN_IDS, CORRUPTED_IDS, component, metric)
    # equal up to the rounding of a different batch size: 1e-4 of max(100 %, |recovery|)
    assert all(abs(batched[k] - reference[k]) <= 1e-4 * max(100.0, abs(reference[k])) for k in reference)
    assert any(abs(v) > 0.1 for v in batched.values())


def test_clean_runs_once_and_patched_rows_share_forward_passes(tiny):
    # both paths (one batch, several batches) must give the same numbers
    before = tiny.forward_count
    activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="mlp")
    assert tiny.forward_count - before == 1  # clean, corrupted and 4 patched rows in one batch
    before = tiny.forward_count
    small_batches = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="mlp", batch_size=2)
    assert tiny.forward_count - before == 1 + 3  # the clean run, then 5 corrupted rows 2 at a time
    assert small_batches == pytest.approx(activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS), abs=1e-4)


def test_whole_layer_patch_recovers_everything(tiny):
    for component in (None, "layer"):
        results = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component=component)
        assert results == pytest.approx({layer: 100.0 for layer in range(4)}, abs=1e-3)


def test_patching_by_position(tiny):
    grid = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="layer", positions="all")
    assert sorted(grid) == [0, 1, 2, 3] and sorted(grid[0]) == list(range(6))
    # before the token that differs, the clean and corrupted states are equal: nothing to recover
    assert grid[2][0] == pytest.approx(0.0, abs=1e-3)
    # the last layer's last position is all the logits depend on
    assert grid[3][5] == pytest.approx(100.0, abs=1e-3)
    assert grid[3][1] == pytest.approx(0.0, abs=1e-3)
    some = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="mlp", positions=[1, -1], layers=[0])
    assert sorted(some[0]) == [1, 5]


def test_logit_difference_metric(tiny):
    results = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="layer", metric="logit_diff",
                                  answers=(3, 4), positions=[5], layers=[3])
    assert results[3][5] == pytest.approx(100.0, abs=1e-3)
    with pytest.raises(InputError, match="answers"):
        activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, metric="logit_diff")


def test_guide_prompts_give_finite_recoveries_for_every_layer_and_metric(demo_model):
    for component in ("mlp", "attn", "self_attn", "layer", "mlp.gate_proj", "self_attn.q_proj"):
        for metric in ("l2", "mse", "cosine"):
            results = demo_model.activation_patching(CLEAN, CORRUPTED, component=component, metric=metric)
            assert sorted(results) == list(range(demo_model.n_layers))
            assert all(math.isfinite(v) for v in results.values()), (component, metric, results)
    answers = demo_model.activation_patching(CLEAN, CORRUPTED, component="layer", metric="logit_diff",
                                             answers=(" Paris", " London"), layers=[0, 15], positions=[1])
    assert all(math.isfinite(v) for row in answers.values() for v in row.values())


def test_finite_on_a_150k_vocabulary_in_float16():
    base = tiny_llama(n_layers=2, hidden=32, vocab=150_000)
    base.set_dtype(mx.float16)
    model = InterpretableModel(base)
    for metric in ("l2", "mse", "cosine"):
        results = activation_patching(model, CLEAN_IDS, [1, 140_000, 7, 9, 11, 13], component="mlp", metric=metric)
        assert all(math.isfinite(v) for v in results.values()), (metric, results)


def test_l2_distance_does_not_overflow_on_huge_logits():
    a = mx.full((150_000,), 3e4, dtype=mx.float16)
    assert math.isfinite(distance("l2", a, -a).item())


def test_bad_arguments_are_clear_errors(tiny):
    with pytest.raises(InputError, match="same number of tokens"):
        activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS[:-1])
    with pytest.raises(InputError, match="l2, mse, cosine"):
        activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, metric="kl")
    with pytest.raises(UnknownModuleError):
        activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="mlp.gate")
    with pytest.raises(InputError, match="same tokens"):
        activation_patching(tiny, CLEAN_IDS, CLEAN_IDS)


def test_plot_writes_a_png(tiny, tmp_path):
    path = tmp_path / "patch.png"
    activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, plot=True, save_path=str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    grid_path = tmp_path / "grid.png"
    activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, positions="all", plot=True, save_path=str(grid_path))
    assert grid_path.read_bytes()[:4] == b"\x89PNG"


CLEAN, CORRUPT = "Paris is the capital of France", "London is the capital of France"


def test_patching_under_an_identity_intervention_equals_plain_patching(demo_model):
    from mlxterp import interventions as iv

    plain = demo_model.activation_patching(CLEAN, CORRUPT, component="mlp", layers=[0, 5, 15])
    steered = demo_model.activation_patching(CLEAN, CORRUPT, component="mlp", layers=[0, 5, 15],
                                             interventions={"layers.3": iv.scale(1.0)})
    # Without interventions an MLP-patched row is computed from the clean and corrupted rows (no pass
    # of its own at its layer); with them it runs the layer: float32 rounding apart (measured 4e-5 %).
    assert steered == pytest.approx(plain, rel=1e-5, abs=1e-4)


def test_patching_applies_steering_to_every_run(demo_model):
    from mlxterp import interventions as iv

    plain = demo_model.activation_patching(CLEAN, CORRUPT, component="mlp", layers=[2, 8])
    steered = demo_model.activation_patching(CLEAN, CORRUPT, component="mlp", layers=[2, 8],
                                             interventions={"layers.4": iv.scale(0.5)})
    assert steered != pytest.approx(plain, abs=1e-3)


def test_patching_stops_when_asked(demo_model):
    from mlxterp.errors import Interrupted

    calls = []
    with pytest.raises(Interrupted):
        demo_model.activation_patching(CLEAN, CORRUPT, should_stop=lambda: calls.append(1) or len(calls) > 5)
    assert len(demo_model.activation_patching(CLEAN, CORRUPT, layers=[1])) == 1  # still usable


# Prompts sharing their first 20 tokens: the sweep runs those once, into a KV cache.
SHARED = list(range(2, 22))
PREFIX_CLEAN, PREFIX_CORRUPTED = [1] + SHARED + [30, 31, 32, 33], [1] + SHARED + [40, 31, 32, 33]


def one_run_per_position(model, clean, corrupted, component, layer, position, metric="l2"):
    """The slow reference for one (layer, position): the corrupted run with that position's clean value."""
    from mlxterp.interventions import replace_rows

    name = f"layers.{layer}" if component == "layer" else f"layers.{layer}.{component}"
    with model.trace([clean]) as tr:
        act = tr.save(model.resolve(name))
        clean_logits = model.output.save()[0, -1]
    with model.trace([corrupted]):
        corrupted_logits = model.output.save()[0, -1]
    with model.trace([corrupted], interventions={name: replace_rows(act, [0], [position])}):
        patched = model.output.save()[0, -1]
    base = distance(metric, corrupted_logits, clean_logits).item()
    return 100 * (base - distance(metric, patched, clean_logits).item()) / base


@pytest.mark.parametrize("component", ["mlp", "attn"])
def test_a_shared_prefix_runs_once_and_recoveries_are_unchanged(tiny, component):
    reference = one_run_per_layer(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, component, "l2")
    before = tiny.forward_count
    batched = activation_patching(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, component=component)
    assert tiny.forward_count - before == 2  # the 21 shared tokens once, then every row on the last 4
    assert all(abs(batched[k] - reference[k]) <= 1e-4 * max(100.0, abs(reference[k])) for k in reference)
    assert any(abs(v) > 0.1 for v in batched.values())


def test_a_shared_prefix_gives_the_same_by_position_and_nothing_where_the_prompts_agree(tiny):
    positions = [3, 21, 24]  # a shared position, the one that differs, the last
    grid = activation_patching(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, component="mlp", layers=[0, 2],
                               positions=positions)
    for layer in (0, 2):
        for position in positions:
            expected = one_run_per_position(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, "mlp", layer, position)
            assert abs(grid[layer][position] - expected) <= 1e-4 * max(100.0, abs(expected)), (layer, position)
        assert grid[layer][3] == pytest.approx(0.0, abs=1e-4)
    assert abs(grid[0][21]) > 0.1


@pytest.mark.parametrize("component", ["mlp", "layer"])
def test_rows_computed_after_their_layer_match_one_run_per_position(tiny, component):
    # No shared prefix and no interventions: each patched row joins after its layer, computed from the
    # clean and corrupted rows (the clean layer output; or the corrupted row's resid_mid plus the clean
    # row's MLP output), at its one position only.
    positions = [1, 2, len(CLEAN_IDS) - 1]
    grid = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component=component, positions=positions)
    for layer in range(tiny.n_layers):
        for position in positions:
            expected = one_run_per_position(tiny, CLEAN_IDS, CORRUPTED_IDS, component, layer, position)
            assert abs(grid[layer][position] - expected) <= 1e-4 * max(100.0, abs(expected)), (layer, position)
    assert len({round(grid[0][p], 3) for p in positions}) == len(positions)  # the positions differ


def test_a_short_shared_prefix_or_an_intervention_runs_everything_in_one_pass(tiny, monkeypatch):
    import mlxterp.analysis as analysis

    monkeypatch.setattr(analysis, "prefix_min_tokens", 64)
    before = tiny.forward_count
    long_threshold = activation_patching(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, component="mlp")
    assert tiny.forward_count - before == 1
    monkeypatch.setattr(analysis, "prefix_min_tokens", 16)
    before = tiny.forward_count
    steered = activation_patching(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, component="mlp",
                                  interventions={"layers.0": lambda a: a})  # positions could be indexed
    assert tiny.forward_count - before == 1
    assert steered == pytest.approx(long_threshold, abs=1e-4)


@pytest.mark.parametrize("prompts", [(CLEAN_IDS, CORRUPTED_IDS), (PREFIX_CLEAN, PREFIX_CORRUPTED)])
def test_a_pass_evaluated_as_it_goes_gives_the_same_recoveries(tiny, monkeypatch, prompts):
    import mlxterp.analysis as analysis

    whole = activation_patching(tiny, *prompts, component="mlp")
    monkeypatch.setattr(analysis, "SMALL_PASS_BYTES", 0)  # every pass is "big": evaluated every 2 layers
    assert analysis._PassSizes(tiny).eval_every(3, len(prompts[0])) == analysis.EVAL_EVERY
    assert activation_patching(tiny, *prompts, component="mlp") == pytest.approx(whole, abs=1e-4)


def test_a_sweep_with_a_shared_prefix_stops_inside_the_prefix_pass(tiny):
    from mlxterp.errors import Interrupted

    before = tiny.forward_count
    with pytest.raises(Interrupted):
        activation_patching(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, component="mlp", should_stop=lambda: True)
    assert tiny.forward_count == before  # stopped in the first (prefix) pass, which never finished
    assert len(activation_patching(tiny, PREFIX_CLEAN, PREFIX_CORRUPTED, layers=[1])) == 1  # still usable
