"""Tracing works on any mlx-lm architecture: names found, logits exact, model untouched, batches exact.

Each test runs on every tiny model of ``tests/architectures.py``; the list of
architectures that pass goes into ``docs/architectures.md``. The quantized battery runs the
analyses (tracing, interventions, lens and predictions, patching, attention patterns, collection)
on 4-bit versions of some of them.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from architectures import ARCHITECTURES, HIDDEN, N_LAYERS, QUANTIZED, VOCAB, tiny_model, tiny_quantized
from mlxterp import InterpretableModel
from mlxterp.errors import MlxterpError
from mlxterp.analysis import activation_patching
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
# Models whose mlx-lm caches are plain KVCache: a patching sweep runs a shared prefix once there.
PLAIN_KV_CACHE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "starcoder2", "cohere", "granite"}


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


# -- the same on 4-bit quantized models ------------------------------------------------------

CLEAN, CORRUPTED = IDS, IDS[:3] + [24] + IDS[4:]


@pytest.fixture(scope="module", params=QUANTIZED)
def quantized(request):
    return request.param, InterpretableModel(tiny_quantized(request.param))


def test_quantized_models_are_quantized(quantized):
    arch, model = quantized
    kinds = {type(m) for _, m in model.model.named_modules()}
    assert any(issubclass(k, nn.QuantizedLinear) or "Quantized" in k.__name__ for k in kinds), arch
    if model.names.find("lm_head") is None:  # tied: the unembedding is the quantized embedding
        assert isinstance(model.module("embed"), nn.QuantizedEmbedding), arch


def test_quantized_traced_logits_equal_the_plain_forward(quantized):
    arch, model = quantized
    expected = model.model(mx.array([IDS]))
    logits = traced_logits(model, IDS)
    assert logits.shape == (1, len(IDS), VOCAB)
    assert mx.array_equal(logits, expected).item(), float(mx.abs(logits - expected).max())
    with model.trace(IDS, keep="all") as trace:
        logits = model.output.save()
    captured = dict(trace.activations)
    assert mx.array_equal(logits, expected).item()  # capturing everything changes nothing either
    assert len(captured) > 3 * N_LAYERS


def test_quantized_interventions_change_what_they_should(quantized):
    arch, model = quantized
    clean = traced_logits(model, IDS)
    assert not mx.allclose(traced_logits(model, IDS, {"layers.0.mlp": lambda a: a * 0}), clean, atol=1e-4).item()
    assert mx.array_equal(traced_logits(model, IDS, {"layers.0": lambda a: a}), clean).item()


def test_quantized_lens_and_predictions_decode_like_the_model(quantized):
    """The lens at the last layer is the model's own logits: same final norm and (quantized) unembedding."""
    from mlxterp.analysis import get_token_predictions, unembed

    arch, model = quantized
    with model.trace(IDS):
        last = model.layers[-1].output.save()
        logits = model.output.save()
    decoded = unembed(model, last[0])
    scale = float(mx.abs(logits).max())
    assert mx.allclose(decoded, logits[0].astype(mx.float32), atol=1e-4 * scale).item(), arch
    predicted = get_token_predictions(model, last[0, -1], top_k=3, return_scores=True)
    assert [i for i, _ in predicted][0] == int(mx.argmax(logits[0, -1]))
    ids, scores = model_lens(model)
    assert ids.shape == (N_LAYERS, 2) and np.all(np.isfinite(scores))
    assert int(ids[-1, 0]) == int(mx.argmax(logits[0, -1]))


def model_lens(model):
    """Top-2 tokens of every layer's last position through the logit lens's decoding (no tokenizer here)."""
    from mlxterp.analysis import _decode_top_k

    with model.trace(IDS):
        states = [layer.output.save()[0, -1:] for layer in model.layers]
    return _decode_top_k(model, mx.concatenate(states), 2)


def test_quantized_patching_equals_one_run_per_layer(quantized):
    arch, model = quantized
    for component in ("layer", "mlp"):
        batched = activation_patching(model, CLEAN, CORRUPTED, component=component)
        reference = one_run_per_layer(model, component)
        assert all(abs(batched[k] - reference[k]) <= 1e-4 * max(100.0, abs(reference[k])) for k in reference), \
            (arch, component, dict(batched), reference)


def test_quantized_attention_patterns_sum_to_one_and_are_causal(quantized):
    from mlxterp.attention import SUPPORTED_ARCHITECTURES

    arch, model = quantized
    assert arch in SUPPORTED_ARCHITECTURES
    patterns = model.get_attention_patterns([IDS], layers=[0, 1])
    for layer in (0, 1):
        p = np.array(patterns[layer])
        assert p.shape[0] == 1 and p.shape[2:] == (len(IDS), len(IDS))
        assert np.allclose(p.sum(-1), 1.0, atol=1e-5) and np.allclose(np.triu(p[0, 0], k=1), 0.0)


def test_quantized_collection_equals_the_trace(quantized):
    from mlxterp.collect import get_activations

    arch, model = quantized
    collected = get_activations(model, [IDS, SHORT], layers=[0, 1], positions=-1)
    with model.trace([IDS]):
        alone = model.layers[1].output.save()
    assert collected["layer_1"].shape == (2, HIDDEN)
    assert mx.allclose(collected["layer_1"][0], alone[0, -1], atol=1e-4).item()


# -- patching equals one patched forward pass per layer, on every architecture ----------------

def one_run_per_layer(model, component):
    from mlxterp.analysis import component_name, distance
    from mlxterp.interventions import replace_with

    names = [component_name(model, layer, component) for layer in range(model.n_layers)]
    with model.trace([CLEAN]) as trace:
        clean = [trace.save(name) for name in names]
        clean_logits = model.output.save()[0, -1]
    with model.trace([CORRUPTED]):
        corrupted_logits = model.output.save()[0, -1]
    base = distance("l2", corrupted_logits, clean_logits).item()
    recovery = {}
    for layer, name in enumerate(names):
        with model.trace([CORRUPTED], interventions={name: replace_with(clean[layer])}):
            patched = model.output.save()[0, -1]
        recovery[layer] = 100 * (base - distance("l2", patched, clean_logits).item()) / base
    return recovery


def failed_passes(monkeypatch) -> list:
    """The errors of patching passes from now on: a pass that fails falls back to a slower way, which
    gives the same numbers, so only this says the faster way was the one that ran."""
    import mlxterp.analysis as analysis

    failed = []
    patch_pass = analysis._patch_pass

    def recording(*args, **kwargs):
        try:
            return patch_pass(*args, **kwargs)
        except Exception as error:
            failed.append(error)
            raise

    monkeypatch.setattr(analysis, "_patch_pass", recording)
    return failed


@each_architecture
def test_patching_sweep_equals_one_run_per_layer(arch, monkeypatch):
    """The sweep computes each row patched at a whole layer from the clean and corrupted rows and
    adds it after that layer, and decodes the last position only; that must give what running each
    patched prompt on its own gives, on every architecture. The prompts share their first 3 tokens:
    run once into a KV cache where the model's caches allow it."""
    import mlxterp.analysis as analysis

    model = InterpretableModel(tiny_model(arch))
    failed = failed_passes(monkeypatch)
    reference = one_run_per_layer(model, "layer")
    batched = activation_patching(model, CLEAN, CORRUPTED, component="layer")
    assert all(abs(batched[k] - reference[k]) <= 1e-4 * max(100.0, abs(reference[k])) for k in reference), \
        (dict(batched), reference)
    monkeypatch.setattr(analysis, "prefix_min_tokens", 1)
    before = model.forward_count
    batched = activation_patching(model, CLEAN, CORRUPTED, component="layer")
    assert all(abs(batched[k] - reference[k]) <= 1e-4 * max(100.0, abs(reference[k])) for k in reference), \
        ("shared prefix", dict(batched), reference)
    if arch in PLAIN_KV_CACHE:  # the prefix pass, then one pass of the rest
        assert model.forward_count - before == 2, arch
    assert not failed, (arch, failed)


@each_architecture
def test_mlp_patching_equals_one_run_per_layer(arch, monkeypatch):
    """Patching MLPs: in a sequential block (hooks.sequential_parts) a patched row's layer output is
    computed as resid_mid + mlp_out from the corrupted and clean rows, and the row joins after its
    layer; elsewhere it runs the layer. Both must give what one patched run per layer gives, and the
    computed rows must be what the sweep used (no pass fell back to another way)."""
    import mlxterp.analysis as analysis
    from mlxterp import hooks

    model = InterpretableModel(tiny_model(arch))
    try:
        names = {layer: analysis.component_name(model, layer, "mlp") for layer in range(model.n_layers)}
    except MlxterpError:
        # A model without an MLP in every layer (Mamba): the sweep says so, naming the modules it has.
        with pytest.raises(MlxterpError, match=r"no module named 'layers\.\d+\.mlp'; did you mean"):
            activation_patching(model, CLEAN, CORRUPTED, component="mlp")
        assert arch == "mamba", arch  # the only one of the battery; another would want a look
        return
    failed = failed_passes(monkeypatch)
    reference = one_run_per_layer(model, "mlp")
    for prefix in (16, 1):  # without, then with the shared prefix run once
        monkeypatch.setattr(analysis, "prefix_min_tokens", prefix)
        batched = activation_patching(model, CLEAN, CORRUPTED, component="mlp")
        assert all(abs(batched[k] - reference[k]) <= 1e-4 * max(100.0, abs(reference[k])) for k in reference), \
            (prefix, dict(batched), reference)
    jobs = [(layer, None) for layer in range(model.n_layers)]
    sequential = all(hooks.sequential_parts(model, block) is not None for block in model.names.layer_names)
    assert (analysis._computed_after_layer(model, jobs, names) is not None) == sequential, arch
    if sequential:
        assert not failed, (arch, failed)
