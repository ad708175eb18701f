"""Attention patterns are the probabilities the forward pass really used, for each architecture."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from mlxterp import InterpretableModel
from mlxterp.errors import LayerIndexError, MlxterpError

COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=100, head_dim=16, rope_theta=10000.0,
              tie_word_embeddings=True, max_position_embeddings=256)
ARCHITECTURES = {
    "llama": {},
    "mistral": {},  # mlx-lm builds Mistral with its Llama code
    "qwen2": {},
    "qwen3": {},  # q/k norms
    "gemma2": {"query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0},  # softcap small enough to bite
    "llama_sliding": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3},
}


def tiny(arch):
    code = "llama" if arch in ("mistral", "llama_sliding") else arch
    module = importlib.import_module(f"mlx_lm.models.{code}")
    fields = module.ModelArgs.__dataclass_fields__
    options = {**COMMON, **ARCHITECTURES[arch], "model_type": code}
    mx.random.seed(1)
    base = module.Model(module.ModelArgs(**{k: v for k, v in options.items() if k in fields}))
    mx.eval(base.parameters())
    return InterpretableModel(base)


def output_from_patterns(model, layer, x, probabilities):
    """probabilities @ v through o_proj: what the attention module returns if the pattern is right."""
    attention = model.module(f"layers.{layer}.attn")
    batch, length, _ = x.shape
    values = attention.v_proj(x).reshape(batch, length, attention.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = mx.repeat(values, attention.n_heads // attention.n_kv_heads, axis=1)
    mixed = (probabilities @ values.astype(mx.float32)).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    return attention.o_proj(mixed)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_patterns_reproduce_the_attention_output(arch):
    model = tiny(arch)
    tokens = [[1, 5, 9, 2, 7, 3, 8]]
    patterns = model.get_attention_patterns(tokens, layers=[0, 1])
    with model.trace(tokens):
        inputs = {i: model.layers[i].attn.input.save() for i in (0, 1)}
        outputs = {i: model.layers[i].attn.output.save() for i in (0, 1)}
    for layer in (0, 1):
        probabilities = patterns[layer]
        assert probabilities.shape == (1, 4, 7, 7)
        assert np.allclose(np.array(probabilities.sum(-1)), 1.0, atol=1e-5)
        assert np.allclose(np.triu(np.array(probabilities[0, 0]), k=1), 0.0)  # causal
        if arch == "llama_sliding" and layer == 0:
            assert np.allclose(np.tril(np.array(probabilities[0, 0]), k=-3), 0.0)  # window of 3
        rebuilt = output_from_patterns(model, layer, inputs[layer], probabilities)
        assert mx.abs(rebuilt - outputs[layer]).max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_padded_batch_rows_equal_each_prompt_alone(arch):
    model = tiny(arch)
    prompts = [[1, 5, 9, 2, 7], [4, 6, 3]]
    batched = model.get_attention_patterns(prompts, layers=1)[1]
    with model.trace(prompts):
        x = model.layers[1].attn.input.save()
        out = model.layers[1].attn.output.save()
    rebuilt = output_from_patterns(model, 1, x, batched)
    assert mx.abs(rebuilt[0] - out[0]).max().item() < 1e-4
    assert mx.abs(rebuilt[1, 2:] - out[1, 2:]).max().item() < 1e-4
    alone = model.get_attention_patterns([prompts[1]], layers=1)[1]
    assert np.allclose(np.array(batched[1, :, 2:, 2:]), np.array(alone[0]), atol=1e-5)
    assert np.all(np.array(batched[1, :, :, :2]) == 0)  # nothing attends to padding


def test_softcap_is_part_of_the_gemma2_pattern():
    model = tiny("gemma2")
    capped = model.get_attention_patterns([[1, 5, 9, 2, 7]], layers=0)[0]
    attention = model.module("layers.0.attn")
    attention.attn_logit_softcapping = 1000.0  # effectively no cap
    try:
        uncapped = model.get_attention_patterns([[1, 5, 9, 2, 7]], layers=0)[0]
    finally:
        attention.attn_logit_softcapping = 5.0
    assert mx.abs(capped - uncapped).max().item() > 1e-3


def test_unsupported_architecture_is_named_in_the_error():
    from mlx_lm.models import phi3

    args = phi3.ModelArgs(model_type="phi3", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                          num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=100, num_key_value_heads=4)
    model = InterpretableModel(phi3.Model(args))
    with pytest.raises(MlxterpError, match="phi3"):
        model.get_attention_patterns([[1, 2, 3]])


def test_layer_out_of_range_is_an_error():
    with pytest.raises(LayerIndexError):
        tiny("llama").get_attention_patterns([[1, 2, 3]], layers=[5])
