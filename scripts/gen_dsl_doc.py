"""Generate docs/dsl.md, the query-language reference, from scripts/dsl.md.in.

Every example query in the reference is run through the query language's
`Session` on a real model, and its rendered output is pasted under it, so the
page shows what `mlxterp run` prints. Re-run after the demo model, a renderer or
the statement table changes:

    .venv/bin/python scripts/gen_dsl_doc.py demo docs/dsl.md

The first argument is the model to load (as `InterpretableModel` takes it), the
second the output file. The statement reference (syntax, help, examples), the
interventions, the functions and the grammar's rules and word lists come from the
statement table (mlxterp/core/statements.py): the template's {{placeholders}} are
replaced with them and with the example errors. `table_fills()` needs no model;
tests/test_statement_table.py checks that docs/dsl.md holds what it gives.
"""

import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxterp.core.statements import FUNCTIONS, INTERVENTIONS, METRICS, STATEMENTS, statement_help, with_bodies  # noqa: E402

TEMPLATE = Path(__file__).resolve().with_name("dsl.md.in")
ERROR_EXAMPLES = ["sav layers.8", "save layers.8.mpl @ -1", "save layers.20", 'save layers.8 @ "Germany"',
                  "save layers.8 top 5", "steer layers.4 scal 2", "lens @ top", 'patch mlp clean "Paris is"',
                  'prompt "The capital', "let $v = $paris - $londn"]


def rule(name: str, body: str, width: int = 100) -> str:
    """`name = body ;`, broken before a `|` where longer than `width`, the `|` under the
    first `{` or `(` (under the `=` when there is none)."""
    line = f"{name:<13} = {body} ;"
    if len(line) <= width:
        return line
    brackets = [i for i in (line.find("{", 14), line.find("(", 14)) if i > 0]
    indent = min(brackets) if brackets else 14
    pieces = line.split(" | ")
    lines = [pieces[0]]
    for piece in pieces[1:]:
        if len(lines[-1]) + 3 + len(piece) > width:
            lines.append(" " * indent + "| " + piece)
        else:
            lines[-1] += " | " + piece
    return "\n".join(lines)


def statement_rule(spec) -> str:
    text = rule(spec.name, spec.ebnf)
    if spec.required:
        text += f"\n{'':16}(* {' and '.join(spec.required)} required *)"
    return text


def intervention_grammar(spec) -> str:
    readers = {"number": "NUMBER", "var": "VAR", "integer": "INT"}
    parts = [f'"{spec.name}"'] + [readers[reads] for _, reads, _ in spec.arguments]
    if spec.tail is not None:
        parts.append(f'[ "{spec.tail[0]}" {readers[spec.tail[2]]} ]')
    return " ".join(parts)


def quoted(names) -> str:
    return " | ".join(f'"{n}"' for n in names)


def table_fills() -> dict[str, str]:
    """The placeholders that come from the statement table alone (no model run)."""
    return {
        "interventions": "\n".join(f"| `{s.syntax}` | `{s.library}` | {s.effect} |" for s in INTERVENTIONS.values()),
        "functions": "\n".join(f"- `{name}($x)`: {what}." for name, what in FUNCTIONS.items()),
        "grammar_statements": "\n".join(statement_rule(spec) for spec in STATEMENTS.values()),
        "statement_names": rule("statement", " | ".join(STATEMENTS)),
        "with_bodies": rule("query", " | ".join(with_bodies())),
        "intervention_forms": rule("intervention", "path ( " + " | ".join(
            intervention_grammar(s) for s in INTERVENTIONS.values()) + " )"),
        "function_names": quoted(FUNCTIONS),
        "metric_names": quoted(METRICS),
    }


def statement_heading(name: str) -> str:
    """A statement's section up to its examples: heading, syntax line, help."""
    return f"### `{name}`\n\n`{STATEMENTS[name].syntax}`\n\n{statement_help(name)}\n"


def render(result) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=100, color_system=None, force_terminal=False).print(result.render())
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip().splitlines())


def run_fills(model_source: str) -> dict[str, str]:
    """The placeholders that need a model: each statement's examples with their output, the errors."""
    from mlxterp import InterpretableModel
    from mlxterp_repl.dsl import QueryError, Session

    session = Session(InterpretableModel(model_source))
    os.chdir(tempfile.mkdtemp())  # `export` examples write files here
    parts = []
    session.execute('prompt "The capital of France is"')
    for name, spec in STATEMENTS.items():
        if spec.setup:
            session.execute("\n".join(spec.setup))
        parts.append(statement_heading(name))
        for query in spec.examples:
            text = query.replace("load demo", f"load {model_source}") if model_source != "demo" else query
            (result,) = session.execute(text)
            out = render(result)
            if name == "load":
                out = out.replace(model_source, "demo")
            parts.append(f"```mlxq\n{query}\n```\n```text\n{out}\n```\n")
    errors = []
    for query in ERROR_EXAMPLES:
        try:
            session.execute(query)
        except QueryError as e:
            errors.append(f"```text\n{e.render(query)}\n```\n")
        else:
            raise SystemExit(f"no error for {query}")
    return {"statements": "\n".join(parts).replace(model_source, "demo"), "errors": "\n".join(errors)}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: gen_dsl_doc.py MODEL OUTPUT.md   (e.g. gen_dsl_doc.py demo docs/dsl.md)")
    model_source, output = argv[0], os.path.abspath(argv[1])  # abspath before run_fills changes directory
    fills = table_fills() | run_fills(model_source)
    doc = TEMPLATE.read_text()
    for key, text in fills.items():
        doc = doc.replace("{{" + key + "}}", text)
    if "{{" in doc:
        raise SystemExit("a placeholder of dsl.md.in was not filled: " + doc[doc.index("{{"):][:40])
    Path(output).write_text(doc)
    print("written", output)


if __name__ == "__main__":
    main(sys.argv[1:])
