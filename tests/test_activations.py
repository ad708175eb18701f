"""Collecting activations: guide shapes, padding-independent values, batches, shards on disk."""

import numpy as np
import pytest

from mlxterp import batch_get_activations, get_activations
from mlxterp.collect import iter_activation_shards, load_activations
from mlxterp.errors import InputError, LayerIndexError

PROMPTS = ["The quick brown fox", "Hello world", "Machine learning is", "The capital of France is Paris"]


def assert_close(a, b):
    """Equal up to float32 rounding of a different batch: 1e-4 of the largest activation."""
    a, b = np.array(a), np.array(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())


def test_guide_shapes(demo_model):
    hidden = demo_model.hidden_size
    acts = get_activations(demo_model, prompts=PROMPTS[:3], layers=[3, 8, 12], positions=-1)
    assert sorted(acts) == ["layer_12", "layer_3", "layer_8"]
    assert acts["layer_3"].shape == (3, hidden)
    two = get_activations(demo_model, prompts="Hello world", layers=[5], positions=[0, -1])
    assert two["layer_5"].shape == (1, 2, hidden)


def test_values_are_the_layer_outputs_at_each_prompts_own_positions(demo_model):
    acts = get_activations(demo_model, PROMPTS, layers=[2, "layers.5.mlp"], positions=[0, 1, -1])
    for row, prompt in enumerate(PROMPTS):
        with demo_model.trace(prompt):
            layer = demo_model.layers[2].output.save()[0]
            mlp = demo_model.layers[5].mlp.output.save()[0]
        for k, position in enumerate([0, 1, -1]):
            assert_close(acts["layer_2"][row, k], layer[position])
            assert_close(acts["layers.5.mlp"][row, k], mlp[position])


def test_batches_keep_prompt_order_and_equal_one_batch(demo_model):
    prompts = [f"Sample prompt {i} " + "word " * (i % 7) for i in range(23)]
    whole = get_activations(demo_model, prompts, layers=[4, 9])
    batched = batch_get_activations(demo_model, prompts, layers=[4, 9], batch_size=5)
    for key in whole:
        assert_close(batched[key], whole[key])


def test_progress_bar_on_request_does_not_change_results(demo_model, capsys):
    plain = batch_get_activations(demo_model, PROMPTS, layers=[1], batch_size=2, progress=False)
    shown = batch_get_activations(demo_model, PROMPTS, layers=[1], batch_size=2, progress=True)
    assert np.array_equal(np.array(plain["layer_1"]), np.array(shown["layer_1"]))


def test_streaming_to_shards_and_reading_back(demo_model, tmp_path):
    prompts = [f"Sample prompt {i}" for i in range(20)]
    in_memory = batch_get_activations(demo_model, prompts, layers=[3, 8], batch_size=4)
    path = batch_get_activations(demo_model, prompts, layers=[3, 8], batch_size=4, out=tmp_path / "acts",
                                 shard_size=8)
    assert sorted(p.name for p in path.glob("shard-*.safetensors")) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    loaded = load_activations(path)
    for key in ("layer_3", "layer_8"):
        assert_close(loaded[key], in_memory[key])
    indices = [shard["index"].tolist() for shard in iter_activation_shards(path, keys=["layer_8"])]
    assert sum(indices, []) == list(range(20))
    with pytest.raises(InputError, match="already holds"):
        batch_get_activations(demo_model, prompts, layers=[3], out=path)
    with pytest.raises(InputError, match="no activations named"):
        load_activations(path, keys=["layer_5"])


def test_bad_requests_are_clear_errors(demo_model, tmp_path):
    with pytest.raises(InputError, match="outside prompt 1"):
        get_activations(demo_model, ["The capital of France is", "Hi"], layers=[1], positions=[5])
    with pytest.raises(LayerIndexError):
        get_activations(demo_model, PROMPTS, layers=[99])
    with pytest.raises(InputError, match="batch_size"):
        batch_get_activations(demo_model, PROMPTS, layers=[1], batch_size=0)
    with pytest.raises(InputError, match="meta.json"):
        load_activations(tmp_path)


def test_collection_stops_between_batches_and_resumes_from_its_shards(tmp_path):
    from mlxterp import InterpretableModel, batch_get_activations
    from mlxterp.collect import load_activations
    from mlxterp.errors import Interrupted

    model = InterpretableModel("demo")
    prompts = [f"The capital of France is {i}" for i in range(12)]
    asked = []

    def stop_on_the_third_ask():
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(Interrupted, match="resumes"):
        batch_get_activations(model, prompts, [3], batch_size=2, shard_size=4, out=tmp_path / "acts",
                              progress=False, should_stop=stop_on_the_third_ask)
    assert len(asked) == 3  # asked before each batch: two batches ran, the third was refused
    done = batch_get_activations(model, prompts, [3], batch_size=2, shard_size=4, out=tmp_path / "acts", progress=False)
    whole = batch_get_activations(model, prompts, [3], batch_size=2, progress=False)
    loaded = load_activations(done)
    assert set(loaded) == set(whole)
    for key in whole:
        assert np.allclose(np.array(loaded[key]), np.array(whole[key]), atol=1e-5)
