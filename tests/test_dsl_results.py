"""Result objects as data: `to_data()` carries a summary and a plain-text rendering, and
`result_from_data` rebuilds a result that draws exactly as the original (what the REPL and
`mlxterp run` do with what the daemon sends)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mlxterp_repl import protocol as p
from mlxterp_repl.dsl import Session, TraceCache, parse
from mlxterp_repl.dsl.results import TextResult, ValuesResult, result_from_data

TOUR = Path(__file__).resolve().parent.parent / "examples" / "tour.mlxq"
TOUR_KINDS = {"load", "info", "ls", "help", "prompt", "tokens", "save", "stats", "lens", "predict", "patch", "let",
              "steer", "export"}


def drawn(result, width: int = 100) -> str:
    console = Console(record=True, width=width, color_system=None, file=io.StringIO())
    console.print(result.render())
    text = console.export_text()
    assert text.strip()
    return text


def over_the_wire(data: dict) -> dict:
    """As a client receives it: msgpack-packed and unpacked, as the daemon sends it."""
    frame = p.pack({"result": data})
    return p.unpack_body(frame[4:], arrays=True)["result"]


@pytest.fixture(scope="module")
def tour_results(demo_model, tmp_path_factory):
    """Every statement of examples/tour.mlxq run on the demo model, with the trace cache the daemon uses."""
    loads = []
    session = Session(demo_model, workdir=tmp_path_factory.mktemp("tour"),
                      loader=lambda source, layer_attr: loads.append(source) or demo_model)
    cache = TraceCache()
    results = [session.execute_statement(s, trace_cache=cache) for s in parse(TOUR.read_text()).statements]
    assert loads == ["demo"]  # `load demo` went through the session's loader
    return results


def test_every_tour_result_rebuilt_from_its_data_draws_the_same(tour_results):
    assert {r.kind for r in tour_results} >= TOUR_KINDS
    for result in tour_results:
        data = result.to_data(text=True)
        for rebuilt in (result_from_data(data), result_from_data(over_the_wire(data))):
            assert type(rebuilt) is type(result) and rebuilt.kind == result.kind
            assert drawn(rebuilt) == drawn(result), result.kind
            assert rebuilt.summary(40) == result.summary(40)


def test_result_data_carries_its_summary_and_its_plain_text(tour_results):
    for result in tour_results:
        data = result.to_data(text=True)
        assert data["summary"] == result.summary(40) and len(data["summary"]) <= 40
        assert "\x1b" not in data["text"]
        assert max(len(line) for line in data["text"].splitlines()) <= 100
        assert data["text"] == drawn(result)
    lens = next(r for r in tour_results if r.kind == "lens")
    assert "logit lens" in lens.to_data(text=True)["text"]
    assert "text" not in lens.to_data()  # drawing costs: only when asked


def test_norm_of_a_vector_is_a_0d_array_and_stays_0d_as_data(demo_model):
    session = Session(demo_model)
    session.execute('prompt "The capital of France is"\nsave layers.6 @ -1 as $x')
    [result] = session.execute("let $n = norm($x)")
    label, value = result.arrays[0]
    assert value.shape == ()
    data = result.to_data()
    assert data["arrays"][0]["array"].shape == () and data["arrays"][0]["shape"] == []
    rebuilt = result_from_data(over_the_wire(data))
    assert rebuilt.arrays[0][1].shape == () and float(rebuilt.arrays[0][1]) == float(value)


def test_result_from_data_names_what_is_wrong_with_bad_data():
    with pytest.raises(ValueError, match="no result type"):
        result_from_data({"kind": "mystery", "x": 1})
    with pytest.raises(ValueError, match="'kind'"):
        result_from_data(["not", "a", "dict"])
    with pytest.raises(ValueError, match="lens"):
        result_from_data({"kind": "lens", "layers": [1]})
    with pytest.raises(ValueError, match="fetch"):
        handle_only = {"dtype": "float32", "shape": [3], "handle": "b1", "nbytes": 12}  # not fetched yet
        result_from_data({"kind": "save", "arrays": [{"label": "x", "array": handle_only}]})


def test_lens_grid_keeps_its_layer_column_when_positions_fill_the_width(tour_results):
    lens = next(r for r in tour_results if r.kind == "lens" and len(r.positions) > 1)
    for width in (80, 60):
        text = drawn(lens, width)
        assert re.search(r"^│\s+15 │", text, re.M), text
        assert all(len(line) <= width for line in text.splitlines())


def test_trace_cache_reports_what_it_holds(demo_model):
    cache = TraceCache(budget_bytes=64 * 2**20)
    session = Session(demo_model)
    assert cache.report() == {"entries": 0, "bytes": 0, "budget": 64 * 2**20, "hits": 0, "misses": 0, "shapes": []}
    session.execute('save layers.2 @ -1 in "abc"\nsave layers.2 @ -1 in "abcdef"', trace_cache=cache)
    held = cache.report()
    assert held["entries"] == 2 and 0 < held["bytes"] <= held["budget"] and held["misses"] == 2
    short, long = held["shapes"]  # least recently used first
    name = demo_model.resolve("layers.2")
    assert short[name] == [1, len(demo_model.encode("abc")), demo_model.hidden_size]
    assert long[name][1] == len(demo_model.encode("abcdef"))
    assert "shapes" not in cache.report(shapes=False)


def test_info_reports_the_trace_cache_in_use(demo_model):
    session = Session(demo_model)
    cache = TraceCache(budget_bytes=64 * 2**20)
    session.execute('save layers.2 @ -1 in "abc"', trace_cache=cache)
    [info] = session.execute("info", trace_cache=cache)
    row = dict((k, v) for k, v in info.rows)["trace cache"]
    used = cache.report()["bytes"] / 2**20
    assert row == f"1 entry, {used:.1f} MiB used of 64 MiB" and used > 0
    assert info.to_data()["cache"]["entries"] == 1
    [plain] = session.execute("info")  # no cache in use: nothing to report
    assert "trace cache" not in dict((k, v) for k, v in plain.rows)


def test_a_session_loads_models_through_its_loader(demo_model):
    asked = []
    session = Session(loader=lambda source, layer_attr: asked.append((source, layer_attr)) or demo_model)
    [loaded] = session.execute('load "somewhere/model" layers=model.layers')
    assert asked == [("somewhere/model", "model.layers")] and session.model is demo_model
    assert loaded.kind == "load"


def test_text_results_survive_the_round_trip_with_their_fields():
    result = TextResult("steering: layers.6 add $v", kind="steer", fields={"steering": ["layers.6 add $v"]},
                        notes=["a note"])
    rebuilt = result_from_data(result.to_data())
    assert rebuilt == result
    values = ValuesResult([("x", np.ones(3, np.float32))], kind="let", name="x", where="1")
    assert drawn(result_from_data(values.to_data())) == drawn(values)
