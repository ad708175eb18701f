"""The tuned lens on the demo model: trained from collected shards, better than the logit lens, saved exactly."""

import mlx.core as mx
import numpy as np
import pytest

from mlxterp.errors import InputError
from mlxterp.training import collect_tokens, demo_texts
from mlxterp.tuned_lens import TunedLens, compare_lenses, train_tuned_lens

TRAIN_TEXTS, HELD_OUT_TEXTS = 160, 60


@pytest.fixture(scope="module")
def texts():
    texts = demo_texts(seed=1)
    return texts[:TRAIN_TEXTS], texts[-HELD_OUT_TEXTS:]


@pytest.fixture(scope="module")
def shards(demo_model, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned-lens") / "acts"
    return collect_tokens(demo_model, texts[0], range(demo_model.n_layers), out=out, shard_size=64, progress=False)


@pytest.fixture(scope="module")
def lens(demo_model, shards):
    return train_tuned_lens(demo_model, shards, steps=25, batch_size=64, learning_rate=2e-3, progress=False)


def test_collect_tokens_rows_are_each_tokens_activation(demo_model, texts, shards):
    from mlxterp.collect import load_activations

    rows = load_activations(shards)
    text = texts[0][5]
    with demo_model.trace(text) as tr:
        hidden = tr.save(demo_model.names.layer_names[8])[0]
    mine = np.array(rows["prompt"]) == 5
    assert np.array(rows["position"])[mine].tolist() == list(range(hidden.shape[0]))
    assert np.array(rows["token"])[mine].tolist() == demo_model.encode(text)
    assert np.allclose(np.array(rows["layer_8"])[mine], np.array(hidden), atol=1e-3, rtol=1e-4)
    assert rows["layer_0"].shape[0] == sum(len(demo_model.encode(t)) for t in texts[0])


def test_training_loss_decreases(lens):
    assert np.mean(lens.history[-5:]) < 0.7 * np.mean(lens.history[:3])


def test_tuned_lens_kl_is_below_the_logit_lens_at_every_layer_before_the_last(demo_model, texts, lens):
    comparison = compare_lenses(demo_model, texts[1], lens)
    assert comparison.n_tokens > 400
    for layer in comparison.layers[:-1]:
        assert comparison.tuned_lens_kl[layer] < comparison.logit_lens_kl[layer], layer
    # the last layer's lens is the model's own output
    assert comparison.logit_lens_kl[-1] == pytest.approx(0, abs=1e-4)
    assert comparison.tuned_lens_kl[-1] == pytest.approx(0, abs=1e-4)
    assert type(comparison).from_data(comparison.to_data()) == comparison


def test_save_and_load_round_trip_exactly(demo_model, lens, tmp_path):
    lens.save(tmp_path / "lens")
    loaded = TunedLens.load(tmp_path / "lens")
    assert np.array_equal(np.array(loaded.weight), np.array(lens.weight))
    assert np.array_equal(np.array(loaded.bias), np.array(lens.bias))
    hidden = mx.random.normal((3, demo_model.hidden_size), key=mx.random.key(0))
    assert np.array_equal(np.array(loaded.logits(demo_model, hidden, 4)), np.array(lens.logits(demo_model, hidden, 4)))


def test_resumed_training_ends_where_uninterrupted_training_does(demo_model, shards, tmp_path):
    options = dict(batch_size=16, learning_rate=2e-3, progress=False, checkpoint_every=2)
    whole = train_tuned_lens(demo_model, shards, steps=4, checkpoint_dir=tmp_path / "a", **options)
    train_tuned_lens(demo_model, shards, steps=2, checkpoint_dir=tmp_path / "b", **options)
    resumed = train_tuned_lens(demo_model, shards, steps=4, checkpoint_dir=tmp_path / "b", **options)
    assert np.allclose(np.array(resumed.weight), np.array(whole.weight), atol=1e-6)
    assert resumed.history.tolist() == pytest.approx(whole.history.tolist(), rel=1e-5)
    with pytest.raises(InputError, match="different training run"):
        train_tuned_lens(demo_model, shards, steps=4, checkpoint_dir=tmp_path / "b", batch_size=8, progress=False)


def test_logit_lens_with_lens_tuned_decodes_through_the_translators(demo_model, lens):
    text = "The capital of France is"
    plain = demo_model.logit_lens(text, position=-1)
    identity = demo_model.logit_lens(text, position=-1, lens="tuned", translators=TunedLens.for_model(demo_model))
    tuned = demo_model.logit_lens(text, position=-1, lens="tuned", translators=lens)
    top = lambda result: [result[layer][0][0] for layer in range(demo_model.n_layers)]  # noqa: E731
    assert top(identity) == top(plain)  # an untrained lens is the logit lens
    assert top(tuned)[-1] == top(plain)[-1]
    assert top(tuned) != top(plain)


def test_lens_arguments_are_checked(demo_model, lens, tmp_path):
    with pytest.raises(InputError, match="needs translators"):
        demo_model.logit_lens("Hello", lens="tuned")
    with pytest.raises(InputError, match="unknown lens"):
        demo_model.logit_lens("Hello", lens="tunde", translators=lens)
    with pytest.raises(InputError, match="not a saved tuned lens"):
        TunedLens.load(tmp_path)
    with pytest.raises(InputError, match="16 layers"):
        TunedLens(4, 128).check_model(demo_model)
