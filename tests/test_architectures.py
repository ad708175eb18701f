"""Tracing works on any mlx-lm architecture: names found, logits exact, model untouched, batches exact.

Each test runs on every tiny model of ``tests/architectures.py``; the list of
architectures that pass goes into ``docs/architectures.md``.
"""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from architectures import ARCHITECTURES, HIDDEN, N_LAYERS, VOCAB, tiny_model
from mlxterp import InterpretableModel
from mlxterp.trace import supports_left_padding

IDS = [1, 5, 9, 23, 42, 77, 3]
SHORT = [60, 2, 17, 88]

# Failures that are known and reported, per test: strict, so a fix shows up as XPASS and the entry goes.
KNOWN_FAILURES = {
    "attn": {
        "lfm2": "layer 0 mixes tokens with a convolution (conv); attention is at layers.1.self_attn",
        "mamba": "a Mamba block has a mixer and no MLP",
    },
}


def architectures(known=None):
    """Parametrize over every architecture, marking the known failures of the test group ``known``."""
    failing = KNOWN_FAILURES.get(known, {})
    return pytest.mark.parametrize("arch", [
        pytest.param(arch, marks=pytest.mark.xfail(strict=True, reason=failing[arch])) if arch in failing else arch
        for arch in ARCHITECTURES
    ])


each_architecture = architectures()


def traced_logits(model, inputs, interventions=None):
    with model.trace(inputs, interventions=interventions):
        logits = model.output.save()
    return logits


def snapshot(base):
    """Every module's class and every parameter array, by name."""
    classes = [(name, type(module)) for name, module in base.named_modules()]
    params = tree_flatten(base.parameters())
    return classes, params


def test_battery_covers_enough_architectures():
    assert len(ARCHITECTURES) >= 20
    assert len(set(ARCHITECTURES)) == len(ARCHITECTURES)


def test_battery_covers_both_batching_paths():
    """Ragged batches run as one left-padded pass for some architectures and per length for others."""
    padded = [arch for arch in ARCHITECTURES if supports_left_padding(tiny_model(arch))]
    assert "llama" in padded
    assert "gpt2" not in padded  # learned positions: left padding would shift them
    assert "gemma3_text" not in padded  # sliding-window (rotating) cache


@each_architecture
def test_layers_found_without_layer_attr(arch):
    model = InterpretableModel(tiny_model(arch))
    assert model.n_layers == N_LAYERS
    assert len(model.layers) == N_LAYERS


@each_architecture
def test_traced_logits_equal_the_plain_forward(arch):
    base = tiny_model(arch)
    expected = base(mx.array([IDS]))
    logits = traced_logits(InterpretableModel(base), IDS)
    assert logits.shape == (1, len(IDS), VOCAB)
    assert mx.array_equal(logits, expected).item(), float(mx.abs(logits - expected).max())


@each_architecture
def test_every_layer_output_saves_as_batch_length_hidden(arch):
    model = InterpretableModel(tiny_model(arch))
    with model.trace(IDS):
        outputs = [layer.output.save() for layer in model.layers]
    for i, h in enumerate(outputs):
        assert h.shape == (1, len(IDS), HIDDEN), f"layer {i}: {h.shape}"


@architectures("sizes")
def test_width_vocabulary_embed_and_norm_found(arch):
    model = InterpretableModel(tiny_model(arch))
    assert model.hidden_size == HIDDEN
    assert model.embedding_rows == VOCAB
    assert model.short_name(model.resolve("embed")) and model.short_name(model.resolve("norm"))


@architectures("attn")
def test_attn_and_mlp_resolve_and_save(arch):
    model = InterpretableModel(tiny_model(arch))
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert attn.name != mlp.name
    assert attn.name.startswith(model.layers[0].name + ".") and mlp.name.startswith(model.layers[0].name + ".")
    with model.trace(IDS):
        a = attn.output.save()
        m = mlp.output.save()
    assert a.shape == (1, len(IDS), HIDDEN)
    assert m.shape == (1, len(IDS), HIDDEN)


@each_architecture
def test_trace_leaves_model_unchanged(arch):
    base = tiny_model(arch)
    classes_before, params_before = snapshot(base)
    expected = base(mx.array([IDS]))
    model = InterpretableModel(base)
    with model.trace([IDS, IDS[::-1]], interventions={"layers.0": lambda a: a * 0}):
        model.layers[0].output.save()
    classes_after, params_after = snapshot(base)
    assert classes_after == classes_before
    assert [name for name, _ in params_after] == [name for name, _ in params_before]
    for (name, after), (_, before) in zip(params_after, params_before):
        assert mx.array_equal(after, before).item(), name
    assert mx.array_equal(base(mx.array([IDS])), expected).item()


@each_architecture
def test_zero_out_first_layer_changes_logits_and_identity_does_not(arch):
    model = InterpretableModel(tiny_model(arch))
    clean = traced_logits(model, IDS)
    zeroed = traced_logits(model, IDS, {"layers.0": lambda a: a * 0})
    same = traced_logits(model, IDS, {"layers.0": lambda a: a})
    assert not mx.allclose(zeroed, clean, atol=1e-4).item()
    assert mx.array_equal(same, clean).item()


@architectures("ragged")
def test_ragged_batch_matches_each_prompt_alone(arch):
    model = InterpretableModel(tiny_model(arch))
    batch = traced_logits(model, [IDS, SHORT])
    assert batch.shape == (2, len(IDS), VOCAB)
    for row, ids in enumerate([IDS, SHORT]):
        alone = traced_logits(model, ids)[0]
        real = batch[row, len(IDS) - len(ids):]
        assert mx.allclose(real, alone, atol=1e-4).item(), (row, float(mx.abs(real - alone).max()))
