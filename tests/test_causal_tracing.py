"""Causal tracing on the demo model: noise on the subject, clean states restored, batched."""

from pathlib import Path

import numpy as np
import pytest

from mlxterp.causal_tracing import CausalTrace, causal_trace, subject_positions
from mlxterp.errors import InputError, PositionError

SAMPLES = 3


@pytest.fixture(scope="module")
def france(demo_model):
    return causal_trace(demo_model, "The capital of France is", "France", samples=SAMPLES)


def test_noise_on_the_subject_takes_the_answer_away(france):
    assert france.answer == " Paris" and france.subject == [4]
    assert france.clean_probability > 0.9
    assert france.corrupted_probability < france.clean_probability - 0.2


def test_restoring_a_position_before_the_subject_changes_nothing(france):
    # Positions before the subject are the same in the clean and corrupted runs.
    for kind in ("residual", "mlp", "attn"):
        assert np.allclose(france.probabilities[kind][:, :4], france.corrupted_probability, atol=1e-5)


def test_the_subject_carries_the_fact_early_and_the_last_position_late(france):
    effect = france.indirect_effect("residual")
    subject, last = france.subject[-1], len(france.tokens) - 1
    early, late = effect[:6], effect[-4:]
    assert early[:, subject].mean() > 0.5 * (france.clean_probability - france.corrupted_probability)
    assert early[:, subject].mean() > early[:, last].mean() + 0.05
    assert late[:, last].mean() > late[:, subject].mean() + 0.3
    # restoring the last layer's output at the last position restores the clean answer exactly
    assert effect[-1, last] == pytest.approx(france.clean_probability - france.corrupted_probability, abs=1e-4)


def test_the_subjects_last_token_matters_more_than_its_first(demo_model):
    """Over several landmarks of two tokens, restoring the subject's last token in the
    first half of the layers beats restoring its first token (ROME's picture)."""
    landmarks = ["Prado Museum", "Charles Bridge", "Schonbrunn Palace", "Brandenburg Gate", "Vasa Museum"]
    first, last = [], []
    for landmark in landmarks:
        trace = causal_trace(demo_model, f"The {landmark} is located in the city of", landmark,
                             kinds="residual", samples=SAMPLES, layers=range(8))
        assert len(trace.subject) == 2
        effect = trace.indirect_effect("residual")
        first.append(effect[:, trace.subject[0]].mean())
        last.append(effect[:, trace.subject[-1]].mean())
    assert np.mean(last) > np.mean(first) + 0.1
    assert sum(b > a for a, b in zip(first, last)) >= 4


def test_batches_of_any_size_give_the_same_heatmaps(demo_model):
    options = dict(kinds=["mlp", "attn"], samples=2, layers=[0, 7, 15], window=4)
    one_pass = causal_trace(demo_model, "The capital of Italy is", "Italy", **options)
    one_cell_per_pass = causal_trace(demo_model, "The capital of Italy is", "Italy", batch_size=3, **options)
    for kind in ("mlp", "attn"):
        assert np.allclose(one_pass.probabilities[kind], one_cell_per_pass.probabilities[kind], atol=1e-5)
    assert one_pass.probabilities["mlp"].shape == (3, 6)


def test_the_noise_is_seeded(demo_model):
    options = dict(kinds="residual", samples=2, layers=[3])
    a = causal_trace(demo_model, "The capital of Spain is", "Spain", seed=1, **options)
    b = causal_trace(demo_model, "The capital of Spain is", "Spain", seed=1, **options)
    c = causal_trace(demo_model, "The capital of Spain is", "Spain", seed=2, **options)
    assert np.array_equal(a.probabilities["residual"], b.probabilities["residual"])
    assert a.corrupted_probability != c.corrupted_probability
    assert a.noise_std == pytest.approx(3 * float(np.std(np.array(demo_model.module("embed").weight))), rel=0.1)


def test_result_round_trips_and_draws_three_heatmaps(france, tmp_path):
    assert CausalTrace.from_data(france.to_data()) == france
    path = france.save_plot(tmp_path / "trace.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    text = france.to_data(text=True)["text"]
    assert "' France'*" in text and "clean 0.9" in text


def test_subject_by_text_or_positions():
    tokens = ["<s>", "The", " Eiffel", " Tower", " is"]
    assert subject_positions("Eiffel Tower", tokens) == [2, 3]
    assert subject_positions(" Tower", tokens) == [3]
    assert subject_positions(slice(2, 4), tokens) == [2, 3]
    assert subject_positions([3, 2], tokens) == [2, 3]
    with pytest.raises(PositionError, match="no run of tokens of the prompt spells the subject 'Eiffel Towers'"):
        subject_positions("Eiffel Towers", tokens)


def test_bad_options_say_what_is_valid(demo_model):
    with pytest.raises(InputError, match="choose from residual, mlp, attn"):
        causal_trace(demo_model, "The capital of France is", "France", kinds="embeddings")
    with pytest.raises(InputError, match="positive multiple"):
        causal_trace(demo_model, "The capital of France is", "France", noise=0)
    with pytest.raises(InputError, match="single token"):
        causal_trace(demo_model, "The capital of France is", "France", answer=" Paris Paris")
