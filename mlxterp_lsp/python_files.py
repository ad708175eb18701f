"""Python files in the language server: mlxterp's names where Python code writes them.

The server answers in a Python file only at these places, and stays silent everywhere else
(the user's own Python language server does the rest):

- strings naming ONE module: `trace.activations["layers.8.mlp"]`, `activations.get("...")`,
  `model.resolve("...")`;
- strings naming modules or PATTERNS (`layers.0..3.mlp`, `layers.*.attn`):
  `model.expand("...")`, `capture=["...", ...]` (or `capture="..."`), and the keys of
  `interventions={"...": fn}`;
- attribute chains of layers: `model.layers[8].mlp.output`, where the segments after the
  layer index are sub-modules and `output` / `input` are the hook points of each module.

Completion offers the next path segments from the live model's name table (the daemon's
`modules` op); diagnostics name unknown modules (with the closest valid names) and layers
out of range, using the core resolver (`mlxterp.core.paths.NameTable`) locally; hover
shows a module's type, parameters, full name and the output shape of the last trace of
that model in the daemon. Strings are found with Python's own tokenizer. Never imports mlx.
"""

from __future__ import annotations

import ast as python_ast
import io
import re
import tokenize
from dataclasses import dataclass

from mlxterp.core.paths import NameTable
from mlxterp.errors import LayerIndexError, UnknownModuleError
from mlxterp_repl.dsl import selection
from mlxterp_repl.dsl.complete import CompletionContext, complete

from mlxterp_lsp.checks import Finding, Range

LANGUAGE_IDS = ("python",)
SUFFIXES = (".py", ".pyi")
HOOK_POINTS = {"output": "the module's output (hook point): .output.save()",
               "input": "the module's input (hook point): .input.save()"}
# what `model.layers[i]` has besides sub-modules (and a hook point, `layers[8].attn.z`: .head[H], .save())
PROXY_ATTRIBUTES = set(HOOK_POINTS) | {"module", "name", "head", "save", "value"}
SKIPPED = (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
_CHAIN = re.compile(r"\.layers\[\s*(-?\d+|[A-Za-z_]\w*)\s*\]((?:\.[A-Za-z_]\w*)*)\.([A-Za-z_]\w*)?$")


def is_python(uri: str, language_id: str | None = None) -> bool:
    if language_id:
        return language_id in LANGUAGE_IDS
    return uri.split("?", 1)[0].endswith(SUFFIXES)


@dataclass
class Site:
    """A string in a Python file that names modules: `one` module, or a `pattern`."""

    kind: str  # "one" | "pattern"
    text: str  # the string's value
    range: Range  # of the value inside the quotes (0-based, code points)


@dataclass
class Segment:
    """One piece of `model.layers[8].mlp.output`: the layer index or an attribute."""

    text: str
    range: Range
    path: str  # the module path up to and including this piece (`layers.8.mlp`)


class PythonDocument:
    """An open Python file: its text and the mlxterp names in it (found on demand)."""

    def __init__(self, uri: str, text: str, version: int | None = None):
        self.uri = uri
        self.version = version
        self.set_text(text)

    def set_text(self, text: str) -> None:
        self.text = text
        self.lines = text.split("\n")
        self._found = None

    @property
    def found(self) -> tuple[list[Site], list[list[Segment]]]:
        if self._found is None:
            self._found = find_names(self.text)
        return self._found

    @property
    def sites(self) -> list[Site]:
        return self.found[0]

    @property
    def chains(self) -> list[list[Segment]]:
        return self.found[1]


# --- finding the names -------------------------------------------------------------

def significant_tokens(text: str) -> list[tokenize.TokenInfo]:
    """Python's tokens of `text` without layout and comments; as many as it can read when the
    text ends mid-statement (as it does before a cursor)."""
    out = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type not in SKIPPED:
                out.append(token)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def site_kind(tokens: list, opener: int | None, at: int) -> str | None:
    """Whether a string at `tokens[at]` (inside the bracket `tokens[opener]`) names modules."""
    def word(i):
        return tokens[i].string if 0 <= i < len(tokens) else None

    if word(at - 1) == "=" and word(at - 2) == "capture":  # capture="layers.3"
        return "pattern"
    if opener is None:
        return None
    bracket, between = word(opener), tokens[opener + 1:at]
    first_item = not between or between[-1].string == ","
    if bracket == "[" and word(opener - 1) == "activations" and not between:
        return "one"
    if bracket == "(" and not between and word(opener - 2) == ".":
        method = word(opener - 1)
        if method == "expand":
            return "pattern"
        if method == "resolve" or (method == "get" and word(opener - 3) == "activations"):
            return "one"
    if word(opener - 1) == "=" and first_item:
        if bracket in "[(" and word(opener - 2) == "capture":
            return "pattern"
        if bracket == "{" and word(opener - 2) == "interventions":
            return "pattern"  # a key of the interventions dict
    return None


def track_bracket(stack: list[int], i: int, token) -> bool:
    """Update `stack`, the indices of the open brackets, with `tokens[i]`; whether it was a
    bracket or the end of a statement."""
    if token.type == tokenize.NEWLINE:
        stack.clear()
    elif token.string in ("(", "[", "{"):
        stack.append(i)
    elif token.string in (")", "]", "}"):
        if stack:
            stack.pop()
    else:
        return False
    return True


def bracket_stack(tokens: list) -> list[int]:
    """Indices of the brackets still open after `tokens` (innermost last)."""
    stack = []
    for i, token in enumerate(tokens):
        track_bracket(stack, i, token)
    return stack


def string_value(token) -> tuple[str, Range] | None:
    """The value of a plain one-line string token and the range of that value; None for
    f-strings, bytes, triple-quoted or escaped strings."""
    raw = token.string
    quote = min((raw.find(q) for q in "'\"" if q in raw), default=-1)
    prefix = raw[:quote].lower()
    if quote < 0 or "f" in prefix or "b" in prefix or raw[quote:quote + 3] in ('"""', "'''"):
        return None
    try:
        value = python_ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, str) or raw[quote + 1:-1] != value or token.start[0] != token.end[0]:
        return None
    line, col = token.start[0] - 1, token.start[1] + quote + 1
    return value, (line, col, line, col + len(value))


def find_names(text: str) -> tuple[list[Site], list[list[Segment]]]:
    tokens = significant_tokens(text)
    sites, chains, stack = [], [], []
    for i, token in enumerate(tokens):
        if track_bracket(stack, i, token):
            continue
        if token.type == tokenize.STRING:
            kind = site_kind(tokens, stack[-1] if stack else None, i)
            found = string_value(token) if kind else None
            if found is not None and found[0].strip():
                sites.append(Site(kind, *found))
        elif token.string == "layers" and i and tokens[i - 1].string == ".":
            chain = layer_chain(tokens, i)
            if chain:
                chains.append(chain)
    return sites, chains


def layer_chain(tokens: list, at: int) -> list[Segment]:
    """`layers[8].mlp.output` from the `layers` token at `at`: the index, then the attributes."""
    def word(i):
        return tokens[i].string if i < len(tokens) else None

    i = at + 1
    if word(i) != "[":
        return []
    negative = word(i + 1) == "-"
    j = i + 2 if negative else i + 1
    if j >= len(tokens) or tokens[j].type != tokenize.NUMBER or not tokens[j].string.isdigit():
        return []
    number = tokens[j]
    close = i + (3 if negative else 2)
    if word(close) != "]":
        return []
    start = tokens[i + 1].start
    index = ("-" if negative else "") + number.string
    path = f"layers.{index}"
    chain = [Segment(index, (start[0] - 1, start[1], number.end[0] - 1, number.end[1]), path)]
    i = close + 1
    while word(i) == "." and i + 1 < len(tokens) and tokens[i + 1].type == tokenize.NAME:
        name = tokens[i + 1]
        path += "." + name.string
        chain.append(Segment(name.string, (name.start[0] - 1, name.start[1], name.end[0] - 1, name.end[1]), path))
        i += 2
    return chain


# --- diagnostics ------------------------------------------------------------------------

def findings(document: PythonDocument, table: NameTable | None) -> list[Finding]:
    """Unknown modules and layers out of range, by the core resolver over the model's table."""
    if table is None:
        return []
    out = []
    for site in document.sites:
        try:
            table.resolve(site.text) if site.kind == "one" else table.expand(site.text)
        except LayerIndexError as error:
            out.append(Finding(str(error), site.range, "layer-index", selection.layer_range(table.n_layers)))
        except UnknownModuleError as error:
            out.append(Finding(str(error), site.range, "unknown-module", list(error.suggestions)))
    for chain in document.chains:
        out += chain_findings(table, chain)
    return out


def chain_findings(table: NameTable, chain: list[Segment]) -> list[Finding]:
    index = chain[0]
    try:
        table.resolve(index.path)
    except LayerIndexError as error:
        return [Finding(str(error), index.range, "layer-index", selection.layer_range(table.n_layers))]
    except UnknownModuleError:
        return []  # not a model's layers (some other object with a `layers` list)
    for k, segment in enumerate(chain[1:], start=1):
        if segment.text in PROXY_ATTRIBUTES:
            return []
        try:
            table.resolve(segment.path)
        except UnknownModuleError as error:
            # Only a name used as a module (followed by .output / .input) is surely wrong: a
            # module proxy also reads the module's own attributes (`.weight`).
            following = chain[k + 1].text if k + 1 < len(chain) else None
            if following in HOOK_POINTS:
                return [Finding(str(error), segment.range, "unknown-module", list(error.suggestions))]
            return []
    return []


# --- where the cursor is ------------------------------------------------------------------

@dataclass
class Place:
    """What the cursor is in: a module string (`kind` one/pattern) or a layer attribute chain."""

    kind: str  # "one" | "pattern" | "attribute"
    typed: str  # the path typed so far (for an attribute chain: `layers.8.mlp.` + the word)
    start: int  # column where the replaced word begins
    prefix_len: int  # characters of `typed` before the word being replaced


def place_at(document: PythonDocument, line: int, col: int) -> Place | None:
    text = document.lines[line] if 0 <= line < len(document.lines) else ""
    before = text[:col]
    quote = open_quote(before)
    if quote is not None:
        offset = sum(len(l) + 1 for l in document.lines[:line]) + quote
        tokens = significant_tokens(document.text[:offset])
        stack = bracket_stack(tokens)
        kind = site_kind(tokens, stack[-1] if stack else None, len(tokens))
        if kind is None:
            return None
        typed = before[quote + 1:]
        return Place(kind, typed, quote + 1, 0)
    match = _CHAIN.search(before)
    if match is None:
        return None
    index, attributes, word = match.group(1), match.group(2), match.group(3) or ""
    if not re.fullmatch(r"-?\d+", index):
        index = "0"  # `model.layers[i].`: what every layer has, read from layer 0
    prefix = f"layers.{index}{attributes}."
    if any(part in PROXY_ATTRIBUTES for part in attributes.split(".")[1:]):
        return None  # after .output / .input: an array's attributes, not ours
    return Place("attribute", prefix + word, col - len(word), len(prefix))


def open_quote(before: str) -> int | None:
    """Column of the quote that opens the string the line is still in at its end, or None."""
    quote, i = None, 0
    while i < len(before):
        ch = before[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if ch == before[quote]:
                quote = None
        elif ch == "#":
            return None
        elif ch in "'\"":
            quote = i
        i += 1
    return quote


# --- completion ---------------------------------------------------------------------------

@dataclass
class Candidate:
    label: str
    kind: str  # "module" | "hook"
    detail: str
    start: int  # column where the replaced text begins


def candidates(place: Place, modules: list[dict], table: NameTable | None) -> list[Candidate]:
    """Next path segments after what is typed: the query language's own module completion."""
    context = CompletionContext(modules=modules, n_layers=table.n_layers if table else None, table=table)
    head = "save "
    query = head + place.typed
    out = []
    for item in complete(query, len(query), context):
        if item.kind != "module":
            continue
        if place.kind != "pattern" and (item.label == "*" or ".." in item.label):
            continue  # one module here: no patterns
        if place.kind == "attribute" and not item.label.isidentifier():
            continue  # `model.layers[8].` takes names, not layer numbers
        start = place.start + (item.start - len(head) - place.prefix_len if item.start is not None else 0)
        out.append(Candidate(item.label, "module", item.detail, start))
    if place.kind == "attribute":
        word = place.typed[place.prefix_len:]
        out += [Candidate(name, "hook", what, place.start) for name, what in HOOK_POINTS.items()
                if name.startswith(word)]
    return out


# --- hover ----------------------------------------------------------------------------------

def name_at(document: PythonDocument, line: int, col: int) -> tuple[str, str, Range] | None:
    """(kind, module path, range) of the mlxterp name under the cursor."""
    for site in document.sites:
        l, c, _el, ec = site.range
        if l == line and c <= col <= ec:
            return site.kind, site.text, site.range
    for chain in document.chains:
        for segment in chain:
            l, c, _el, ec = segment.range
            if l == line and c <= col <= ec and segment.text not in PROXY_ATTRIBUTES:
                return "one", segment.path, segment.range
    return None


def hover_text(kind: str, name: str, table: NameTable, modules_by_name: dict) -> str:
    """Markdown for a module name: type, parameters, full name, output shape if traced."""
    try:
        fulls = [table.resolve(name)] if kind == "one" else table.expand(name)
    except (LayerIndexError, UnknownModuleError) as error:
        return f"`{name}`: {error}"
    if len(fulls) > 1:
        shown = ", ".join(f"`{table.short(f)}`" for f in fulls[:8]) + (" ..." if len(fulls) > 8 else "")
        return f"`{name}` names {len(fulls)} modules: {shown}"
    full = fulls[0]
    short = table.short(full)
    info = modules_by_name.get(short) or {}
    lines = [f"**{short}** `{info.get('type', 'module')}`"]
    if "params" in info:
        lines.append(f"parameters: {info['params']:,}")
    lines.append(f"full name: `{full}`")
    if info.get("shape") is not None:
        lines.append(f"output shape: {tuple(info['shape'])} (last trace in the daemon)")
    return "\n\n".join(lines)
