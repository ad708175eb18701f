"""Sparse autoencoders on the demo model's layer-8 residual stream: training, quality, files, features."""

import mlx.core as mx
import numpy as np
import pytest

from mlxterp.errors import InputError
from mlxterp.sae import (
    SparseAutoencoder, active_features, evaluate_sae, load_sae, next_token_loss, top_activating_examples, train_sae,
)
from mlxterp.training import collect_tokens, demo_texts

TRAIN_TEXTS, HELD_OUT_TEXTS = 500, 80
OPTIONS = dict(key="layer_8", expansion=4, k=16, batch_size=256, learning_rate=1e-3, progress=False)


@pytest.fixture(scope="module")
def texts():
    texts = demo_texts(seed=2)
    return texts[:TRAIN_TEXTS], texts[-HELD_OUT_TEXTS:]


@pytest.fixture(scope="module")
def shards(demo_model, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "acts"
    return collect_tokens(demo_model, texts[0], [8], out=out, shard_size=128, progress=False)


@pytest.fixture(scope="module")
def held_out(demo_model, texts):
    return collect_tokens(demo_model, texts[1], [8], progress=False)


@pytest.fixture(scope="module")
def sae(shards):
    return train_sae(shards, kind="topk", steps=200, **OPTIONS)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu"])
def test_training_loss_decreases(shards, kind):
    trained = train_sae(shards, kind=kind, steps=40, **OPTIONS)
    assert trained.n_features == 4 * 128 and trained.module == "layers.8"
    assert np.mean(trained.history[-5:]) < 0.5 * np.mean(trained.history[:3])


def test_reconstruction_explains_held_out_activations(demo_model, sae, held_out, texts, shards):
    """Explained variance >= 0.9 and above the best 4-dimensional linear reconstruction.

    On this layer the top 4 principal components explain ~0.81 of the variance, the top 8 ~0.92
    (computed below from the training rows). An SAE with 16 active features per token that
    explains less than 0.9 does worse than projecting on 5 fixed directions: it is broken.
    Splicing it into the model must keep >= 90 % of the loss a zeroed layer 8 destroys.
    """
    from mlxterp.collect import load_activations

    x = np.array(load_activations(shards, ["layer_8"])["layer_8"], dtype=np.float64)
    singular = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    pca4 = singular[:4].sum() / singular.sum()
    metrics = evaluate_sae(sae, held_out, model=demo_model, texts=texts[1])
    assert metrics.explained_variance >= max(0.9, pca4), metrics.short()
    assert metrics.l0 == pytest.approx(16, abs=0.01)
    assert 0 <= metrics.dead_features < sae.n_features
    assert metrics.ce_clean < metrics.ce_sae < metrics.ce_zero
    assert metrics.loss_recovered >= 0.9
    assert type(metrics).from_data(metrics.to_data()) == metrics


def test_save_and_load_round_trip_exactly(shards, tmp_path):
    trained = train_sae(shards, kind="batchtopk", steps=10, **OPTIONS)
    trained.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.config() == trained.config()
    for (name, a), (_, b) in zip(sorted(trained.parameters().items()), sorted(loaded.parameters().items())):
        assert np.array_equal(np.array(a), np.array(b)), name
    assert loaded.threshold.item() > 0 and loaded.input_scale.item() == trained.input_scale.item()
    x = mx.random.normal((5, 128), key=mx.random.key(1)) * 100
    assert np.array_equal(np.array(loaded.encode(x)), np.array(trained.encode(x)))
    assert np.array_equal(np.array(loaded(x)), np.array(trained(x)))


def test_resumed_training_ends_where_uninterrupted_training_does(shards, tmp_path):
    options = dict(OPTIONS, kind="topk", checkpoint_every=3)
    whole = train_sae(shards, steps=6, checkpoint_dir=tmp_path / "a", **options)
    train_sae(shards, steps=3, checkpoint_dir=tmp_path / "b", **options)
    resumed = train_sae(shards, steps=6, checkpoint_dir=tmp_path / "b", **options)
    assert np.allclose(np.array(resumed.W_dec), np.array(whole.W_dec), atol=1e-6)
    assert resumed.history.tolist() == pytest.approx(whole.history.tolist(), rel=1e-5)


def test_feature_interventions_change_the_output(demo_model, sae):
    text = "The capital of France is"
    found = active_features(demo_model, sae, text, position=-1, top=3)
    assert len(found.features) == 3 and found.activations == sorted(found.activations, reverse=True)
    feature = found.features[0]

    def last_logits(interventions=None):
        with demo_model.trace(text, interventions=interventions):
            logits = demo_model.output.save()
        return np.array(logits[0, -1])

    plain = last_logits()
    assert np.array_equal(last_logits({"layers.8": sae.scale(feature, 1.0)}), plain)
    for change in (sae.ablate(feature), sae.scale(feature, 3.0), sae.steer(feature, 20.0)):
        assert np.abs(last_logits({"layers.8": change}) - plain).max() > 1e-2, change.__name__
    # a feature silent at every position of the prompt: ablating it changes nothing
    with demo_model.trace(text) as tr:
        acts = np.array(sae.encode(tr.save(demo_model.names.layer_names[8])[0]))
    silent = int(np.flatnonzero(acts.max(axis=0) == 0)[0])
    assert np.array_equal(last_logits({"layers.8": sae.ablate(silent)}), plain)


def test_top_activating_examples_are_the_strongest_tokens_with_context(demo_model, sae, texts):
    corpus = texts[1][:40]
    result = top_activating_examples(demo_model, sae, corpus, features=[0, 1, 2, 3], top=5, context=3)
    assert set(result.examples) == {0, 1, 2, 3}
    feature, examples = next((f, e) for f, e in result.examples.items() if e)
    assert [e.activation for e in examples] == sorted((e.activation for e in examples), reverse=True)
    best = examples[0]
    tokens = demo_model.encode(corpus[best.prompt])
    assert best.token == demo_model.token_to_str(tokens[best.position])
    assert best.before == demo_model.token_strings(tokens[max(0, best.position - 3):best.position])
    # recompute every token's activation of that feature one prompt at a time: none beats the best
    strongest = 0.0
    for text in corpus:
        with demo_model.trace(text) as tr:
            hidden = tr.save(demo_model.names.layer_names[8])[0]
        strongest = max(strongest, float(mx.max(sae.encode(hidden)[:, feature]).item()))
    assert best.activation == pytest.approx(strongest, rel=1e-3)


def test_next_token_loss_of_the_demo_model_is_low_on_its_own_sentences(demo_model, texts):
    assert next_token_loss(demo_model, texts[1][:20]) < 2.0


def test_bad_arguments_say_what_is_valid(sae, shards):
    with pytest.raises(InputError, match="topk, batchtopk, relu"):
        SparseAutoencoder(128, 512, kind="gated")
    with pytest.raises(InputError, match="features 0..511"):
        sae.ablate(512)
    with pytest.raises(InputError, match="no activations named"):
        train_sae(shards, key="layer_3", steps=1, progress=False)
    with pytest.raises(InputError, match="k .* cannot exceed"):
        SparseAutoencoder(128, 8, k=16)


def test_collect_tokens_resumes_a_stopped_run_and_refuses_a_different_one(demo_model, texts, shards):
    from pathlib import Path

    from mlxterp.collect import load_activations

    before = load_activations(shards)
    (Path(shards) / "shard-00001.safetensors").unlink()
    collect_tokens(demo_model, texts[0], [8], out=shards, shard_size=128, progress=False)
    after = load_activations(shards)
    for key in before:
        assert np.array_equal(np.array(before[key]), np.array(after[key])), key
    with pytest.raises(InputError, match="different run"):
        collect_tokens(demo_model, texts[0][:50], [8], out=shards, shard_size=128, progress=False)


def test_mlxterp_collect_positions_all_writes_rows_train_sae_reads(texts, tmp_path, capsys):
    from mlxterp_repl.collect import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts[1][:20]) + "\n")
    assert main([str(prompts), "--layers", "8", "--positions", "all", "--out", str(tmp_path / "acts"),
                 "--no-progress"]) == 0
    assert "every token" in capsys.readouterr().out
    trained = train_sae(tmp_path / "acts", kind="relu", steps=3, **OPTIONS)
    assert trained.history.shape == (3,)
