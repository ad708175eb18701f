"""A Pygments lexer for `.mlxq` query files, for the REPL and the docs.

Usage: `pygments.highlight(text, MlxqLexer(), formatter)`; the REPL wraps it with
prompt_toolkit's `PygmentsLexer(MlxqLexer)`. Registered under the alias `mlxq`. Its word
lists (statements, options, interventions, metrics, functions) come from the statement
table in `mlxterp.core.statements`.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Text, Whitespace

from mlxterp.core.statements import FUNCTIONS, INTERVENTIONS, METRICS, STATEMENTS, option_keywords

# every word list below comes from the statement table (tests/test_statement_table.py checks it)
_OPTION_WORDS = option_keywords()


class MlxqLexer(RegexLexer):
    name = "mlxq"
    aliases = ["mlxq"]
    filenames = ["*.mlxq"]
    mimetypes = ["text/x-mlxq"]

    tokens = {
        "root": [
            (r"\n", Whitespace),
            (r"[ \t\r]+", Whitespace),
            (r"#.*$", Comment.Single),
            (r"\\\s*$", Punctuation),
            (r'"', String.Double, "string"),
            (r"\$[A-Za-z_][A-Za-z0-9_]*", Name.Variable),
            (words(tuple(STATEMENTS), prefix=r"(?m)^\s*", suffix=r"\b"), Keyword),
            (r"(:)(\s*)(" + "|".join(STATEMENTS) + r")\b", bygroups(Punctuation, Whitespace, Keyword)),
            (words(tuple(INTERVENTIONS), suffix=r"\b"), Name.Function),
            (words(tuple(FUNCTIONS), suffix=r"(?=\()"), Name.Builtin),
            (words(tuple(_OPTION_WORDS), prefix=r"(?<=\s)", suffix=r"\b(?!\.)"), Keyword.Pseudo),
            (words(tuple(METRICS), suffix=r"\b"), Name.Constant),
            (r"(-?\d+)(\.\.)(-?\d+)", bygroups(Number.Integer, Operator, Number.Integer)),
            (r"\d+\.\d+([eE][+-]?\d+)?|\d+[eE][+-]?\d+", Number.Float),
            (r"\d+", Number.Integer),
            (r"[A-Za-z_][A-Za-z0-9_]*", Name),
            (r"[@=+\-*/]", Operator),
            (r"[.:,\[\]()]", Punctuation),
            (r".", Text),
        ],
        "string": [
            (r'\\(["\\ntr0]|u[0-9a-fA-F]{4})', String.Escape),
            (r'[^"\\\n]+', String.Double),
            (r'"', String.Double, "#pop"),
            (r"\n", String.Double, "#pop"),
            (r"\\", String.Double),
        ],
    }
