"""Completion at a cursor: statements, options, module paths, $ names, prompt tokens."""

from mlxterp_repl.dsl import CompletionContext, complete
from mlxterp_repl.dsl.parser import STATEMENTS

# A module tree shaped like model.module_info() of a small Llama.
MODULES = (
    [{"name": "embed_tokens", "type": "Embedding"}, {"name": "norm", "type": "RMSNorm"}]
    + [{"name": f"layers.{i}", "type": "TransformerBlock"} for i in range(12)]
    + [
        {"name": f"layers.{i}.{child}", "type": kind}
        for i in range(12)
        for child, kind in [
            ("self_attn", "Attention"),
            ("self_attn.q_proj", "Linear"),
            ("mlp", "MLP"),
            ("mlp.gate_proj", "Linear"),
            ("input_layernorm", "RMSNorm"),
        ]
    ]
)
CONTEXT = CompletionContext(
    modules=MODULES,
    n_layers=12,
    variables=["paris", "$london"],
    prompt_tokens=["<s>", "The", " capital", " of", " France", " is"],
)


def labels(text, offset=None):
    offset = len(text) if offset is None else offset
    return [c.label for c in complete(text, offset, CONTEXT)]


def test_start_of_a_line_lists_every_statement():
    assert labels("") == list(STATEMENTS)
    assert labels("lens\n") == list(STATEMENTS)


def test_partial_statement_is_filtered():
    assert labels("pa") == ["patch"]
    assert sorted(labels("l")) == ["lens", "let", "load", "ls"]


def test_top_level_modules_after_save():
    assert labels("save ") == ["output", "embed_tokens", "layers", "norm"]


def test_layer_indices_and_patterns_after_layers_dot():
    got = labels("save layers.")
    assert got[:2] == ["*", "0..11"]
    assert got[2:] == [str(i) for i in range(12)]


def test_children_of_a_layer_include_the_attn_alias_and_types():
    items = complete("save layers.3.", 14, CONTEXT)
    assert [c.label for c in items] == ["attn", "input_layernorm", "mlp", "self_attn"]
    assert {c.label: c.detail for c in items}["mlp"] == "MLP"


def test_children_below_a_pattern_and_an_alias():
    assert labels("stats layers.*.m") == ["mlp"]
    assert labels("save layers.0..5.attn.") == ["q_proj"]


def test_completion_replaces_the_word_being_typed():
    (item,) = complete("save layers.3.ml", 16, CONTEXT)
    assert item.label == "mlp" and item.start == len("save layers.3.")


def test_options_left_after_the_target():
    assert labels("save layers.3 ") == ["@", "in", "as"]
    assert labels("lens top 3 ") == ["@", "layers", "in", "tuned", "plot", "overwrite"]


def test_positions_offer_prompt_tokens_quoted():
    got = labels("save layers.3 @ ")
    assert got[:2] == ["-1", "*"]
    assert '"France"' in got and '"capital"' in got


def test_inside_a_string_position_completes_matching_tokens():
    items = complete('lens @ "Fr', 10, CONTEXT)
    assert [c.label for c in items] == ['"France"']
    assert items[0].start == len("lens @ ")


def test_variables_after_dollar():
    assert labels("predict $") == ["$paris", "$london"]
    assert labels("let $v = $pa") == ["$paris"]
    assert labels("let $v = ") == ["$paris", "$london", "mean", "norm"]


def test_interventions_after_a_with_target_then_queries_only():
    assert labels("with layers.3 ") == ["zero", "scale", "clamp", "noise", "add", "replace", "ablate", "amplify",
                                        "inject"]
    assert labels("with layers.3 zero: ") == ["save", "lens", "predict", "features", "generate", "dla", "stats",
                                                  "export"]


def test_metric_and_help_topics():
    assert labels('patch mlp clean "a" corrupt "b" metric ') == ["l2", "mse", "cosine", "logit_diff"]
    assert labels("help pr") == ["prompt", "predict"]


def test_patch_offers_answers_only_where_the_metric_allows_them():
    flags = ["overwrite", "force"]
    assert labels('patch mlp clean "a" corrupt "b" ') == ["@", "metric", "answers", "layers", "plot", *flags]
    assert labels('patch mlp clean "a" corrupt "b" metric logit_diff ') == ["@", "answers", "layers", "plot", *flags]
    assert labels('patch mlp clean "a" corrupt "b" metric mse ') == ["@", "layers", "plot", *flags]
    assert labels('patch mlp clean "a" corrupt "b" metric logit_diff an') == ["answers"]


def test_cursor_in_the_middle_of_the_text_uses_only_what_precedes_it():
    text = "save layers.3 @ -1\nlens"
    assert labels(text, offset=5) == ["output", "embed_tokens", "layers", "norm"]


def test_nothing_inside_a_comment():
    assert labels("lens # save ") == []


def test_without_a_context_still_lists_statements_and_keywords():
    assert [c.label for c in complete("save layers.3 ", 14)] == ["@", "in", "as"]
