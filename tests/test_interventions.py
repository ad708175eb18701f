"""Interventions: the named factories, their effect downstream, and how keys resolve."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama

from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp.errors import LayerIndexError, MlxterpError, UnknownModuleError

PROMPT = [1, 5, 7, 9, 11]


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_llama(n_layers=4))


def run(model, interventions=None, tokens=PROMPT):
    with model.trace(tokens, interventions=interventions):
        logits = model.output.save()
    return logits


def layer_output(model, layer, interventions):
    with model.trace(PROMPT, interventions=interventions):
        out = model.layers[layer].output.save()
    return out


# -- the functions themselves -----------------------------------------------------------

def test_scale_one_is_bitwise_identity_on_the_logits(model):
    assert mx.array_equal(run(model), run(model, {"layers.2": iv.scale(1.0)})).item()


def test_zeroing_a_layer_changes_the_logits(model):
    plain, zeroed = run(model), run(model, {"layers.1.mlp": iv.zero_out})
    assert mx.abs(plain - zeroed).max().item() > 1e-3


def test_zero_out_makes_the_layer_output_zero(model):
    assert mx.all(layer_output(model, 2, {"layers.2": iv.zero_out}) == 0).item()


def test_scale_multiplies_the_output_seen_by_the_trace(model):
    plain = layer_output(model, 1, None)
    scaled = layer_output(model, 1, {"layers.1": iv.scale(0.5)})
    assert np.allclose(np.array(scaled), 0.5 * np.array(plain), atol=1e-6)


def test_clamp_bounds_the_output(model):
    out = layer_output(model, 1, {"layers.1": iv.clamp(-0.1, 0.2)})
    assert out.min().item() == pytest.approx(-0.1) and out.max().item() == pytest.approx(0.2)
    assert mx.sum(out == out.max()).item() > 1  # values above the bound were cut to it


def test_noise_with_a_seed_repeats_and_without_differs(model):
    seeded = [run(model, {"layers.1": iv.noise(std=0.5, seed=3)}) for _ in range(2)]
    assert mx.array_equal(seeded[0], seeded[1]).item()
    other = run(model, {"layers.1": iv.noise(std=0.5, seed=4)})
    assert mx.abs(seeded[0] - other).max().item() > 1e-4
    assert mx.abs(run(model) - seeded[0]).max().item() > 1e-4


def test_add_vector_shifts_every_position_by_the_vector(model):
    vector = mx.arange(model.hidden_size).astype(mx.float32) / 100
    plain = layer_output(model, 0, None)
    steered = layer_output(model, 0, {"layers.0": iv.add_vector(vector)})
    assert np.allclose(np.array(steered - plain), np.broadcast_to(np.array(vector), plain.shape), atol=1e-5)


def test_add_vector_of_the_wrong_size_names_both_sizes(model):
    with pytest.raises(MlxterpError, match=f"size 7 .* {model.hidden_size}"):
        run(model, {"layers.0": iv.add_vector(mx.ones((7,)))})


def test_replace_with_a_clean_activation_reproduces_the_clean_run(model):
    clean_tokens, corrupted_tokens = [1, 5, 7, 9, 11], [1, 6, 7, 9, 11]
    with model.trace(clean_tokens):
        clean_layer = model.layers[2].output.save()
        clean_logits = model.output.save()
    patched = run(model, {"layers.2": iv.replace_with(clean_layer)}, corrupted_tokens)
    assert mx.abs(patched - clean_logits).max().item() < 1e-5
    assert mx.abs(run(model, tokens=corrupted_tokens) - clean_logits).max().item() > 1e-3


def test_replace_with_a_wrong_shape_says_both_shapes(model):
    with pytest.raises(MlxterpError, match=r"\(1, 3, 64\).*\(1, 5, 64\)"):
        run(model, {"layers.1": iv.replace_with(mx.zeros((1, 3, 64)))})


def test_replace_rows_touches_only_the_listed_rows_and_positions():
    activation = mx.arange(3 * 4 * 2).reshape(3, 4, 2).astype(mx.float32)
    replacement = -mx.ones((1, 4, 2))
    out = np.array(iv.replace_rows(replacement, rows=[0, 2], positions=[None, 1])(activation))
    expected = np.array(activation)
    expected[0] = -1
    expected[2, 1] = -1
    assert np.array_equal(out, expected)


def test_compose_applies_steps_in_order():
    x = mx.array([1.0, -2.0, 3.0])
    scale_then_clamp = iv.compose().add(iv.scale(2.0)).add(iv.clamp(-1.0, 1.0)).build()
    clamp_then_scale = iv.compose(iv.clamp(-1.0, 1.0), iv.scale(2.0)).build()
    assert scale_then_clamp(x).tolist() == [1.0, -1.0, 1.0]
    assert clamp_then_scale(x).tolist() == [2.0, -2.0, 2.0]


def test_compose_rejects_what_is_not_a_function():
    with pytest.raises(MlxterpError, match="intervention function"):
        iv.compose().add(0.5)


def test_a_custom_function_is_an_intervention(model):
    out = layer_output(model, 1, {"layers.1": lambda a: mx.maximum(a, 0.0)})
    assert out.min().item() >= 0.0


@pytest.mark.parametrize("bad", [lambda: iv.scale("big"), lambda: iv.clamp(), lambda: iv.clamp(2, 1),
                                 lambda: iv.noise(std=-1)])
def test_bad_factory_arguments_are_clear_errors(bad):
    with pytest.raises(MlxterpError):
        bad()


# -- keys ---------------------------------------------------------------------------------

def test_short_full_and_attn_alias_keys_do_the_same(model):
    short = run(model, {"layers.1.attn": iv.scale(0.3)})
    full = run(model, {"model.model.layers.1.self_attn": iv.scale(0.3)})
    alias = run(model, {"layers.1.self_attn": iv.scale(0.3)})
    negative = run(model, {"layers.-3.attn": iv.scale(0.3)})
    assert mx.array_equal(short, full).item() and mx.array_equal(short, alias).item()
    assert mx.array_equal(short, negative).item()
    assert not mx.array_equal(short, run(model)).item()


def test_several_layers_at_once_equal_a_pattern(model):
    explicit = run(model, {f"layers.{i}.mlp": iv.scale(0.5) for i in range(4)})
    pattern = run(model, {"layers.*.mlp": iv.scale(0.5)})
    assert mx.array_equal(explicit, pattern).item()
    one = run(model, {"layers.0.mlp": iv.scale(0.5)})
    assert not mx.array_equal(explicit, one).item()


def test_unknown_key_is_an_error_with_suggestions(model):
    with pytest.raises(UnknownModuleError) as info:
        run(model, {"layers.1.mpl": iv.zero_out})
    assert "layers.1.mlp" in info.value.suggestions


def test_layer_index_out_of_range_is_an_error(model):
    with pytest.raises(LayerIndexError):
        run(model, {"layers.9": iv.zero_out})


def test_model_is_unchanged_after_an_intervention(model):
    before = run(model)
    run(model, {"layers.*": iv.zero_out})
    assert mx.array_equal(before, run(model)).item()
    assert mx.array_equal(before, model.model(mx.array([PROMPT]))).item()


def test_guide_import_form_works_in_a_fresh_interpreter():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "from mlxterp import interventions as iv; print(iv.scale(2.0).__name__)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "scale(2.0)"
