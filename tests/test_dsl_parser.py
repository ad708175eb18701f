"""The query language's lexer and parser: every statement of DSL.md, spans, and error messages."""

import pytest

from mlxterp_repl.dsl import QueryError, Span, parse
from mlxterp_repl.dsl import ast


def only(text):
    result = parse(text)
    assert result.errors == [], [e.message for e in result.errors]
    assert len(result.statements) == 1
    return result.statements[0]


def error_of(text):
    result = parse(text)
    assert result.errors, f"expected an error for {text!r}"
    return result.errors[0]


SPEC_EXAMPLES = [
    ("load demo", ast.Load),
    ("load ./models/gpt2 layers=h", ast.Load),
    ("load mlx-community/Llama-3.2-1B-Instruct", ast.Load),
    ('prompt "The capital of France is"', ast.Prompt),
    ("tokens", ast.Tokens),
    ('tokens "Hello world"', ast.Tokens),
    ('save layers.8 @ "France"', ast.Save),
    ("save layers.*.mlp @ -1 as $mlps", ast.Save),
    ('save output @ -1 in "Paris is"', ast.Save),
    ("lens", ast.Lens),
    ("lens @ -1 top 5", ast.Lens),
    ("lens layers 0..7 plot", ast.Lens),
    ("predict layers.6 @ -1 top 10", ast.Predict),
    ("predict $x top 3", ast.Predict),
    ('patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France"', ast.Patch),
    ('patch mlp clean "a b" corrupt "c d" metric mse layers 0..7 plot', ast.Patch),
    ('patch mlp clean "a b" corrupt "c d" @ * metric logit_diff answers " a" " c"', ast.Patch),
    ("with layers.4 zero: lens @ -1", ast.With),
    ("with layers.3 scale 0.5, layers.5 clamp -1 1: save output @ -1", ast.With),
    ("steer layers.5 add $v * 2.0", ast.Steer),
    ("steer clear", ast.Steer),
    ("let $v = $paris - $london", ast.Let),
    ("let $m = mean($mlps)", ast.Let),
    ("ls", ast.Ls),
    ("ls layers.0", ast.Ls),
    ("stats layers.*", ast.Stats),
    ("stats layers.*.mlp @ -1", ast.Stats),
    ("export $mlps to acts.safetensors", ast.Export),
    ("export layers.8 @ * to l8.npz", ast.Export),
    ("info", ast.Info),
    ("help patch", ast.Help),
]


@pytest.mark.parametrize("text,node_type", SPEC_EXAMPLES)
def test_every_example_of_the_spec_parses(text, node_type):
    statement = only(text)
    assert type(statement) is node_type
    assert statement.text == text
    assert statement.span == Span(1, 1, 1, len(text) + 1)


def test_load_reads_paths_and_hub_ids_as_words():
    assert only("load mlx-community/Llama-3.2-1B-Instruct").source.value == "mlx-community/Llama-3.2-1B-Instruct"
    node = only("load ./models/gpt2 layers=h")
    assert node.source.value == "./models/gpt2"
    assert node.options == {"layers": "h"}
    assert only('load "/tmp/my model"').source.value == "/tmp/my model"


@pytest.mark.parametrize(
    "text,path",
    [
        ("save layers.8", "layers.8"),
        ("save layers.*.mlp", "layers.*.mlp"),
        ("save layers.0..5", "layers.0..5"),
        ("save layers.[1, 3,5].attn", "layers.[1,3,5].attn"),
        ("save layers.-1.self_attn.q_proj", "layers.-1.self_attn.q_proj"),
        ("save model.model.layers.8", "model.model.layers.8"),
        ("save layers.0.5", "layers.0.5"),
        ("save output", "output"),
    ],
)
def test_path_patterns_keep_their_canonical_text(text, path):
    assert only(text).target.text == path


def test_position_forms():
    def position(text):
        return only(f"save layers.8 @ {text}").position

    assert position("-1") == ast.Index(span=Span(1, 17, 1, 19), value=-1)
    assert position("3").value == 3
    assert position('"France"').text == "France"
    assert (position("2:5").start, position("2:5").stop) == (2, 5)
    assert (position("-3:").start, position("-3:").stop) == (-3, None)
    assert (position(":4").start, position(":4").stop) == (None, 4)
    items = position('[0, -1, "is"]').items
    assert [type(i) for i in items] == [ast.Index, ast.Index, ast.Match]
    assert isinstance(position("*"), ast.AllPositions)


def test_spans_point_at_each_piece():
    node = only('save layers.8.mlp @ "France" in "x" as $h')
    assert node.target.span == Span(1, 6, 1, 18)
    assert node.position.span == Span(1, 21, 1, 29)
    assert node.input.span == Span(1, 33, 1, 36)
    assert node.name.span == Span(1, 40, 1, 42)


def test_layers_option_forms():
    # the parser keeps the selection as written; mlxterp.core.paths decides what it selects
    assert only("lens layers 0..3").layers.text == "0..3"
    assert only("lens layers [0, 4, 8]").layers.text == "[0,4,8]"
    assert only("lens layers 5").layers.text == "5"
    assert only("lens layers -1..0").layers.text == "-1..0"
    assert only("lens layers *").layers.text == "*"


def test_plot_takes_an_optional_file():
    assert only("lens plot").plot.file is None
    assert only("lens plot to out/lens.png").plot.file == "out/lens.png"
    assert only('patch mlp clean "a" corrupt "b" plot to "p.png"').plot.file == "p.png"


def test_interventions_parse_their_arguments():
    node = only("with layers.3 scale 0.5, layers.5 clamp -1 1.5, layers.2 noise 0.1 seed 7, layers.1 zero: lens")
    kinds = [(i.target.text, i.kind, i.numbers, i.seed) for i in node.interventions]
    assert kinds == [
        ("layers.3", "scale", [0.5], None),
        ("layers.5", "clamp", [-1.0, 1.5], None),
        ("layers.2", "noise", [0.1], 7),
        ("layers.1", "zero", [], None),
    ]
    steer = only("steer layers.5 add $v * -2")
    assert steer.interventions[0].var.name == "v" and steer.interventions[0].numbers == [-2.0]
    assert only("steer layers.4 replace $clean").interventions[0].var.name == "clean"
    assert only("steer").interventions == [] and not only("steer").clear
    assert only("steer clear").clear


def test_let_follows_arithmetic_precedence():
    expr = only("let $x = $a - $b * 2 + -$c / 4").expr
    # ((a - (b * 2)) + ((-c) / 4))
    assert expr.op == "+"
    assert expr.left.op == "-" and expr.left.right.op == "*"
    assert expr.right.op == "/" and isinstance(expr.right.left, ast.Negate)
    call = only("let $n = norm(mean($x) - $y)").expr
    assert call.function == "norm" and call.argument.left.function == "mean"


def test_comments_blank_lines_and_continuations():
    result = parse('# a comment\n\nsave layers.8 \\\n   @ -1   # trailing\nlens\n')
    assert [type(s) for s in result.statements] == [ast.Save, ast.Lens]
    assert result.statements[0].position.value == -1
    assert result.statements[0].span == Span(3, 1, 4, 8)
    assert result.statements[1].span.line == 5


def test_string_escapes():
    assert only(r'prompt "say \"hi\"\n\t\\ \u00e9"').prompt.value == 'say "hi"\n\t\\ é'


def test_unknown_statement_lists_statements_and_the_closest():
    error = error_of("sav layers.8")
    assert error.span == Span(1, 1, 1, 4)
    assert "is not a statement" in error.message and "lens" in error.message
    assert error.suggestions[0] == "save"


def test_error_in_one_line_does_not_stop_the_others():
    result = parse("lens\nsave layers.8 @ @\nbogus\ninfo")
    assert [type(s) for s in result.statements] == [ast.Lens, ast.Info]
    assert [e.span.line for e in result.errors] == [2, 3]


def test_unterminated_string_is_reported_and_its_statement_dropped():
    result = parse('prompt "abc\nlens')
    assert [type(s) for s in result.statements] == [ast.Lens]
    assert result.errors[0].message.startswith("unterminated string")
    assert result.errors[0].span == Span(1, 8, 1, 12)


def test_option_given_twice_names_the_remaining_options():
    error = error_of('save layers.8 in "a" in "b"')
    assert "'in' is given twice" in error.message
    assert error.suggestions == ["@", "as"]


def test_unexpected_word_after_a_statement_lists_its_options():
    error = error_of("save layers.8 top 5")
    assert error.span == Span(1, 15, 1, 18)
    assert error.suggestions == ["@", "in", "as"]


def test_patch_needs_clean_and_corrupt():
    error = error_of('patch mlp clean "a"')
    assert "corrupt" in error.message and error.suggestions == ["corrupt"]


def test_patch_takes_positions_metric_and_answers_in_any_order():
    node = only('patch mlp answers " Paris" " London" @ [1, "is"] clean "a" corrupt "b" metric logit_diff')
    assert [a.value for a in node.answers] == [" Paris", " London"]
    assert node.metric.value == "logit_diff"
    assert isinstance(node.position, ast.PositionList) and len(node.position.items) == 2
    assert isinstance(only('patch mlp clean "a" corrupt "b" @ *').position, ast.AllPositions)


def test_logit_diff_without_answers_says_to_add_them():
    error = error_of('patch mlp clean "a" corrupt "b" metric logit_diff')
    assert 'answers' in error.message and '" Paris" " London"' in error.message
    assert error.suggestions == ["answers"]
    assert error.span == Span(1, 40, 1, 50)


def test_answers_without_logit_diff_say_which_metric_they_need():
    error = error_of('patch mlp clean "a" corrupt "b" metric mse answers "x" "y"')
    assert "metric logit_diff" in error.message
    assert error.span == Span(1, 52, 1, 59)


def test_answers_need_two_strings():
    error = error_of('patch mlp clean "a" corrupt "b" metric logit_diff answers " Paris"')
    assert "corrupted answer" in error.message


def test_with_runs_only_queries():
    error = error_of('with layers.4 zero: load demo')
    assert "cannot follow 'with'" in error.message
    assert "lens" in error.suggestions and "load" not in error.suggestions


def test_with_ending_its_line_says_the_statement_goes_on_the_same_line():
    # Python's habit: `with ...:` then the body on the next line
    for text in ("with layers.6 scale 1.0:", "with layers.6 scale 1.0:\n  lens @ -1"):
        error = parse(text).errors[0]
        assert (error.span.line, error.span.col) == (1, 25)  # just after the colon
        assert "after its ':' on the same line" in error.message and "'\\'" in error.message, error.message
        assert "lens" in error.suggestions and "load" not in error.suggestions
    body = only("with layers.6 scale 1.0: \\\n  lens @ -1")  # the continued line is the body
    assert isinstance(body, ast.With) and isinstance(body.body, ast.Lens)


def test_misspelt_intervention_suggests_the_closest():
    error = error_of("steer layers.4 scal 2")
    assert error.suggestions[0] == "scale"
    assert error.span == Span(1, 16, 1, 20)


def test_bad_position_says_what_positions_look_like():
    error = error_of("lens @ top")
    assert error.span == Span(1, 8, 1, 11)
    assert '"word"' in error.suggestions and "*" in error.suggestions


def test_unknown_metric_lists_metrics():
    error = error_of('patch mlp clean "a" corrupt "b" metric l3')
    assert "l2" in error.suggestions and "mse" in error.suggestions


def test_error_render_underlines_the_span():
    text = "lens\nsave layers.8 top 5"
    error = parse(text).errors[0]
    rendered = error.render(text)
    assert rendered.splitlines() == [
        "line 2, column 15: unexpected 'top' in save; options left: @, in, as",
        "  2 | save layers.8 top 5",
        "    |               ^^^",
        "  valid here: @, in, as",
    ]


def test_error_to_data_is_plain():
    data = error_of("bogus").to_data()
    assert data["span"] == {"line": 1, "col": 1, "end_line": 1, "end_col": 6}
    assert isinstance(data["message"], str) and isinstance(data["suggestions"], list)


def test_parse_never_raises_on_deep_nesting():
    result = parse("let $x = " + "(" * 500 + "$a" + ")" * 500)
    assert result.statements == [] and isinstance(result.errors[0], QueryError)
