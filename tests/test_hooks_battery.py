"""Hook points across the architecture battery: which architectures have which hook points, and
the residual-stream and per-head invariants, checked with real numbers on tiny random models.

For every transformer of `tests/architectures.py`: `resid_post(N) == resid_pre(N+1)`;
sequential blocks: `resid_mid == resid_pre + attn_out` and `resid_post == resid_mid + mlp_out`
(resid_mid read from the module the block feeds it to, so the sums are checked, not assumed);
parallel blocks: `resid_post == resid_pre + attn_out + mlp_out`; and the heads' `z` through the
output projection gives the attention's output. Architectures without a hook point get an error
naming them."""

import mlx.core as mx
import numpy as np
import pytest

from architectures import ARCHITECTURES, N_LAYERS, QUANTIZED, TRANSFORMERS, tiny_model, tiny_quantized
from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp.errors import UnknownModuleError
from mlxterp.hooks import BLOCKS

IDS = [[1, 5, 9, 14, 3, 7]]
RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
# What the battery shows (checked below): parallel blocks have no resid_mid; blocks that scale
# their additions by a number (granite, minicpm) or norm after adding (glm4) have only the block's
# input and output; recurrent mixers have no attention/MLP pair in every layer.
PARALLEL = {"phi", "cohere", "cohere2", "gptj", "gpt_neox"}
BOUNDARY_ONLY = {"granite", "granitemoe", "minicpm", "minicpm3", "glm4", "qwen3_next", "lfm2", "mamba"}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def wrapped(request):
    return request.param, InterpretableModel(tiny_model(request.param))


def close(a, b, tol=2e-4):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_every_architecture_has_the_block_boundaries_and_they_chain(wrapped):
    arch, model = wrapped
    hooks = model.names.table.hooks
    assert {"resid_pre", "resid_post"} <= set(hooks)
    with model.trace(IDS, keep="all") as trace:
        pre = [trace.activations[f"layers.{i}.resid_pre"] for i in range(N_LAYERS)]
        post = [trace.activations[f"layers.{i}.resid_post"] for i in range(N_LAYERS)]
    for i in range(N_LAYERS - 1):
        assert mx.array_equal(post[i], pre[i + 1]), arch


def test_residual_hook_points_add_up(wrapped):
    arch, model = wrapped
    hooks = set(model.names.table.hooks)
    if arch in BOUNDARY_ONLY:
        assert not hooks & {"attn_out", "mlp_out", "resid_mid"}, arch
        with pytest.raises(UnknownModuleError, match="not available"):
            model.resolve("layers.0.attn_out")
        return
    assert {"attn_out", "mlp_out"} <= hooks, (arch, model.names.table.hooks_note)
    names = [f"layers.{i}.{h}" for i in range(N_LAYERS) for h in RESIDUAL if h in hooks]
    _, cache = model.run_with_cache(IDS, names=names)
    for i in range(N_LAYERS):
        get = lambda hook: cache[f"layers.{i}.{hook}"]  # noqa: E731
        if arch in PARALLEL:
            assert "resid_mid" not in hooks
            assert close(get("resid_post"), get("resid_pre") + get("attn_out") + get("mlp_out")), arch
        else:
            assert close(get("resid_mid"), get("resid_pre") + get("attn_out")), arch
            assert close(get("resid_post"), get("resid_mid") + get("mlp_out")), arch


@pytest.mark.parametrize("arch", TRANSFORMERS)
def test_heads_z_through_the_output_projection_is_the_attention_output(arch):
    model = InterpretableModel(tiny_model(arch))
    if "attn.z" not in model.names.table.hooks:
        with pytest.raises(UnknownModuleError, match="not available"):
            model.resolve("layers.0.attn.z")
        assert model.names.table.hooks_note
        return
    layer = N_LAYERS - 1
    with model.trace(IDS) as trace:
        z = trace.activations[f"layers.{layer}.attn.z"]
        heads = [trace.activations[f"layers.{layer}.attn.z.head[{h}]"] for h in range(z.shape[2])]
        attention_output = trace.activations[f"layers.{layer}.attn"]
        pattern = trace.activations[f"layers.{layer}.attn.pattern"]
    from mlxterp.attention import output_projection

    out = output_projection(model.module(f"layers.{layer}.attn"))
    joined = mx.concatenate(heads, axis=-1)
    assert mx.array_equal(joined, z.reshape(*z.shape[:2], -1))
    assert close(out(joined), attention_output), arch
    assert pattern.shape == (1, z.shape[2], len(IDS[0]), len(IDS[0]))
    assert close(pattern.sum(-1), mx.ones(pattern.shape[:-1]))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "phi"])
def test_ablating_mlp_out_changes_only_that_contribution(arch):
    model = InterpretableModel(tiny_model(arch))
    with model.trace(IDS, interventions={"layers.0.mlp_out": iv.zero_out}) as trace:
        mlp = trace.activations["layers.0.mlp_out"]
        pre, post = trace.activations["layers.0.resid_pre"], trace.activations["layers.0.resid_post"]
        attn = trace.activations["layers.0.attn_out"]
    assert not mx.any(mlp).item()
    assert close(post, pre + attn), arch  # the block adds only its attention now


def test_the_architectures_of_the_table_are_the_ones_with_residual_hook_points():
    missing = [a for a in TRANSFORMERS if a not in BOUNDARY_ONLY and a not in BLOCKS
               and a not in ("mistral", "smollm3")]
    # mistral and smollm3 run on llama.py, whose entry covers them
    assert missing == [], missing


@pytest.mark.parametrize("arch", QUANTIZED)
def test_hook_points_of_quantized_models_add_up(arch):
    model = InterpretableModel(tiny_quantized(arch))
    names = [f"layers.0.{h}" for h in RESIDUAL if h in model.names.table.hooks] + ["layers.0.attn.z", "layers.0.attn"]
    _, c = model.run_with_cache(IDS, names=names)
    from mlxterp.attention import output_projection

    z = c["layers.0.attn.z"]
    assert close(output_projection(model.module("layers.0.attn"))(z.reshape(*z.shape[:2], -1)), c["layers.0.attn"])
    assert close(c["layers.0.resid_post"], c["layers.0.resid_mid"] + c["layers.0.mlp_out"]), arch
