"""What a finished trace holds: freed when dropped (no reference cycle), `keep=`, the keep budget,
the read-only activations mapping, and the evaluator's trace cache counting what it really holds."""

import gc
import logging
import os
import subprocess
import sys
import weakref

import mlx.core as mx
import pytest

import mlxterp.trace as trace_module
from conftest import tiny_llama
from mlxterp import InterpretableModel
from mlxterp.errors import TraceError


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_llama(n_layers=4, hidden=256, vocab=1000))


@pytest.fixture
def fresh_notice(monkeypatch):
    monkeypatch.setattr(trace_module, "_budget_notice_given", False)


def test_dropped_traces_free_their_memory_with_the_garbage_collector_off(model):
    ids = mx.array([list(range(1, 65))] * 2)

    def one_trace():
        with model.trace(ids) as tr:
            saved = [layer.output.save() for layer in model.layers]
        return tr, saved

    one_trace()  # warm-up: first-call allocations that stay
    gc.collect()
    gc.disable()
    try:
        # On MLX-CUDA buffers are released when the stream has finished with them: synchronize before reading.
        mx.synchronize()
        start = mx.get_active_memory()
        grew = []
        for _ in range(30):
            tr, saved = one_trace()
            grew.append(mx.get_active_memory() - start)
            alive = weakref.ref(tr)
            del tr, saved
            assert alive() is None, "the trace outlived its last reference (a reference cycle)"
        mx.synchronize()
        after = mx.get_active_memory()
    finally:
        gc.enable()
    per_trace = 2 * 64 * 256 * 4 * len(model.layers)  # the saved layer outputs alone
    assert min(grew) >= per_trace  # the measure sees a live trace
    assert after - start <= 64 * 1024, f"{(after - start) / 2**20:.2f} MiB still held after 30 dropped traces"


def test_default_keeps_every_output_of_a_small_trace(model):
    with model.trace([1, 2, 3, 4]) as t:
        pass
    layer = t.activations["model.model.layers.3"]
    assert layer.shape == (1, 4, 256)
    with model.trace([1, 2, 3, 4]):
        again = model.layers[3].output.save()
    assert mx.array_equal(layer, again)
    assert "output" in t.activations and "layers.3.attn" in t.activations and "embed" in t.activations
    with pytest.raises(TraceError, match="not recorded by this trace.*inside the block.*keep='all'"):
        t.activations["layers.0.mlp.gate_proj"]  # a leaf inside a block: recorded when the block reads it


def test_reading_a_leaf_in_the_block_records_everything_exactly_and_keeps_what_was_read(model):
    with model.trace([1, 2, 3, 4], keep="all") as everything:
        pass
    with model.trace([1, 2, 3, 4]) as t:
        layer = model.layers[1].output.save()
        gate = model.layers[1].mlp.gate_proj.output.save()  # not recorded at first
        assert t.activations["layers.1"] is layer  # what was read before stays the same array
    assert mx.array_equal(gate, everything.activations["layers.1.mlp.gate_proj"])
    assert set(t.activations) == set(everything.activations)  # everything fits the budget: all kept
    assert len(everything.activations) == len(set(model.names.modules) - {"model"}) + 1  # every module, logits


def test_keep_saved_keeps_what_was_saved_or_read_and_says_how_to_keep_the_rest(model):
    with model.trace([1, 2, 3], keep="saved") as t:
        saved = model.layers[1].output.save()
        read = t.activations["layers.2.mlp"]
    assert set(t.activations) == {"model.model.layers.1", "model.model.layers.2.mlp"}
    assert t.activations["layers.1"] is saved and t.activations["layers.2.mlp"] is read
    with pytest.raises(TraceError) as err:
        t.activations["layers.3"]
    message = str(err.value)
    assert "ran in this forward pass" in message and "keep='all'" in message and ".save()" in message
    assert "did not run" not in message


def test_keep_all_keeps_every_recorded_output_evaluated(model):
    with model.trace([5, 6, 7], keep="all", capture=["layers.*.mlp"]) as t:
        pass
    assert set(t.activations) == {f"model.model.layers.{i}.mlp" for i in range(4)} | {"output"}
    assert t.activations["layers.0.mlp"].shape == (1, 3, 256)


def test_over_the_budget_only_saved_values_stay_and_one_notice_names_the_knob(model, monkeypatch, fresh_notice,
                                                                               caplog, capsys):
    monkeypatch.setattr(trace_module, "keep_budget_mib", 0.01)
    with caplog.at_level(logging.WARNING, logger="mlxterp.trace"):
        for _ in range(2):
            with model.trace([1, 2, 3]) as t:
                kept = model.layers[2].output.save()
    notices = [r.getMessage() for r in caplog.records if r.name == "mlxterp.trace"]
    assert len(notices) == 1, notices
    assert "keep_budget_mib" in notices[0] and "MLXTERP_KEEP_BUDGET_MIB" in notices[0] and "keep='all'" in notices[0]
    assert capsys.readouterr().out == ""
    assert set(t.activations) == {"model.model.layers.2"} and t.activations["layers.2"] is kept
    with pytest.raises(TraceError, match="ran in this forward pass.*keep budget of 0.01 MiB"):
        t.activations["layers.1"]


def test_keep_budget_from_the_environment():
    code = "import mlxterp.trace as t; print(t.keep_budget_mib)"
    for value, expected in (("0.5", "0.5"), ("lots", "256.0")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MLXTERP_KEEP_BUDGET_MIB": value})
        assert done.stdout.strip() == expected, done.stderr
        if value == "lots":
            assert "MLXTERP_KEEP_BUDGET_MIB='lots'" in done.stderr


def test_activations_are_a_read_only_mapping(model):
    with model.trace([1, 2]) as t:
        with pytest.raises(TypeError):
            t.activations["layers.0"] = mx.zeros((1, 2, 256))
    assert not isinstance(t.activations, dict)
    assert not hasattr(t.activations, "pop") and not hasattr(t.activations, "update")
    assert t.activations.get("layers.9.mlp") is None  # a name that is not there
    assert dict(t.activations.items()).keys() == set(t.activations)


def test_a_bad_keep_names_the_choices(model):
    with pytest.raises(TraceError, match="'saved'.*'all'"):
        model.trace([1, 2], keep="everything")


def test_trace_cache_counts_shared_arrays_once():
    from mlxterp_repl.dsl.evaluator import TraceCache

    a, b, c = (mx.zeros((256,), dtype=mx.float32) for _ in range(3))  # 1 KiB each
    cache = TraceCache(budget_bytes=3 * 1024)
    cache.put("first", {"x": a, "y": a, "z": b}, 10**9)  # a caller's wrong estimate is not trusted
    assert cache.used_bytes == 2 * 1024
    cache.put("second", {"x": a, "z": c}, 0)
    assert cache.used_bytes == 3 * 1024 and len(cache) == 2
    d = mx.zeros((256,), dtype=mx.float32)
    cache.put("third", {"w": d})  # evicts "first"; a stays held by "second"
    assert cache.get("first") is None and cache.get("second") is not None
    assert cache.used_bytes == 3 * 1024
    cache.clear()
    assert cache.used_bytes == 0
