"""Attention patterns are the probabilities the forward pass really used, for each architecture."""

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxterp import InterpretableModel
from mlxterp.attention import (SUPPORTED_ARCHITECTURES, output_projection, queries_keys_values,
                              saved_attention_input)
from mlxterp.errors import LayerIndexError, MlxterpError

from architectures import TRANSFORMERS, tiny_model

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
    """probabilities @ v through the output projection: what the attention module returns if the pattern is right."""
    attention = model.module(f"layers.{layer}.attn")
    batch, length, _ = x.shape
    _, _, values = queries_keys_values(attention, x)
    values = mx.repeat(values, probabilities.shape[1] // values.shape[1], axis=1)
    mixed = (probabilities @ values.astype(mx.float32)).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    return output_projection(attention)(mixed)


BATTERY = [arch for arch in TRANSFORMERS if arch in SUPPORTED_ARCHITECTURES]
# Latent attention (deepseek_v2, minicpm3), attention sinks, RoPE on some layers only, chunked attention, no attention.
UNSUPPORTED = ["deepseek_v2", "minicpm3", "gpt_oss", "cohere2", "llama4_text", "mamba"]


def battery_model(arch):
    return InterpretableModel(tiny_model(arch))


def check_reproduces_output(model, tokens, layers=(0, 1), window=None):
    patterns = model.get_attention_patterns(tokens, layers=list(layers))
    with model.trace(tokens):
        inputs = {i: saved_attention_input(model, i) for i in layers}
        outputs = {i: model.layers[i].attn.output.save() for i in layers}
    length = len(tokens[0])
    for layer in layers:
        probabilities = patterns[layer]
        assert probabilities.shape[0] == 1 and probabilities.shape[2:] == (length, length)
        assert np.allclose(np.array(probabilities.sum(-1)), 1.0, atol=1e-5)
        assert np.allclose(np.triu(np.array(probabilities[0, 0]), k=1), 0.0)  # causal
        rebuilt = output_from_patterns(model, layer, inputs[layer], probabilities)
        assert mx.abs(rebuilt - outputs[layer]).max().item() < 1e-4, f"layer {layer}"
    return patterns


def check_padded_batch(model, layer=1):
    prompts = [[1, 5, 9, 2, 7], [4, 6, 3]]
    batched = model.get_attention_patterns(prompts, layers=layer)[layer]
    with model.trace(prompts):
        x = saved_attention_input(model, layer)
        out = model.layers[layer].attn.output.save()
    rebuilt = output_from_patterns(model, layer, x, batched)
    assert mx.abs(rebuilt[0] - out[0]).max().item() < 1e-4
    assert mx.abs(rebuilt[1, 2:] - out[1, 2:]).max().item() < 1e-4
    alone = model.get_attention_patterns([prompts[1]], layers=layer)[layer]
    assert np.allclose(np.array(batched[1, :, 2:, 2:]), np.array(alone[0]), atol=1e-5)
    assert np.all(np.array(batched[1, :, :, :2]) == 0)  # nothing attends to padding


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_patterns_reproduce_the_attention_output(arch):
    patterns = check_reproduces_output(tiny(arch), [[1, 5, 9, 2, 7, 3, 8]])
    assert patterns[0].shape == (1, 4, 7, 7)
    if arch == "llama_sliding":
        assert np.allclose(np.tril(np.array(patterns[0][0, 0]), k=-3), 0.0)  # window of 3


@pytest.mark.parametrize("arch", BATTERY)
def test_battery_patterns_reproduce_the_attention_output(arch):
    model = battery_model(arch)
    patterns = check_reproduces_output(model, [[1, 5, 9, 2, 7, 3, 8]])
    if arch in ("gemma3_text", "olmo3"):  # layer 0 slides a window of 4
        assert np.allclose(np.tril(np.array(patterns[0][0, 0]), k=-4), 0.0)
        assert not np.allclose(np.tril(np.array(patterns[1][0, 0]), k=-4), 0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_padded_batch_rows_equal_each_prompt_alone(arch):
    check_padded_batch(tiny(arch))


@pytest.mark.parametrize("arch", BATTERY)
def test_battery_padded_batch_rows_equal_each_prompt_alone(arch):
    check_padded_batch(battery_model(arch))


def test_every_supported_architecture_is_in_the_battery():
    # Each supported layout is checked above on a real mlx-lm model of that file.
    assert set(SUPPORTED_ARCHITECTURES) <= set(TRANSFORMERS)


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


@pytest.mark.parametrize("arch", UNSUPPORTED)
def test_unsupported_architecture_is_named_in_the_error(arch):
    assert arch not in SUPPORTED_ARCHITECTURES
    with pytest.raises(MlxterpError, match=f"{arch!r} architecture.*Supported: .*llama"):
        battery_model(arch).get_attention_patterns([[1, 2, 3]])


def test_layer_out_of_range_is_an_error():
    with pytest.raises(LayerIndexError):
        tiny("llama").get_attention_patterns([[1, 2, 3]], layers=[5])


@pytest.mark.parametrize("arch, option", [("stablelm", "qk_layernorm"), ("cohere", "use_qk_norm")])
def test_optional_qk_norms_are_part_of_the_pattern(arch, option):
    from mlx_lm.models import cohere, stablelm

    from architectures import BASE, CONFIGS

    module = {"stablelm": stablelm, "cohere": cohere}[arch]
    mx.random.seed(0)
    base = module.Model(module.ModelArgs.from_dict({**BASE, **CONFIGS[arch], option: True, "model_type": arch}))
    # Norm weights start at one; move them so a missing norm could not go unnoticed.
    base.update(nn.utils.tree_map(lambda p: p + 0.5 * mx.random.normal(p.shape), base.parameters()))
    mx.eval(base.parameters())
    model = InterpretableModel(base)
    check_reproduces_output(model, [[1, 5, 9, 2, 7, 3, 8]])
    check_padded_batch(model)


def test_docs_list_exactly_the_supported_architectures():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "analysis.md").read_text()
    listed = text.split("supported architecture (`mlx_lm.models.<module>`):")[1].split("\n\n")[1]
    assert sorted(name.strip() for name in listed.replace("\n", " ").rstrip(".").split(",")) == sorted(
        SUPPORTED_ARCHITECTURES)
