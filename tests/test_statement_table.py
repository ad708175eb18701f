"""The statement table (mlxterp/core/statements.py) is the one source of the language's words:
the parser, completion, the Pygments lexer, the language server's hover, the evaluator's
dispatch, docs/dsl.md and the editor grammars agree with it. Adding a statement, option,
intervention, metric or function to the table and forgetting a place makes a test here fail.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pygments import lex
from pygments.token import Keyword, Name

from mlxterp.core.statements import (
    ARGUMENT_READERS, FUNCTIONS, INTERVENTIONS, METRICS, OPTION_READERS, OPTIONS, STATEMENTS, option_keywords,
    usage, with_bodies,
)
from mlxterp_repl.dsl import ast
from mlxterp_repl.dsl.complete import complete
from mlxterp_repl.dsl.highlight import MlxqLexer
from mlxterp_repl.dsl.parser import Parser, parse

ROOT = Path(__file__).resolve().parents[1]

# a value each option reader accepts (answers needs the metric it goes with)
OPTION_SAMPLES = {"position": "-1", "string": '"Paris is"', "new_var": "$kept", "count": "3", "layers": "0..2",
                  "plot": "", "metric": "l2", "file": "out.npz", "answers": '" Paris" " London"',
                  "flag": ""}
ARGUMENT_SAMPLES = {"nothing": "", "path": "layers.1", "optional_path": "", "path_or_var": "layers.1",
                    "string": '"Paris is"', "optional_string": "", "count": "3"}


def option_text(keyword: str, spec=None) -> str:
    text = f"{keyword} {OPTION_SAMPLES[OPTIONS[keyword].reads]}".strip()
    needs_metric = keyword == "answers" and (spec is None or "metric" in spec.options)
    return "metric logit_diff " + text if needs_metric else text


def minimal(spec) -> str:
    """The shortest statement of the common shape: keyword, argument, required options."""
    parts = [spec.name, ARGUMENT_SAMPLES[spec.reads]] + [option_text(k, spec) for k in spec.required]
    return " ".join(p for p in parts if p)


COMMON = [s for s in STATEMENTS.values() if s.parser is None]
WITH_OPTIONS = [s for s in COMMON if s.options]


def only(text: str):
    parsed = parse(text)
    assert not parsed.errors, (text, [e.message for e in parsed.errors])
    (statement,) = parsed.statements
    return statement


# ---- the table itself ------------------------------------------------------------------


def test_every_entry_names_readers_nodes_and_fields_that_exist():
    for spec in STATEMENTS.values():
        node = getattr(ast, spec.node)
        fields = node.__dataclass_fields__
        assert spec.reads in ARGUMENT_READERS, spec.name
        if spec.parser is not None:
            assert callable(getattr(Parser, spec.parser)), spec.name
        else:
            assert spec.reads == "nothing" or spec.field in fields, spec.name
            assert hasattr(Parser, "argument_" + spec.reads) or spec.reads == "nothing"
        if spec.check is not None:
            assert callable(getattr(Parser, spec.check)), spec.name
        assert set(spec.required) <= set(spec.options), spec.name
        for keyword in spec.options:
            assert OPTIONS[keyword].field in fields, (spec.name, keyword)
    for option in OPTIONS.values():
        assert option.reads in OPTION_READERS and hasattr(Parser, "option_" + option.reads), option.keyword
    assert set(OPTION_READERS) == set(OPTION_SAMPLES)


def test_every_statement_has_a_handler_in_the_evaluator():
    from mlxterp_repl.dsl.evaluator import Session

    missing = [spec.handler for spec in STATEMENTS.values() if not callable(getattr(Session, spec.handler, None))]
    assert not missing, f"Session has no handler for: {missing}"


def test_every_statements_examples_run_and_give_the_tables_result_kind(demo_model, tmp_path):
    """The table's examples (those docs/dsl.md shows) run on the demo model, and each result's
    kind is the one the table declares (`with` gives its query's)."""
    from mlxterp_repl.dsl.evaluator import Session

    session = Session(demo_model, workdir=tmp_path, loader=lambda source, layer_attr: demo_model)
    session.execute('prompt "The capital of France is"')
    for name, spec in STATEMENTS.items():
        if spec.setup:
            session.execute("\n".join(spec.setup))
        for example in spec.examples:
            (result,) = session.execute(example)
            if example.split()[0] != name:  # steer's examples also use let and predict
                continue
            if name == "with":
                body = parse(example).statements[0].body
                expected = STATEMENTS[body.text.split()[0]].result
            else:
                expected = spec.result
            assert result.kind == expected, (example, result.kind, expected)


# ---- parser ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", COMMON, ids=lambda s: s.name)
def test_parser_reads_every_option_the_table_lists(spec):
    base = minimal(spec)
    only(base)  # the minimal form parses
    for keyword in spec.options:
        text = base if keyword in spec.required else f"{base} {option_text(keyword, spec)}"
        node = only(text)
        assert getattr(node, OPTIONS[keyword].field) is not None, (text, keyword)


@pytest.mark.parametrize("spec", WITH_OPTIONS, ids=lambda s: s.name)
def test_parser_refuses_other_options_with_the_tables_list(spec):
    base = minimal(spec)
    others = [k for k in option_keywords() if k in OPTIONS and k not in spec.options]
    assert others
    for keyword in others:
        parsed = parse(f"{base} {keyword} 1")
        assert parsed.errors, keyword
        error = parsed.errors[0]
        left = [k for k in spec.options if k not in spec.required]
        assert error.message.endswith("options left: " + ", ".join(left)), error.message
        assert error.suggestions == left


@pytest.mark.parametrize("spec", [s for s in COMMON if s.required], ids=lambda s: s.name)
def test_parser_requires_the_tables_required_options(spec):
    for keyword in spec.required:
        text = " ".join(p for p in [spec.name, ARGUMENT_SAMPLES[spec.reads]]
                        + [option_text(k, spec) for k in spec.required if k != keyword] if p)
        error = parse(text).errors[0]
        assert error.message == f"{spec.name} needs {OPTIONS[keyword].syntax()}", error.message


def test_with_takes_exactly_the_tables_with_bodies():
    for name, spec in STATEMENTS.items():
        text = f"with layers.1 zero: {minimal(spec) if spec.parser is None else name}"
        parsed = parse(text)
        if spec.with_body:
            assert not parsed.errors, (text, parsed.errors[0].message)
        else:
            assert parsed.errors and "cannot follow 'with'" in parsed.errors[0].message, text
            assert parsed.errors[0].suggestions == with_bodies()


def test_parser_reads_every_intervention_metric_and_function():
    for name, spec in INTERVENTIONS.items():
        arguments = " ".join("2" if reads == "number" else "$v" for _, reads, _ in spec.arguments)
        node = only(f"with layers.1 {name} {arguments}: lens").interventions[0]
        assert node.kind == name
        if spec.tail is not None:
            tail = f"{spec.tail[0]} 3"
            node = only(f"with layers.1 {name} {arguments} {tail}: lens").interventions[0]
            assert (node.seed if spec.tail[2] == "integer" else node.numbers[-1]) == 3
    for metric in METRICS:
        extra = ' answers "a" "b"' if metric == "logit_diff" else ""
        assert only(f'patch mlp clean "a" corrupt "b" metric {metric}{extra}').metric.value == metric
    for function in FUNCTIONS:
        assert only(f"let $a = {function}($b)").expr.function == function


# ---- completion, highlighting, hover, help ---------------------------------------------


def labels(text: str) -> list[str]:
    return [c.label for c in complete(text, len(text))]


def test_completion_offers_the_tables_words():
    assert labels("") == list(STATEMENTS)
    assert labels("with layers.1 zero: ") == with_bodies()
    for spec in COMMON:
        offered = set(labels(minimal(spec) + " "))
        left = {k for k in spec.options if k not in spec.required}
        assert left <= offered, (spec.name, left - offered)
    assert set(labels("with layers.1 ")) >= set(INTERVENTIONS)
    assert labels('patch mlp clean "a" corrupt "b" metric ') == list(METRICS)
    assert set(labels("let $a = ")) >= set(FUNCTIONS)
    details = {c.label: c.detail for c in complete("", 0)}
    assert details == {name: spec.syntax for name, spec in STATEMENTS.items()}


def test_pygments_lexer_knows_every_word_of_the_table():
    def kind_of(text: str, word: str):
        return next(kind for kind, value in lex(text, MlxqLexer()) if value == word)

    for name in STATEMENTS:
        assert kind_of(f"{name} x\n", name) is Keyword, name
    for name in with_bodies():
        assert kind_of(f"with layers.1 zero: {name}\n", name) is Keyword, name
    for word in option_keywords():
        assert kind_of(f"lens {word} 1\n", word) is Keyword.Pseudo, word
    for name in INTERVENTIONS:
        assert kind_of(f"with layers.1 {name} 1: lens\n", name) is Name.Function, name
    for name in METRICS:
        assert kind_of(f"patch mlp metric {name}\n", name) is Name.Constant, name
    for name in FUNCTIONS:
        assert kind_of(f"let $a = {name}($b)\n", name) is Name.Builtin, name


def test_hover_and_help_show_the_tables_syntax_and_options():
    from mlxterp_lsp.server import statement_hover

    for name, spec in STATEMENTS.items():
        hover = statement_hover(name)
        assert spec.syntax in hover and spec.summary in hover, name
        assert all(f"`{OPTIONS[k].syntax()}`" in hover for k in spec.options), name
        text = usage(name)
        assert text.startswith(spec.syntax) and all(OPTIONS[k].description in text for k in spec.options)


# ---- generated files: editor grammars and docs/dsl.md ------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_editor_grammars_are_generated_from_the_current_table():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_grammars.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + "run: .venv/bin/python scripts/gen_grammars.py"


def test_editor_grammars_hold_every_word_of_the_table():
    """Independent of the generator: the committed files name every word."""
    grammar = json.loads((ROOT / "editors/vscode/syntaxes/mlxq.tmLanguage.json").read_text())
    text = json.dumps(grammar)
    vim = (ROOT / "editors/nvim/syntax/mlxq.vim").read_text()
    statement_line = next(line for line in vim.splitlines() if line.startswith("syntax keyword mlxqStatement"))
    intervention_line = next(line for line in vim.splitlines() if line.startswith("syntax keyword mlxqIntervention"))
    for name in STATEMENTS:
        assert re.search(rf"[(|]{name}[)|]", text), name
        assert f" {name}" in statement_line.split("mlxqStatement", 1)[1] + " ", name
    for name in INTERVENTIONS:
        assert name in intervention_line.split(), name
    words = {"mlxqOption": option_keywords(), "mlxqMetric": list(METRICS), "mlxqFunction": list(FUNCTIONS)}
    for group, names in words.items():
        line = next(line for line in vim.splitlines() if line.startswith(f"syntax match {group} "))
        for name in names:
            assert re.search(rf"(%\(|\\\|){name}(\\\||\\\))", line), (group, name)
            assert re.search(rf"[(|]{name}[)|]", text), name


def test_dsl_reference_holds_the_tables_statements_and_words():
    gen = load_script("gen_dsl_doc")
    doc = (ROOT / "docs" / "dsl.md").read_text()
    stale = [key for key, text in gen.table_fills().items() if text not in doc]
    stale += [name for name in STATEMENTS if gen.statement_heading(name) not in doc]
    assert not stale, f"docs/dsl.md is stale in {stale}: run .venv/bin/python scripts/gen_dsl_doc.py demo docs/dsl.md"
    for name, spec in STATEMENTS.items():
        for example in spec.examples:
            assert f"```mlxq\n{example}\n```" in doc, example
