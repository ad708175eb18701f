"""Generate the editor grammars of `.mlxq` from the statement table (mlxterp.core.statements).

    .venv/bin/python scripts/gen_grammars.py          # write both files
    .venv/bin/python scripts/gen_grammars.py --check  # exit 1 when a committed file is stale

Writes editors/vscode/syntaxes/mlxq.tmLanguage.json (TextMate, VS Code) and
editors/nvim/syntax/mlxq.vim (Neovim). The shape of each grammar (strings, numbers, paths,
comments) is written here; every word list (statements, the queries `with` takes, options,
interventions, metrics, functions) comes from the table, so a new statement or option
reaches both editors by re-running this script. tests/test_statement_table.py fails when the
committed files differ from what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxterp.core.statements import FUNCTIONS, INTERVENTIONS, METRICS, STATEMENTS, option_keywords, with_bodies  # noqa: E402

VSCODE = ROOT / "editors" / "vscode" / "syntaxes" / "mlxq.tmLanguage.json"
NVIM = ROOT / "editors" / "nvim" / "syntax" / "mlxq.vim"

# statements with a rule of their own in the TextMate grammar (what follows them is coloured too)
SPECIAL = ("load", "help")
PATH_ARGUMENTS = ("path", "optional_path", "path_or_var")


def alternatives(words) -> str:
    return "|".join(words)


def path_statements() -> list[str]:
    """Statements whose first argument is a module path (interventions start with one too)."""
    return [s.name for s in STATEMENTS.values() if s.reads in PATH_ARGUMENTS or "INTERVENTION" in s.argument]


def named(*names: str) -> dict:
    return {str(i + 1): {"name": name} for i, name in enumerate(names)}


def vscode_grammar() -> dict:
    statement_words = alternatives(s for s in STATEMENTS if s not in SPECIAL)
    options = alternatives(w for w in option_keywords() if w != "to")  # `to FILE` has its own rule
    order = ["comment", "continuation", "string", "variable", "statement", "with-body", "function", "file",
             "option", "intervention", "metric", "range", "module-path", "number", "operator", "punctuation"]
    repository = {
        "comment": {"match": r"(#).*$", "name": "comment.line.number-sign.mlxq",
                    "captures": named("punctuation.definition.comment.mlxq")},
        "continuation": {"match": r"\\\s*$", "name": "punctuation.separator.continuation.line.mlxq"},
        "string": {
            "begin": '"', "beginCaptures": {"0": {"name": "punctuation.definition.string.begin.mlxq"}},
            "end": r'(")|$', "endCaptures": named("punctuation.definition.string.end.mlxq"),
            "name": "string.quoted.double.mlxq",
            "patterns": [{"match": r'\\(["\\ntr0]|u[0-9a-fA-F]{4})', "name": "constant.character.escape.mlxq"},
                         {"match": r"\\.", "name": "invalid.illegal.escape.mlxq"}],
        },
        "variable": {"match": r"(\$)[A-Za-z_][A-Za-z0-9_]*", "name": "variable.other.result.mlxq",
                     "captures": named("punctuation.definition.variable.mlxq")},
        "statement": {"patterns": [
            {"match": r'^\s*(load)\b(?:\s+([^\s#"=]+)(?!=))?',
             "captures": named("keyword.control.statement.mlxq", "string.unquoted.source.mlxq")},
            {"match": r"^\s*(help)\b(?:\s+([A-Za-z_]\w*))?",
             "captures": named("keyword.control.statement.mlxq", "keyword.control.statement.mlxq")},
            {"match": rf"^\s*({statement_words})\b(?!\.)", "captures": named("keyword.control.statement.mlxq")},
        ]},
        "with-body": {"match": rf"(:)\s*({alternatives(with_bodies())})\b(?!\.)",
                      "captures": named("punctuation.separator.with.mlxq", "keyword.control.statement.mlxq")},
        "function": {"match": rf"\b({alternatives(FUNCTIONS)})(?=\s*\()", "name": "support.function.builtin.mlxq"},
        "option": {"patterns": [
            {"match": rf"(?<=\s)({options})\b(?![.=])", "name": "keyword.other.option.mlxq"},
            {"match": r"(?<=\s)(layers)(=)",
             "captures": named("keyword.other.option.mlxq", "keyword.operator.assignment.mlxq")},
        ]},
        "intervention": {"match": rf"(?<=[\s,])({alternatives(INTERVENTIONS)})\b(?!\.)",
                         "name": "support.function.intervention.mlxq"},
        "metric": {"match": rf"(?<=\s)({alternatives(METRICS)})\b(?!\.)", "name": "constant.language.metric.mlxq"},
        "range": {"match": r"(-?\d+)(\.\.)(-?\d+)",
                  "captures": named("constant.numeric.integer.mlxq", "keyword.operator.range.mlxq",
                                    "constant.numeric.integer.mlxq")},
        "module-path": {"patterns": [
            {"match": r"(\.)(-?\d+)(\.\.)(-?\d+)",
             "captures": named("punctuation.accessor.mlxq", "constant.numeric.integer.index.mlxq",
                               "keyword.operator.range.mlxq", "constant.numeric.integer.index.mlxq")},
            {"match": rf"(?<=\b(?:{alternatives(path_statements())})\s)[A-Za-z_][A-Za-z0-9_]*(?![\w.])",
             "name": "entity.name.module.mlxq"},
            {"match": r"(?<![\w$.])[A-Za-z_][A-Za-z0-9_]*(?=\.)", "name": "entity.name.module.mlxq"},
            {"match": r"(\.)([A-Za-z_][A-Za-z0-9_]*)",
             "captures": named("punctuation.accessor.mlxq", "entity.name.module.mlxq")},
            {"match": r"(\.)(\*)", "captures": named("punctuation.accessor.mlxq", "keyword.operator.wildcard.mlxq")},
            {"match": r"(\.)(\d+)\b",
             "captures": named("punctuation.accessor.mlxq", "constant.numeric.integer.index.mlxq")},
            {"match": r"\.(?=\[)", "name": "punctuation.accessor.mlxq"},
        ]},
        "number": {"patterns": [
            {"match": r"(?<![\w)\]])-?(\d+\.\d+([eE][+-]?\d+)?|\d+[eE][+-]?\d+)\b", "name": "constant.numeric.float.mlxq"},
            {"match": r"(?<![\w)\]])-?\d+\b", "name": "constant.numeric.integer.mlxq"},
        ]},
        "operator": {"patterns": [
            {"match": r"(@)\s*(\*)", "captures": named("keyword.operator.position.mlxq", "keyword.operator.wildcard.mlxq")},
            {"match": "@", "name": "keyword.operator.position.mlxq"},
            {"match": "=", "name": "keyword.operator.assignment.mlxq"},
            {"match": r"[+\-*/]", "name": "keyword.operator.arithmetic.mlxq"},
        ]},
        "punctuation": {"patterns": [
            {"match": ",", "name": "punctuation.separator.comma.mlxq"},
            {"match": ":", "name": "punctuation.separator.colon.mlxq"},
            {"match": r"[\[\]]", "name": "punctuation.section.brackets.mlxq"},
            {"match": r"[()]", "name": "punctuation.section.parens.mlxq"},
        ]},
        "file": {"match": r'(?<=\s)(to)\b(?:\s+([^\s#"]+))?',
                 "captures": named("keyword.other.option.mlxq", "string.unquoted.path.mlxq")},
    }
    return {
        "$schema": "https://raw.githubusercontent.com/martinring/tmlanguage/master/tmlanguage.json",
        "name": "mlxq",
        "comment": "Generated by scripts/gen_grammars.py from the statement table (mlxterp/core/statements.py): "
                   "edit the script, not this file.",
        "scopeName": "source.mlxq",
        "fileTypes": ["mlxq"],
        "patterns": [{"include": "#" + name} for name in order],
        "repository": repository,
    }


def vim_alternatives(words) -> str:
    return r"\|".join(words)


def nvim_syntax() -> str:
    return f'''" Syntax of mlxterp query files (.mlxq). Semantic tokens from `mlxterp lsp` add to this
" in Neovim 0.9 and later. Generated by scripts/gen_grammars.py from the statement table
" (mlxterp/core/statements.py): edit the script, not this file.
if exists("b:current_syntax")
  finish
endif

syntax keyword mlxqStatement {" ".join(STATEMENTS)}
syntax keyword mlxqIntervention {" ".join(INTERVENTIONS)}
" options only after a space and not before `.` or `=`: `layers 0..3` is an option, `layers.3` a path
syntax match mlxqOption "\\s\\@<=\\<\\%({vim_alternatives(option_keywords())}\\)\\>[.=]\\@!"
syntax match mlxqMetric "\\s\\@<=\\<\\%({vim_alternatives(METRICS)}\\)\\>\\.\\@!"
syntax match mlxqFunction "\\<\\%({vim_alternatives(FUNCTIONS)}\\)\\>\\s*(\\@="
syntax match mlxqVariable "\\$\\h\\w*"
syntax match mlxqNumber "-\\?\\<\\d\\+\\(\\.\\d\\+\\)\\?\\([eE][+-]\\?\\d\\+\\)\\?\\>"
syntax match mlxqOperator "[@=+*/]\\|\\.\\."
syntax match mlxqContinuation "\\\\\\s*$"
syntax region mlxqString start=+"+ skip=+\\\\.+ end=+"\\|$+ contains=mlxqEscape oneline
syntax match mlxqEscape +\\\\["\\\\ntr0]+ contained
syntax match mlxqComment "#.*$"

highlight default link mlxqStatement Statement
highlight default link mlxqIntervention Function
highlight default link mlxqOption Keyword
highlight default link mlxqMetric Constant
highlight default link mlxqFunction Function
highlight default link mlxqVariable Identifier
highlight default link mlxqNumber Number
highlight default link mlxqOperator Operator
highlight default link mlxqContinuation Special
highlight default link mlxqString String
highlight default link mlxqEscape SpecialChar
highlight default link mlxqComment Comment

let b:current_syntax = "mlxq"
'''


def outputs() -> dict[Path, str]:
    return {VSCODE: json.dumps(vscode_grammar(), indent=2) + "\n", NVIM: nvim_syntax()}


def main(argv: list[str]) -> int:
    stale = [path for path, text in outputs().items() if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run scripts/gen_grammars.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs().items():
        path.write_text(text)
        print("written", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
