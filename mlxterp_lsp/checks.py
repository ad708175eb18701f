"""What is wrong in a document, as findings with document ranges.

Parse errors come from the query language's parser and need no daemon. The other checks
ask the daemon through `DaemonLink` (cached): whether a module path resolves (the
model's own resolver decides, through the daemon), whether a layer index is in range,
whether a position names a token of the prompt it reads, and whether a `$name` is
defined above its use. When the daemon cannot answer, those checks are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlxterp_repl.dsl import ast
from mlxterp_repl.dsl.complete import _split_path as split_path
from mlxterp_repl.dsl.errors import closest

from mlxterp_lsp.documents import Document, Located, defined_var, walk
from mlxterp_lsp.link import DaemonLink, DaemonUnavailable

Range = tuple[int, int, int, int]  # 0-based line, col, end line, end col (code points)

INDEX = re.compile(r"^-?\d+$")
RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
LIST = re.compile(r"^\[([-\d,\s]*)\]$")


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


# --- module paths ------------------------------------------------------------------

def module_paths(statement) -> list[tuple[ast.Path, str]]:
    """The module paths a statement names, each with the single name to probe for it."""
    found = []
    for node in walk(statement):
        if isinstance(node, ast.Patch):
            found.append((node.component, None))
        elif isinstance(node, ast.Path) and not any(node is p for p, _ in found):
            found.append((node, ""))
    return [(path, "layers.0." if prefix is None else prefix) for path, prefix in found]


def layer_problem(parts: list[str], n_layers: int) -> tuple[int, str] | None:
    """(segment index, message) when the layer segment of a path is out of range."""
    for i, part in enumerate(parts[:-1]):
        if part != "layers":
            continue
        segment = parts[i + 1]
        values = []
        if INDEX.match(segment):
            values = [int(segment)]
        elif RANGE.match(segment):
            values = [int(v) for v in RANGE.match(segment).groups()]
        elif LIST.match(segment):
            values = [int(v) for v in LIST.match(segment).group(1).split(",") if v.strip().lstrip("-").isdigit()]
        for value in values:
            if not -n_layers <= value < n_layers:
                return i + 1, (f"layer {value} is out of range: the model has {n_layers} layers "
                               f"(0..{n_layers - 1}, or -{n_layers}..-1)")
        m = RANGE.match(segment)
        if m:
            lo, hi = (int(v) % n_layers for v in m.groups())
            if lo > hi:
                return i + 1, f"the layer range {segment} is empty; write low..high (both included)"
        return None
    return None


def probe_name(parts: list[str]) -> tuple[str | None, int | None]:
    """A single module name standing for a path (its first layer for a pattern), or None when
    the path has wildcards outside the layer segment; and the index of the layer segment."""
    parts = list(parts)
    layer_at = None
    for i, part in enumerate(parts[:-1]):
        if part == "layers":
            layer_at = i + 1
            segment = parts[i + 1]
            if segment == "*":
                parts[i + 1] = "0"
            elif RANGE.match(segment):
                parts[i + 1] = RANGE.match(segment).group(1)
            elif LIST.match(segment):
                first = [v for v in LIST.match(segment).group(1).split(",") if v.strip()]
                parts[i + 1] = first[0].strip() if first else "0"
            break
    if any(ch in part for part in parts for ch in "*?[]"):
        return None, layer_at
    return ".".join(parts), layer_at


def suggest_paths(parts: list[str], modules: list[dict], layer_at: int | None, original: list[str]) -> list[str]:
    """Names close to a path that does not resolve, written with the user's layer segment."""
    names = [m.get("name", "") for m in modules if m.get("name")]
    candidates = names + ["output"]
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k]) + "."
        children = sorted({n for n in names if n.startswith(prefix) and "." not in n[len(prefix):]})
        if children:
            candidates = children
            break
    found = closest(".".join(parts), candidates)
    if not found:
        by_last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        found = [by_last[w] for w in closest(parts[-1], by_last)]
    if layer_at is not None:
        rewritten = []
        for name in found:
            pieces = name.split(".")
            if len(pieces) > layer_at and pieces[layer_at - 1] == "layers":
                pieces[layer_at] = original[layer_at]
            rewritten.append(".".join(pieces))
        found = rewritten
    return found


def segment_range(located: Located, path: ast.Path, parts: list[str], index: int) -> tuple[int, int, int, int]:
    line, col, end_line, end_col = located.range(path)
    if line != end_line or end_col - col != len(path.text):
        return line, col, end_line, end_col
    start = len(".".join(parts[:index])) + (1 if index else 0)
    return line, col + start, line, col + start + len(parts[index])


async def module_findings(document: Document, link: DaemonLink) -> list[Finding]:
    try:
        modules = await link.load_modules()
    except DaemonUnavailable:
        return []
    n_layers = link.n_layers
    out = []
    for located in document.statements:
        for path, prefix in module_paths(located.statement):
            if path.text in ("output", "logits"):
                continue
            parts = split_path(prefix + path.text)
            shown = len(split_path(prefix))
            if n_layers:
                problem = layer_problem(parts, n_layers)
                if problem is not None:
                    index, message = problem
                    where = segment_range(located, path, parts[shown:], index - shown) if index >= shown else located.range(path)
                    out.append(Finding(message, where, "layer-index", [f"0..{n_layers - 1}"]))
                    continue
            name, layer_at = probe_name(parts)
            if name is None:
                continue
            try:
                ok = await link.resolves(name)
            except DaemonUnavailable:
                return out
            except Exception:  # noqa: BLE001 -- a daemon error about one name: leave it unchecked
                continue
            if ok:
                continue
            suggestions = suggest_paths(name.split("."), modules, layer_at, parts)
            suggestions = [s[len(prefix):] if prefix and s.startswith(prefix) else s for s in suggestions]
            what = "component" if prefix else "module"
            message = f"unknown {what} '{path.text}'"
            if suggestions:
                message += "; did you mean " + ", ".join(suggestions) + "?"
            out.append(Finding(message, located.range(path), "unknown-module", suggestions))
    return out


# --- positions ----------------------------------------------------------------------

def match_token(text: str, strings: list[str]) -> int | None:
    """The position a `@ "text"` selects: exact after trimming spaces, else the first containing it."""
    for i, token in enumerate(strings):
        if token.strip() == text.strip():
            return i
    for i, token in enumerate(strings):
        if text in token:
            return i
    return None


def selected_positions(position, strings: list[str]) -> list[int]:
    """Positions a position node selects in a prompt of `strings` (for hover)."""
    n = len(strings)
    if isinstance(position, ast.Index):
        return [position.value % n] if n and -n <= position.value < n else []
    if isinstance(position, ast.Match):
        i = match_token(position.text, strings)
        return [] if i is None else [i]
    if isinstance(position, ast.Slice):
        return list(range(n))[position.start:position.stop]
    if isinstance(position, ast.PositionList):
        return [i for item in position.items for i in selected_positions(item, strings)]
    if isinstance(position, ast.AllPositions):
        return list(range(n))
    return []


def input_of(document: Document, located: Located, statement) -> tuple[str | None, tuple | None]:
    """The text a statement runs on and the range that sets it (its `in "..."` or the prompt above)."""
    if getattr(statement, "input", None) is not None:
        return statement.input.value, located.range(statement.input)
    prompt = document.prompt_before(located.chunk.line0)
    if prompt is None:
        return None, None
    return prompt.statement.prompt.value, prompt.range()


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
            text, where = input_of(document, located, statement)
            if text is None:
                continue
            try:
                strings = await link.prompt_tokens(text)
            except DaemonUnavailable:
                return out
            except Exception:  # noqa: BLE001
                continue
            items = statement.position.items if isinstance(statement.position, ast.PositionList) else [statement.position]
            for item in items:
                message = None
                if isinstance(item, ast.Match) and match_token(item.text, strings) is None:
                    message = f'token "{item.text}" is not in the prompt'
                elif isinstance(item, ast.Index) and not -len(strings) <= item.value < len(strings):
                    message = f"position {item.value} is out of range: the prompt has {len(strings)} tokens"
                if message is None:
                    continue
                shown = ", ".join(f'{i}:"{s}"' for i, s in enumerate(strings[:24]))
                message += f"; its tokens are {shown}" + (" ..." if len(strings) > 24 else "")
                words = [s.strip() for s in strings if s.strip()]
                suggestions = closest(item.text, words) if isinstance(item, ast.Match) else [str(-1), str(len(strings) - 1)]
                related = [(where, "the prompt is set here")] if where else []
                out.append(Finding(message, located.range(item), "token", suggestions, related))
    return out


async def all_findings(document: Document, link: DaemonLink | None) -> list[Finding]:
    findings = parse_findings(document) + variable_findings(document)
    if link is not None:
        findings += await module_findings(document, link)
        findings += await token_findings(document, link)
    return findings
