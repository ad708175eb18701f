"""Property tests: on any text the parser and completion never raise, and every error the
language reports is a QueryError whose span lies inside the input."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxterp_repl.dsl import CompletionContext, QueryError, complete, parse
from mlxterp_repl.dsl.parser import INTERVENTIONS, OPTIONS, STATEMENTS

WORDS = (
    list(STATEMENTS)
    + list(INTERVENTIONS)
    + sorted(OPTIONS)
    + ["clear", "seed", "mean", "norm", "l2", "mse", "demo", "layers=h", "to", "plot"]
    + ["layers", "layers.8", "layers.*.mlp", "layers.0..5", "layers.[1,3].attn", "output", "embed", "mlp", "attn"]
    + ["$x", "$", "$mlps", "-1", "3", "0.5", "-2.5e3", "1e999", "99999999999999999999", "2:5", ":", "[0, -1]", "*"]
    + ['"France"', '"', '"un\\', '"\\u00e9"', '"\\q"', "@", "=", "+", "-", "/", "(", ")", "[", "]", ",", ".", ".."]
    + ["\n", "\\\n", "#", "# comment\n", "\t", "é", "\x00", "\r\n", ":"]
)

token_text = st.lists(st.sampled_from(WORDS), max_size=25).map(" ".join)
glued_text = st.lists(st.sampled_from(WORDS), max_size=25).map("".join)
any_text = st.text(max_size=80)
language_text = st.one_of(token_text, glued_text, any_text)


def span_inside(span, text):
    lines = text.split("\n")
    if not (1 <= span.line <= span.end_line <= len(lines)):
        return False
    if not 1 <= span.col <= len(lines[span.line - 1]) + 1:
        return False
    if not 1 <= span.end_col <= len(lines[span.end_line - 1]) + 1:
        return False
    return (span.line, span.col) <= (span.end_line, span.end_col)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(language_text)
def test_parser_only_reports_query_errors_with_spans_inside_the_input(text):
    result = parse(text)
    for error in result.errors:
        assert isinstance(error, QueryError)
        assert span_inside(error.span, text), (error.span, text)
        assert error.message
        error.render(text)
    for statement in result.statements:
        assert span_inside(statement.span, text), (statement.span, text)


CONTEXT = CompletionContext(
    modules=[{"name": "layers.0.mlp", "type": "MLP"}, {"name": "layers.0.self_attn", "type": "Attention"}],
    n_layers=1,
    variables=["x"],
    prompt_tokens=["<s>", " France"],
)


@settings(max_examples=1_000, deadline=None)
@given(language_text, st.integers(min_value=-5, max_value=200))
def test_complete_never_raises(text, offset):
    for item in complete(text, offset, CONTEXT):
        assert item.label and item.insert_text is not None
        assert 0 <= item.start <= max(0, min(offset, len(text)))


# ---- the evaluator: statements of random pieces, run on the demo model --------------------

EVAL_WORDS = [w for w in WORDS if w not in ("load", "demo", "layers=h")]
random_line = st.tuples(
    st.sampled_from([s for s in STATEMENTS if s != "load"]),
    st.lists(st.sampled_from(EVAL_WORDS), max_size=8),
).map(lambda parts: " ".join([parts[0], *parts[1]]))

# Mostly well-formed statements whose pieces are often wrong for the model or the prompt.
PATHS = ["layers.3", "layers.*.mlp", "layers.-1", "layers.99", "layers.3.mpl", "output", "embed", "norm",
         "layers.0..2", "layers.[1,20]", "layers.2.attn", "model", "layers", "layers.5..1"]
POSITIONS = ["-1", "0", "99", "-99", '"France"', '"zzz"', '" "', "2:1", "1:3", "[0, -1]", "*", ":0", "-2:"]
NUMBERS = ["0", "1", "-1", "0.5", "1e30", "1e999", "-1e999"]
EXPRESSIONS = ["$two - $logits", "$v - $x", "mean($v)", "norm($x) / 0", "$v * 1e999", "$x + $nope", "mean(2)", "-$v", "$v / $x"]
INTERVENTIONS_TEXT = ["zero", "scale {n}", "clamp {n} {n}", "noise {n}", "noise {n} seed 3", "add $v", "add $x * {n}",
                      "replace $v", "add $missing", "add $two", "replace $two", "add $logits"]
LAYERS = ["0..3", "[0, 99]", "-1", "*", "3..1", "-20"]
TEXTS = ['"Paris is"', '""', '"\\u0000"', '"é 🤖"', '"a b c d e f g"']

p = st.sampled_from
intervention = st.tuples(p(PATHS), p(INTERVENTIONS_TEXT), p(NUMBERS), p(NUMBERS)).map(
    lambda t: f"{t[0]} " + t[1].replace("{n}", t[2], 1).replace("{n}", t[3], 1))
templated_line = st.one_of(
    st.tuples(p(["save", "stats", "export", "predict"]), p(PATHS), p(POSITIONS)).map(lambda t: f"{t[0]} {t[1]} @ {t[2]}"),
    st.tuples(p(PATHS), p(POSITIONS), p(TEXTS)).map(lambda t: f"save {t[0]} @ {t[1]} in {t[2]} as $x"),
    st.tuples(p(POSITIONS), p(["1", "3", "100000000"]), p(LAYERS)).map(lambda t: f"lens @ {t[0]} top {t[1]} layers {t[2]}"),
    st.tuples(intervention, p(PATHS), p(POSITIONS)).map(lambda t: f"with {t[0]}: save {t[1]} @ {t[2]}"),
    st.tuples(intervention, p(POSITIONS)).map(lambda t: f"with {t[0]}: lens @ {t[1]} layers 0..2"),
    intervention.map(lambda t: f"steer {t}"),
    p(EXPRESSIONS).map(lambda e: f"let $y = {e}"),
    st.tuples(p(["$x", "$v", "$nope", "layers.1 @ -1", "output @ *"]), p(["a.npz", "sub/b.safetensors", "c.txt", '""'])).map(
        lambda t: f"export {t[0]} to {t[1]}"),
    st.tuples(p(["mlp", "attn", "mlpp", "layer", "mlp.gate_proj"]), p(TEXTS), p(LAYERS)).map(
        lambda t: f'patch {t[0]} clean "Paris is" corrupt {t[1]} layers {t[2]}'),
    p(TEXTS).map(lambda t: f"tokens {t}"),
    p(TEXTS).map(lambda t: f"prompt {t}"),
    p(PATHS).map(lambda t: f"ls {t}"),
    p(["predict $v", "predict $x top 2", "predict $nope", "steer clear", "steer", "info", "help lens", "help bogus"]),
)
script = st.lists(st.one_of(random_line, templated_line, templated_line), min_size=1, max_size=4).map("\n".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script)
def test_evaluator_only_raises_query_errors_with_spans_inside_the_input(demo_model, tmp_path_factory, text):
    import os

    from mlxterp_repl.dsl import Session

    session = Session(demo_model, workdir=tmp_path_factory.getbasetemp())
    session.execute('prompt "The capital of France is"\nsave layers.2 @ -1 as $x\nlet $v = $x * 2\n'
                    'save layers.2 @ [0, 1] as $two\nsave output @ -1 as $logits')
    cwd = os.getcwd()
    try:
        session.execute(text)
    except QueryError as error:
        assert span_inside(error.span, text), (error.span, text)
        assert error.message
    finally:
        assert os.getcwd() == cwd
