"""The remembered capture plan (mlxterp.trace.record_plan) and the numpy-free token id check:
repeated restricted traces record the same modules and values, a replaced name table is noticed,
and bad token ids are still refused whatever the input's form."""

import mlx.core as mx
import pytest

from conftest import tiny_llama
from mlxterp import InterpretableModel
from mlxterp.errors import InputError
from mlxterp.naming import ModuleNames
from mlxterp.trace import record_plan

IDS = [[1, 5, 9, 2], [3, 3, 7, 8]]


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_llama())


def restricted(model, capture):
    with model.trace(IDS, capture=capture) as trace:
        saved = model.layers[1].output.save()
        logits = model.output.save()
    return trace, saved, logits


def test_repeated_restricted_traces_record_the_same(model):
    first, saved1, logits1 = restricted(model, ["layers.1", "layers.2.mlp"])
    second, saved2, logits2 = restricted(model, ["layers.1", "layers.2.mlp"])
    assert set(first.activations) == set(second.activations)
    assert "model.layers.2.mlp" in second.activations and "model.layers.0" not in second.activations
    assert mx.array_equal(saved1, saved2) and mx.array_equal(logits1, logits2)
    assert mx.array_equal(logits2, model.model(mx.array(IDS)))


def test_an_intervention_outside_the_capture_is_still_applied(model):
    restricted(model, ["layers.1"])  # plan remembered without layers.0
    with model.trace(IDS, capture=["layers.1"], interventions={"layers.0": lambda x: x * 0}) as trace:
        pass
    assert float(mx.abs(trace.activations["model.layers.0"]).max()) == 0.0


def test_a_replaced_name_table_is_noticed(model):
    restricted(model, ["layers.1"])
    plan = record_plan(model, ["layers.1"], False)
    assert record_plan(model, ["layers.1"], False) is plan  # remembered
    model.names = ModuleNames(model.model, "layers")
    assert record_plan(model, ["layers.1"], False) is not plan  # a new table: planned again
    trace, saved, _ = restricted(model, ["layers.1"])
    assert set(trace.activations) == {model.resolve("layers.1"), "output"}
    assert saved.shape == (2, 4, 64)


@pytest.mark.parametrize("inputs", [[1, 2, 100], [[1, 2], [0, -1]], mx.array([[1, 2, 100]])])
def test_token_ids_outside_the_vocabulary_are_refused(model, inputs):
    with pytest.raises(InputError, match="outside the vocabulary: ids run from 0 to 99"):
        with model.trace(inputs):
            pass


def test_an_array_of_ids_changed_in_place_is_checked_again(model):
    ids = mx.array(IDS)
    with model.trace(ids) as first:
        pass
    assert first.tokens == IDS
    ids[0, 0] = 100  # the same Python object, other contents: out of the vocabulary now
    with pytest.raises(InputError, match="token id 100 is outside the vocabulary"):
        with model.trace(ids):
            pass


def embedding_input(model, ids):
    with model.trace(ids, keep="saved") as trace:
        seen = trace.save(model.names.find("embed"), "input")
        logits = model.output.save()
    return trace, seen, logits


def test_the_model_reads_its_own_copy_of_the_ids_it_checked(model):
    import numpy as np

    ids = mx.array(IDS)
    _, seen, logits = embedding_input(model, ids)
    assert seen is not ids and mx.array_equal(seen, ids)
    ids[0, 0] = 7  # the caller's array changed after the trace: the trace's values did not
    assert mx.array_equal(seen, mx.array(IDS))
    # Written through a numpy view, what the trace handed out changes; the next trace of the same ids does not.
    view = np.array(seen, copy=False)
    view[0, 0] = 99
    _, again, logits_again = embedding_input(model, mx.array(IDS))
    assert again.tolist() == IDS and mx.array_equal(logits_again, logits)
    assert mx.array_equal(logits, model.model(mx.array(IDS)))


def test_ids_traced_again_reuse_the_array_made_for_them(model):
    from mlxterp import trace as trace_module

    embedding_input(model, mx.array(IDS))
    kept = trace_module._model_ids[2]
    embedding_input(model, IDS)  # the same ids as a list
    assert trace_module._model_ids[2] is kept
    trace, _, _ = embedding_input(model, mx.array([[1, 5, 9, 3], [3, 3, 7, 8]]))  # other ids: another array
    other = trace_module._model_ids[2]
    assert other is not kept and trace.tokens[0][-1] == 3
    trace.tokens[0][0] = 42  # the trace's tokens are the caller's to change, not the kept copy
    embedding_input(model, [[1, 5, 9, 3], [3, 3, 7, 8]])
    assert trace_module._model_ids[2] is other and trace_module._model_ids[1][0][0] == 1


def test_big_inputs_are_not_kept_for_next_time(model, monkeypatch):
    from mlxterp import trace as trace_module

    monkeypatch.setattr(trace_module, "MODEL_IDS_CACHED", 4)
    embedding_input(model, [[1, 2, 3]])
    _, _, logits = embedding_input(model, IDS)  # 8 ids, over the bound
    assert trace_module._model_ids[1] == [[1, 2, 3]]
    assert mx.array_equal(logits, model.model(mx.array(IDS)))
