"""mlxterp.core.paths: path grammar, layer segments and ranges, and the resolver over a name table
(a hand-written table: no MLX needed)."""

from __future__ import annotations

import pytest

from mlxterp.core.paths import NameTable, next_segments, parse_layers, segment_matches, split_path
from mlxterp.errors import LayerIndexError, UnknownModuleError

N = 4
LAYER_PARTS = ["self_attn", "self_attn.q_proj", "mlp", "mlp.up_proj", "input_layernorm"]
NAMES = (["model", "model.model", "model.model.embed_tokens"]
         + [f"model.model.layers.{i}" + ("" if not p else "." + p) for i in range(N) for p in [""] + LAYER_PARTS]
         + ["model.model.norm", "model.lm_head"])


@pytest.fixture(scope="module")
def table():
    return NameTable(NAMES, "model.model.layers", N)


def test_split_keeps_ranges_and_lists_whole():
    assert split_path("layers.0..5.mlp") == ["layers", "0..5", "mlp"]
    assert split_path("layers.7..0") == ["layers", "7..0"]
    assert split_path("layers.[1,3].attn") == ["layers", "[1,3]", "attn"]
    assert split_path("layers.-1..-3.mlp.up_proj") == ["layers", "-1..-3", "mlp", "up_proj"]
    assert split_path("layers.") == ["layers"]


def test_layer_segments():
    assert parse_layers("3").indices(N) == [3]
    assert parse_layers("-1").indices(N) == [3]
    assert parse_layers("0..2").indices(N) == [0, 1, 2]
    assert parse_layers("3..0").indices(N) == [3, 2, 1, 0]  # descending: in the order written
    assert parse_layers("-1..0").indices(N) == [3, 2, 1, 0]  # ends resolve first
    assert parse_layers("-3..-1").indices(N) == [1, 2, 3]
    assert parse_layers("[2, 0]").indices(N) == [2, 0]
    assert parse_layers("*").indices(N) == [0, 1, 2, 3]
    assert parse_layers("mlp") is None and parse_layers("0x") is None
    with pytest.raises(LayerIndexError, match="layer 4 is out of range: the model has 4 layers"):
        parse_layers("0..4").indices(N)
    with pytest.raises(LayerIndexError):
        parse_layers("[1,-5]").indices(N)
    with pytest.raises(UnknownModuleError, match="a layer list holds integers"):
        parse_layers("[1,a]")


def test_resolve_short_full_alias_and_negative(table):
    assert table.resolve("layers.2.mlp") == "model.model.layers.2.mlp"
    assert table.resolve("layers.-1.attn") == "model.model.layers.3.self_attn"
    assert table.resolve("model.layers.1") == "model.model.layers.1"
    assert table.resolve("embed") == "model.model.embed_tokens"
    assert table.resolve("norm") == "model.model.norm"
    assert table.resolve("lm_head") == "model.lm_head"
    assert table.resolve("logits") == "output" and table.resolve("output") == "output"
    assert table.short("model.model.layers.2.self_attn.q_proj") == "layers.2.self_attn.q_proj"
    assert table.short("model.model.embed_tokens") == "embed_tokens"


def test_resolve_errors_name_what_is_valid(table):
    with pytest.raises(LayerIndexError, match=r"0\.\.3, or -4\.\.-1"):
        table.resolve("layers.4.mlp")
    with pytest.raises(UnknownModuleError) as error:
        table.resolve("layers.0.mpl")
    assert "layers.0.mlp" in error.value.suggestions
    with pytest.raises(UnknownModuleError, match="ambiguous"):
        table.resolve("mlp")
    with pytest.raises(UnknownModuleError, match="pattern naming 4 modules"):
        table.resolve("layers.*.mlp")
    with pytest.raises(UnknownModuleError, match="non-empty"):
        table.resolve("")


def test_expand_patterns_in_the_order_written(table):
    assert table.expand("layers.3..1.mlp") == [f"model.model.layers.{i}.mlp" for i in (3, 2, 1)]
    assert table.expand("layers.0..1") == ["model.model.layers.0", "model.model.layers.1"]
    assert table.expand("layers.[2,0].attn") == ["model.model.layers.2.self_attn", "model.model.layers.0.self_attn"]
    assert table.expand("layers.*.mlp.up_proj") == [f"model.model.layers.{i}.mlp.up_proj" for i in range(N)]
    assert table.expand("layers.1.mlp*") == ["model.model.layers.1.mlp", "model.model.layers.1.mlp.up_proj"]
    with pytest.raises(LayerIndexError):
        table.expand("layers.0..9.mlp")
    with pytest.raises(UnknownModuleError, match="matches no module"):
        table.expand("layers.1.zz*")


def test_containers_forward_to_their_called_child():
    names = ["model", "model.layers.0", "model.layers.0.attn", "model.layers.0.attn.attention"]
    table = NameTable(names, "model.layers", 1, {"model.layers.0.attn": "attention"})
    assert table.resolve("layers.0.attn") == "model.layers.0.attn.attention"


def test_table_survives_plain_data(table):
    import json

    again = NameTable.from_data(json.loads(json.dumps(table.to_data())))
    assert again.expand("layers.-1..-2.attn") == table.expand("layers.-1..-2.attn")
    assert again.short_names() == table.short_names()


def test_completion_segments_follow_the_same_rules(table):
    shorts = table.short_names()
    assert segment_matches("attn", "self_attn") and segment_matches("1..2", "2", N)
    assert not segment_matches("1..2", "3", N) and not segment_matches("mlp", "self_attn")
    assert set(next_segments("layers.3..2.", shorts, N)) == {"self_attn", "mlp", "input_layernorm"}
    assert set(next_segments("layers.[0,1].attn.", shorts, N)) == {"q_proj"}


def test_remembered_answers_are_copies_and_errors_are_not_remembered():
    table = NameTable(NAMES, "model.model.layers", N)
    first = table.expand("layers.0..1.mlp")
    first.append("model.lm_head")  # the caller's list: changing it changes no later answer
    assert table.expand("layers.0..1.mlp") == ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    assert table.resolve("layers.2.attn") == "model.model.layers.2.self_attn" == table.resolve("layers.2.attn")
    with pytest.raises(UnknownModuleError):
        table.expand("layers.0.resid_pre")  # no hook points in this table yet
    table.set_hooks(["resid_pre"], 8, "")
    assert table.expand("layers.0.resid_pre") == ["model.model.layers.0.resid_pre"]
    assert table.resolve("layers.-1.resid_pre") == "model.model.layers.3.resid_pre"


def test_remembered_answers_stay_bounded(monkeypatch):
    import mlxterp.core.paths as paths

    monkeypatch.setattr(paths, "MEMO_LIMIT", 8)
    table = NameTable(NAMES, "model.model.layers", N)
    spellings = [f"{prefix}layers.{i}.{part}" for prefix in ("", "model.") for i in range(N)
                 for part in ("mlp", "attn", "self_attn.q_proj")]
    fresh = NameTable(NAMES, "model.model.layers", N)
    for name in spellings * 2:
        assert table.resolve(name) == fresh.resolve(name)
        assert table.expand(name) == [fresh.resolve(name)]
        assert len(table._resolved) <= 8 and len(table._expanded) <= 8
