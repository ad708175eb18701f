"""The Pygments lexer for .mlxq: statements, paths, variables, strings, numbers, comments."""

from pygments import lex
from pygments.token import Comment, Keyword, Name, Number, String

from mlxterp_repl.dsl.highlight import MlxqLexer


def kinds(text):
    return [(kind, value) for kind, value in lex(text, MlxqLexer()) if value.strip()]


def test_statement_paths_options_and_values_get_their_token_types():
    got = kinds('save layers.8 @ "France" as $h  # note\n')
    assert (Keyword, "save") in got
    assert (Name, "layers") in got and (Number.Integer, "8") in got
    assert (Keyword.Pseudo, "as") in got and (Name.Variable, "$h") in got
    assert any(kind in String and "France" in value for kind, value in got)
    assert (Comment.Single, "# note") in got


def test_query_after_with_colon_and_interventions():
    got = kinds("with layers.4 scale 0.5: lens @ -1 layers 0..3\n")
    assert (Keyword, "with") in got and (Keyword, "lens") in got
    assert (Name.Function, "scale") in got and (Number.Float, "0.5") in got
    assert (Keyword.Pseudo, "layers") in got  # the option, not the path segment
    assert (Name, "layers") in got


def test_every_character_is_kept():
    text = 'let $v = mean($a) - 2e3 * "x\\"y"\n'
    assert "".join(value for _, value in lex(text, MlxqLexer())) == text
