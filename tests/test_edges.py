"""What a new user hits at the edges (issue 14, items 1-8): results that are right, or errors
that say why, for the cases where they used to be silently wrong."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest

import mlxterp.interventions as iv
from mlxterp import get_activations, batch_get_activations
from mlxterp.errors import InputError, MlxterpError
from mlxterp_repl.dsl import QueryError, Session, TraceCache

PROMPT = "The capital of France is"


@pytest.fixture
def session(demo_model):
    s = Session(demo_model)
    s.execute(f'prompt "{PROMPT}"')
    return s


def one(session, text, **options):
    (result,) = session.execute(text, **options)
    return result


def rope_calls(model, text, layer=8):
    """Every call of layer `layer`'s RoPE in one forward pass, in order, recorded by hand."""
    module = model.module(f"layers.{layer}.attn.rope")
    seen = []
    original = type(module).__call__

    class Spy(type(module)):
        def __call__(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            seen.append(out)
            return out

    module.__class__ = Spy
    try:
        model.model(mx.array([model.encode(text)]))
    finally:
        module.__class__ = Spy.__mro__[1]
    return [np.array(a) for a in seen]


# -- 1. positions on outputs that are not (batch, tokens, hidden) --------------------------------

def test_a_position_on_rope_selects_the_token_axis_not_the_heads(session, demo_model):
    calls = rope_calls(demo_model, PROMPT)
    assert len(calls) == 2  # queries, then keys
    keys = calls[-1]  # (1, kv_heads, tokens, head_dim)
    result = one(session, "save layers.8.attn.rope @ -1")
    label, array = result.arrays[0]
    np.testing.assert_allclose(array, keys[0, :, -1, :], rtol=1e-5, atol=1e-5)
    assert any("2 times" in note and "last call" in note for note in result.notes), result.notes


def test_with_as_many_tokens_as_heads_the_position_still_indexes_tokens(demo_model):
    session = Session(demo_model)
    text = "The"  # with BOS: as many tokens as the demo model has key/value heads
    calls = rope_calls(demo_model, text)
    assert calls[-1].shape[1] == calls[-1].shape[2]
    session.execute(f'prompt "{text}"')
    _, array = one(session, "save layers.8.attn.rope @ 0").arrays[0]
    np.testing.assert_allclose(array, calls[-1][0, :, 0, :], rtol=1e-5, atol=1e-5)


def test_collected_activations_of_rope_are_taken_along_its_token_axis(demo_model):
    keys = rope_calls(demo_model, PROMPT)[-1]
    acts = get_activations(demo_model, [PROMPT], ["layers.8.attn.rope"], positions=[0, -1])
    np.testing.assert_allclose(np.array(acts["layers.8.self_attn.rope"])[0], keys[0, :, [0, -1], :],  # (positions, heads, head_dim)
                               rtol=1e-5, atol=1e-5)


def test_a_position_on_an_output_without_the_token_axis_is_a_clear_error(demo_model):
    from mlxterp.attention import token_axis

    assert token_axis(demo_model, demo_model.resolve("layers.3"), (1, 6, 128), 6) == 1
    assert token_axis(demo_model, demo_model.resolve("layers.3.attn.rope"), (1, 2, 6, 32), 6) == 2
    with pytest.raises(MlxterpError, match="token axis.*not known"):
        token_axis(demo_model, demo_model.resolve("layers.3.mlp"), (1, 128), 6)


# -- 2. steering is checked when it is set ---------------------------------------------------------

@pytest.mark.parametrize("shape", [(160,), (6, 128), ()])
def test_steering_with_a_vector_of_the_wrong_shape_is_refused_at_the_steer_line(session, shape):
    session.bind("g", np.ones(shape, np.float32))
    with pytest.raises(QueryError) as caught:
        session.execute("steer layers.6 add $g")
    assert "(128,)" in str(caught.value) and caught.value.span.col == len("steer layers.6 add ") + 1
    assert session.steering == []
    assert one(session, "lens @ -1 top 2").kind == "lens"  # later queries still run


def test_a_right_sized_steering_vector_is_accepted(session):
    session.bind("g", np.ones(128, np.float32))
    assert "layers.6 add $g" in one(session, "steer layers.6 add $g").message


# -- 3. lens is served by the trace cache --------------------------------------------------------

def test_lens_and_save_on_one_prompt_share_one_forward_pass(session, demo_model):
    cache = TraceCache()
    before = demo_model.forward_count
    session.execute("lens", trace_cache=cache)
    session.execute("save layers.8 @ -1\nlens @ -1 top 3", trace_cache=cache)
    assert demo_model.forward_count == before + 1
    assert cache.hits == 2 and cache.report()["hits"] == 2


# -- 4. options are never silently ignored -----------------------------------------------------

def test_lens_top_is_honoured_or_refused_with_the_reason(session, demo_model):
    with pytest.raises(QueryError, match="vocabulary"):
        session.execute("lens top 5000")
    grid = one(session, "lens @ [0, -1] top 2")
    assert grid.positions == [0, 5] and grid.ids.shape[-1] == 2
    assert one(session, "lens top 1000").ids.shape[-1] == 1000


def test_logit_lens_with_a_save_path_alone_plots(demo_model, tmp_path):
    path = tmp_path / "new" / "dir" / "lens.png"
    result = demo_model.logit_lens(PROMPT, save_path=str(path))
    assert path.stat().st_size > 1000 and result.plot == str(path)


# -- 5. answers without a leading space ------------------------------------------------------------

def test_an_answer_without_its_leading_space_warns(session, demo_model):
    from mlxterp.analysis import answer_id

    with pytest.warns(UserWarning, match="' Paris'"):
        answer_id(demo_model, "Paris")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answer_id(demo_model, " Paris")
    result = one(session, 'patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France" '
                          'metric logit_diff answers "Paris" "London" layers 0..1')
    assert any("' Paris'" in note for note in result.notes), result.notes


# -- 6. calling the model ---------------------------------------------------------------------------

def test_calling_the_model_with_text_or_ids_returns_the_traced_logits(demo_model):
    with demo_model.trace("The capital") as tr:
        traced = tr.save("output")
    np.testing.assert_allclose(np.array(demo_model("The capital")), np.array(traced), rtol=1e-5, atol=1e-5)
    ids = demo_model.encode("The capital")
    assert demo_model(ids).shape == (1, len(ids), demo_model.vocab_size)
    assert demo_model(mx.array(ids)).shape == (1, len(ids), demo_model.vocab_size)
    with pytest.raises(InputError, match="token id"):
        demo_model([1, 10**6])


# -- 7. Python API edges ---------------------------------------------------------------------------

def test_zero_out_called_or_not_is_the_same_intervention(demo_model):
    with demo_model.trace(PROMPT, interventions={"layers.3": iv.zero_out()}) as tr:
        called = tr.activations["layers.3"]
    with demo_model.trace(PROMPT, interventions={"layers.3": iv.zero_out}) as tr:
        plain = tr.activations["layers.3"]
    assert float(mx.abs(called).max()) == 0.0 and float(mx.abs(plain).max()) == 0.0


def test_an_uncalled_factory_gets_a_one_line_hint(demo_model):
    with pytest.raises(MlxterpError) as caught:
        with demo_model.trace(PROMPT, interventions={"layers.1": iv.scale}):
            pass
    message = str(caught.value)
    assert "iv.scale(0.5)" in message and "\n" not in message and "array(" not in message


def test_an_intervention_of_the_wrong_shape_names_the_module_and_both_shapes(demo_model):
    with pytest.raises(MlxterpError) as caught:
        with demo_model.trace(PROMPT, interventions={"layers.1": lambda a: a[:, :1]}):
            pass
    message = str(caught.value)
    assert "layers.1" in message and "(1, 1, 128)" in message and "(1, 6, 128)" in message


def test_activations_accept_none_defaults_and_collect_patterns(demo_model):
    prompts = [PROMPT, "Hello world"]
    everything = get_activations(demo_model, prompts, None, positions=None)
    assert sorted(everything) == sorted(f"layer_{i}" for i in range(demo_model.n_layers))
    patterned = get_activations(demo_model, prompts, ["0..2", "layers.*.attn", "layers.4", "layers.5.mlp"])
    assert {"layer_0", "layer_1", "layer_2", "layer_4", "layers.5.mlp", "layers.3.self_attn"} <= set(patterned)
    assert len([k for k in patterned if k.endswith("self_attn")]) == demo_model.n_layers
    np.testing.assert_array_equal(np.array(patterned["layer_4"]), np.array(everything["layer_4"]))
    batched = batch_get_activations(demo_model, prompts, "3,8", batch_size=None, positions=None, shard_size=None)
    assert sorted(batched) == ["layer_3", "layer_8"]


def test_token_to_str_of_an_id_outside_the_vocabulary_raises(demo_model):
    for bad in (demo_model.vocab_size, 10**6, -1):
        with pytest.raises(InputError, match="outside the vocabulary"):
            demo_model.token_to_str(bad)


def test_the_library_prints_nothing_on_stdout(demo_model, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="mlxterp"):
        demo_model.logit_lens(PROMPT, plot=True, save_path=str(tmp_path / "a" / "lens.png"))
        demo_model.activation_patching("Paris is the capital of France", "London is the capital of France",
                                       layers=[0, 1], save_path=str(tmp_path / "b" / "patch.png"))
        batch_get_activations(demo_model, [PROMPT] * 4, [1], batch_size=1, progress=True)
    assert capsys.readouterr().out == ""
    assert "lens.png" in caplog.text and (tmp_path / "b" / "patch.png").exists()


# -- 8. non-ASCII ------------------------------------------------------------------------------------

def test_bytes_that_are_not_utf8_alone_are_shown_as_hex(demo_model):
    from mlxterp.core.positions import show_bytes, token_bytes

    tokens = demo_model.token_strings(demo_model.encode("Zürich"))
    assert "<0xC3>" in tokens and "<0xBC>" in tokens and not any("\ufffd" in t for t in tokens)
    assert show_bytes("ü".encode()[:1]) == "<0xC3>" and token_bytes("a<0xC3><0xBC>") == "aü".encode()


def test_a_word_spread_over_several_tokens_is_found_by_its_text(demo_model):
    from mlxterp.core.positions import find_run

    session = Session(demo_model)
    text = "Zürich and München"
    tokens = demo_model.token_strings(demo_model.encode(text))
    run = find_run("Zürich", tokens)
    assert run and "".join(tokens[i] for i in run) == "Z<0xC3><0xBC>rich"
    result = one(session, f'save layers.1 @ "München" in "{text}"')
    assert result.arrays[0][1].shape[0] == len(find_run("München", tokens))
    with pytest.raises(QueryError, match="no token"):
        session.execute(f'save layers.1 @ "Zurich" in "{text}"')
