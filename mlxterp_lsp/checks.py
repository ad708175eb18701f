"""What is wrong in a document, as findings with document ranges.

Parse errors come from the query language's parser and need no daemon, nor does whether a
`$name` is defined above its use. Module paths and `layers` options are checked with
`mlxterp.core`'s resolver over the model's name table (fetched once from the daemon), and
positions with the evaluator's own selection rule (`mlxterp_repl.dsl.selection`) over the
prompt's tokens (from the daemon): the same code that runs the statement. When the daemon
cannot answer, those checks are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxterp.core.paths import NameTable, split_path
from mlxterp.errors import LayerIndexError, UnknownModuleError
from mlxterp_repl.dsl import ast, selection
from mlxterp_repl.dsl.errors import QueryError, closest

from mlxterp_lsp.documents import Document, Located, defined_var, walk
from mlxterp_lsp.link import DaemonLink, DaemonUnavailable

Range = tuple[int, int, int, int]  # 0-based line, col, end line, end col (code points)


@dataclass
class Finding:
    message: str
    range: Range
    code: str  # parse | unknown-module | layer-index | token | unknown-name | run
    suggestions: list[str] = field(default_factory=list)
    related: list[tuple[Range, str]] = field(default_factory=list)


def parse_findings(document: Document) -> list[Finding]:
    out = []
    for error, chunk in document.errors:
        out.append(Finding(error.message, chunk.doc_range(error.span), "parse", list(error.suggestions)))
    return out


def variable_findings(document: Document) -> list[Finding]:
    """`$name` used where no statement above defines it."""
    definitions = document.definitions()
    defined: set[str] = set()
    out = []
    for located in document.statements:
        own = defined_var(located.statement)
        for node in walk(located.statement):
            if not isinstance(node, ast.Var) or node is own or node.name in defined:
                continue
            message = f"${node.name} is not defined above this line"
            related = []
            later = definitions.get(node.name)
            if later:
                message += " (it is defined later in the file)"
                related.append((later[0].range(), f"${node.name} is defined here"))
            elif defined:
                message += "; defined names: " + ", ".join("$" + n for n in sorted(defined))
            else:
                message += "; define one with `save PATH as $name` or `let $name = ...`"
            suggestions = ["$" + n for n in closest(node.name, defined)]
            out.append(Finding(message, located.range(node), "unknown-name", suggestions, related))
        if own is not None:
            defined.add(own.name)
    return out


# --- module paths and layers ------------------------------------------------------------

def module_paths(statement) -> list[tuple[ast.Path, str]]:
    """The module paths a statement names, each with the prefix it is read under (a `patch`
    component is a module inside the layers: `layers.0.`)."""
    found = []
    for node in walk(statement):
        if isinstance(node, ast.Patch):
            found.append((node.component, None))
        elif isinstance(node, ast.Path) and not any(node is p for p, _ in found):
            found.append((node, ""))
    return [(path, "layers.0." if prefix is None else prefix) for path, prefix in found]


def segment_range(located: Located, path: ast.Path, parts: list[str], index: int) -> Range:
    line, col, end_line, end_col = located.range(path)
    if line != end_line or end_col - col != len(path.text):
        return line, col, end_line, end_col
    start = len(".".join(parts[:index])) + (1 if index else 0)
    return line, col + start, line, col + start + len(parts[index])


def path_findings(table: NameTable, located: Located, path: ast.Path, prefix: str) -> list[Finding]:
    """What the core resolver says of one path, over the model's name table."""
    name = selection.patch_component(path.text) if prefix else path.text
    if name is None:
        return []
    try:
        table.expand(name)
    except LayerIndexError as error:
        parts = split_path(path.text)
        at = table.layer_segment_at(parts)
        where = segment_range(located, path, parts, at) if at is not None and not prefix else located.range(path)
        return [Finding(str(error), where, "layer-index", selection.layer_range(table.n_layers))]
    except UnknownModuleError as error:
        if prefix:
            error = selection.unknown_component(path, error)
            return [Finding(error.message, located.range(path), "unknown-module", error.suggestions)]
        return [Finding(str(error), located.range(path), "unknown-module", error.suggestions)]
    return []


def layers_findings(table: NameTable, located: Located) -> list[Finding]:
    """`layers` options (`lens layers 20`, `patch ... layers 30`) outside the model's layers."""
    out = []
    for node in walk(located.statement):
        if isinstance(node, ast.Layers):
            try:
                selection.layers(node, table.n_layers)
            except QueryError as error:
                out.append(Finding(error.message, located.range(node), "layer-index", error.suggestions))
    return out


async def module_findings(document: Document, link: DaemonLink) -> list[Finding]:
    try:
        table = await link.load_table()
    except DaemonUnavailable:
        return []
    if table is None:
        return []
    out = []
    for located in document.statements:
        for path, prefix in module_paths(located.statement):
            out += path_findings(table, located, path, prefix)
        out += layers_findings(table, located)
    return out


# --- positions ----------------------------------------------------------------------

def input_of(document: Document, located: Located, statement) -> tuple[str | None, tuple | None]:
    """The text a statement runs on and the range that sets it (its `in "..."` or the prompt above)."""
    if getattr(statement, "input", None) is not None:
        return statement.input.value, located.range(statement.input)
    prompt = document.prompt_before(located.chunk.line0)
    if prompt is None:
        return None, None
    return prompt.statement.prompt.value, prompt.range()


def inputs_of(document: Document, located: Located, statement) -> list[tuple[str, tuple]]:
    """The texts whose tokens a statement's position selects from: a `patch`'s clean and
    corrupted prompts, else its input (empty when there is none)."""
    if isinstance(statement, ast.Patch):
        return [(s.value, located.range(s)) for s in (statement.clean, statement.corrupt)]
    text, where = input_of(document, located, statement)
    return [] if text is None else [(text, where)]


def positions_for(statement, node, token_lists: list[list[str]]) -> list[int]:
    """Positions `node` (a statement's position or one of its items) selects, by the rule the
    evaluator runs (`mlxterp_repl.dsl.selection`); QueryError when it selects nothing valid."""
    if isinstance(statement, ast.Patch):
        return selection.select_patch(node, token_lists[0], token_lists[1])
    return selection.select(node, token_lists[0])[0]


def position_statements(statement):
    if isinstance(statement, ast.With):
        return position_statements(statement.body)
    if getattr(statement, "position", None) is not None:
        return [statement]
    return []


async def token_findings(document: Document, link: DaemonLink) -> list[Finding]:
    out = []
    for located in document.statements:
        for statement in position_statements(located.statement):
            inputs = inputs_of(document, located, statement)
            if not inputs:
                continue
            try:
                token_lists = [await link.prompt_tokens(text) for text, _ in inputs]
            except DaemonUnavailable:
                return out
            except Exception:  # noqa: BLE001 -- a text the daemon cannot tokenize: the run says why
                continue
            try:
                positions_for(statement, statement.position, token_lists)
            except QueryError as error:
                strings = token_lists[0]
                shown = ", ".join(f'{i}:"{s}"' for i, s in enumerate(strings[:24]))
                message = error.message + f"; its tokens are {shown}" + (" ..." if len(strings) > 24 else "")
                related = [(inputs[0][1], "the prompt is set here")] if inputs[0][1] else []
                out.append(Finding(message, located.range(error), "token", error.suggestions, related))
    return out


async def all_findings(document: Document, link: DaemonLink | None) -> list[Finding]:
    findings = parse_findings(document) + variable_findings(document)
    if link is not None:
        findings += await module_findings(document, link)
        findings += await token_findings(document, link)
    return findings
