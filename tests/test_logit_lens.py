"""Token predictions and the logit lens decode with the model's own norm and unembedding."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_llama

from mlxterp import InterpretableModel
from mlxterp.errors import InputError, LayerIndexError

PROMPT = "The capital of France is"


def test_last_layer_lens_is_the_models_own_output(demo_model):
    model = demo_model
    last = model.n_layers - 1
    lens = model.logit_lens(PROMPT, layers=[last], top_k=3)[last]
    with model.trace(PROMPT):
        logits = model.output.save()[0]
    assert len(lens) == len(model.encode(PROMPT))
    for position, predictions in enumerate(lens):
        expected = np.argsort(-np.array(logits[position]))[:3].tolist()
        assert [token_id for token_id, _, _ in predictions] == expected
        assert predictions[0][1] == pytest.approx(logits[position].max().item(), abs=1e-4)
        assert predictions[0][2] == model.token_to_str(expected[0])


def test_capital_of_france_is_paris_at_the_last_layer(demo_model):
    results = demo_model.logit_lens(PROMPT)
    assert results[demo_model.n_layers - 1][-1][0][2] == " Paris"
    assert sorted(results) == list(range(demo_model.n_layers))


def test_position_gives_one_list_per_layer(demo_model):
    full = demo_model.logit_lens(PROMPT, layers=[4, 15], top_k=2)
    at_two = demo_model.logit_lens(PROMPT, layers=[4, 15], top_k=2, position=2)
    at_last = demo_model.logit_lens(PROMPT, layers=[-1], top_k=2, position=-1)
    def same(a, b):
        return [(i, t) for i, _, t in a] == [(i, t) for i, _, t in b] and \
            [s for _, s, _ in a] == pytest.approx([s for _, s, _ in b], abs=1e-4)

    assert same(at_two[4], full[4][2]) and same(at_two[15], full[15][2])
    assert list(at_last) == [15] and same(at_last[15], full[15][-1])
    scores = [score for _, score, _ in at_two[15]]
    assert scores == sorted(scores, reverse=True)


def test_bad_position_and_layer_are_clear_errors(demo_model):
    with pytest.raises(InputError, match="outside the prompt"):
        demo_model.logit_lens(PROMPT, position=40)
    with pytest.raises(LayerIndexError):
        demo_model.logit_lens(PROMPT, layers=[16])
    with pytest.raises(InputError, match="top_k"):
        demo_model.logit_lens(PROMPT, top_k=0)


def test_plot_writes_a_png_without_a_display(demo_model, tmp_path, capsys):
    target = tmp_path / "lens.png"
    results = demo_model.logit_lens(PROMPT, layers=[0, 8, 15], plot=True, save_path=str(target),
                                    max_display_tokens=4, figsize=(6, 4), cmap="plasma")
    assert target.stat().st_size > 1000 and target.read_bytes()[:4] == b"\x89PNG"
    assert results.plot == str(target) and capsys.readouterr().out == ""  # the library prints nothing
    assert sorted(results) == [0, 8, 15]


def test_token_predictions_of_the_last_layer_match_the_logits(demo_model):
    with demo_model.trace(PROMPT):
        hidden = demo_model.layers[-1].output.save()
        logits = demo_model.output.save()
    predictions = demo_model.get_token_predictions(hidden[0, -1], top_k=5, return_scores=True)
    assert [t for t, _ in predictions] == np.argsort(-np.array(logits[0, -1]))[:5].tolist()
    assert predictions[0][1] == pytest.approx(logits[0, -1].max().item(), abs=1e-4)
    ids_only = demo_model.get_token_predictions(hidden[0, -1], top_k=5)
    assert ids_only == [t for t, _ in predictions]
    per_row = demo_model.get_token_predictions(hidden[0], top_k=1)
    assert [row[0] for row in per_row] == np.argmax(np.array(logits[0]), axis=-1).tolist()


def test_wrong_hidden_size_names_the_expected_one(demo_model):
    with pytest.raises(InputError, match=str(demo_model.hidden_size)):
        demo_model.get_token_predictions(mx.zeros((7,)))


@pytest.mark.parametrize("variant", ["untied", "quantized_tied", "quantized_untied"])
def test_predictions_match_the_model_for_every_unembedding(variant):
    base = tiny_llama(n_layers=2, hidden=64, vocab=256, tie=variant != "untied" and variant != "quantized_untied")
    if variant.startswith("quantized"):
        nn.quantize(base, group_size=32, bits=4)
    model = InterpretableModel(base)
    head = model.names.find("lm_head")
    assert (head is None) == variant.endswith("_tied")
    if variant == "quantized_tied":
        assert isinstance(model.module("embed"), nn.QuantizedEmbedding)
    tokens = [[1, 7, 9, 30]]
    with model.trace(tokens):
        hidden = model.layers[-1].output.save()
        logits = model.output.save()
    predictions = model.get_token_predictions(hidden[0, -1], top_k=4, return_scores=True)
    assert [t for t, _ in predictions] == np.argsort(-np.array(logits[0, -1]))[:4].tolist()
    assert predictions[0][1] == pytest.approx(logits[0, -1].max().item(), abs=1e-4)


def test_gemma2_final_softcap_is_applied():
    from mlx_lm.models import gemma2

    args = gemma2.ModelArgs(model_type="gemma2", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                            num_attention_heads=4, head_dim=16, rms_norm_eps=1e-5, vocab_size=100,
                            num_key_value_heads=4, query_pre_attn_scalar=16, final_logit_softcapping=0.5)
    model = InterpretableModel(gemma2.Model(args))
    with model.trace([[1, 2, 3]]):
        hidden = model.layers[-1].output.save()
        logits = model.output.save()
    (_, score), = model.get_token_predictions(hidden[0, -1], top_k=1, return_scores=True)
    assert abs(score) <= 0.5 and score == pytest.approx(logits[0, -1].max().item(), abs=1e-5)


def test_lens_under_interventions_changes_only_downstream_layers(demo_model):
    from mlxterp import interventions as iv

    text = "The capital of France is"
    plain = demo_model.logit_lens(text, layers=[3, 12], top_k=3)
    zeroed = demo_model.logit_lens(text, layers=[3, 12], top_k=3, interventions={"layers.10": iv.zero_out})
    assert zeroed[3] == plain[3]
    assert zeroed[12] != plain[12]
