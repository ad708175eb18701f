"""Completion at a cursor: what may come next, without running the model.

The text before the cursor is parsed with the word being typed taken off; the parser notes
what it would have accepted at that point (a statement, an option keyword, a module path
below a prefix, a `$` name, a position...). Those notes become candidates from the
`CompletionContext` -- the module tree, the session's variables, the prompt's tokens --
filtered by the word being typed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mlxterp.core.statements import FUNCTIONS, INTERVENTIONS, METRICS, OPTIONS, STATEMENTS

from mlxterp.core import paths

from mlxterp_repl.dsl.lexer import tokenize
from mlxterp_repl.dsl.parser import Parser


@dataclass
class CompletionContext:
    modules: list[dict] = field(default_factory=list)  # as model.module_info(): name, type, params
    n_layers: int | None = None
    variables: list[str] = field(default_factory=list)  # with or without the leading $
    prompt_tokens: list[str] = field(default_factory=list)  # token strings of the current prompt
    table: paths.NameTable | None = None  # the core name table; else the short names of `modules`


@dataclass
class Completion:
    label: str
    kind: str  # statement | keyword | module | variable | token | intervention | metric | function | value
    detail: str = ""
    insert_text: str | None = None  # None: the label
    start: int | None = None  # offset where the replaced text begins (the word being typed)

    def __post_init__(self):
        if self.insert_text is None:
            self.insert_text = self.label


def complete(text: str, offset: int, context: CompletionContext | None = None) -> list[Completion]:
    """What may come at `offset` in `text`, filtered by the word being typed there."""
    context = context or CompletionContext()
    offset = max(0, min(offset, len(text)))
    prefix = text[:offset]
    if _in_comment(prefix):
        return []
    word, start, in_string = _word_at_end(prefix)
    parser = Parser(prefix[:start])
    parser.parse_all()
    seen, out = set(), []
    patching = _statement_word(prefix[:start]) == "patch"
    for kind, payload in parser.expected:
        if kind == "path" and patching:
            kind = "component"  # `patch COMPONENT`: a module inside every layer, not a model path
        for item in _candidates(kind, payload, context, in_string):
            if item.label in seen or not _matches(item, word, in_string):
                continue
            seen.add(item.label)
            item.start = start
            out.append(item)
    return out


def _statement_word(before: str) -> str:
    """The first word of the statement the cursor is in (its line, or the line a `\\` continues)."""
    lines = before.split("\n")
    index = len(lines) - 1
    while index > 0 and lines[index - 1].rstrip().endswith("\\"):
        index -= 1
    words = lines[index].split()
    return words[0] if words else ""


def _in_comment(prefix: str) -> bool:
    line = prefix.rsplit("\n", 1)[-1]
    in_string = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and in_string:
            i += 2
            continue
        if ch == '"':
            in_string = not in_string
        elif ch == "#" and not in_string:
            return True
        i += 1
    return False


def _word_at_end(prefix: str) -> tuple[str, int, bool]:
    """The partly typed word before the cursor, where it starts, and whether it is a string."""
    tokens, errors = tokenize(prefix)
    if len(tokens) < 2:
        return "", len(prefix), False
    last, before = tokens[-2], tokens[-3] if len(tokens) >= 3 else None
    if last.end != len(prefix):
        return "", len(prefix), False
    unterminated = any(e.span == last.span and e.message.startswith("unterminated") for e in errors)
    if last.kind == "STRING" and unterminated:
        return str(last.value), last.start, True
    if last.kind in ("NAME", "VAR"):
        return last.text, last.start, False
    if last.kind in ("NUMBER", "STAR") and before is not None and before.kind == "DOT" and before.end == last.start:
        return last.text, last.start, False
    return "", len(prefix), False


def _matches(item: Completion, word: str, in_string: bool) -> bool:
    if not word:
        return True
    if in_string:
        return word.strip().lower() in item.detail.lower() or item.label.lower().startswith('"' + word.lower())
    return item.label.lower().startswith(word.lower())


def _candidates(kind: str, payload, context: CompletionContext, in_string: bool) -> list[Completion]:
    if in_string:
        return _token_candidates(context) if kind == "position" else []
    if kind == "statement":
        names = payload or list(STATEMENTS)
        return [Completion(name, "statement", STATEMENTS[name].syntax) for name in names]
    if kind == "keyword":
        return [Completion(word, "keyword", OPTIONS[word].syntax() if word in OPTIONS else "")
                for word in payload if word not in (",", ":")]
    if kind == "topic":
        return [Completion(name, "statement", spec.summary) for name, spec in STATEMENTS.items()]
    if kind == "intervention":
        return [Completion(name, "intervention", spec.syntax) for name, spec in INTERVENTIONS.items()]
    if kind == "metric":
        return [Completion(name, "metric", what) for name, what in METRICS.items()]
    if kind == "function":
        return [Completion(name, "function", f"{name}($x)", insert_text=f"{name}(") for name in FUNCTIONS]
    if kind == "var":
        names = ["$" + v.lstrip("$") for v in context.variables]
        return [Completion(name, "variable") for name in names]
    if kind == "path":
        return _module_candidates(payload, context)
    if kind == "component":
        return _component_candidates(payload, context)
    if kind == "position":
        fixed = [Completion("-1", "value", "last token"), Completion("*", "value", "all positions")]
        return fixed + _token_candidates(context)
    if kind == "layers" and context.n_layers:
        last = context.n_layers - 1
        return [Completion(f"0..{last}", "value", "all layers"), Completion("*", "value", "all layers")]
    return []


def _token_candidates(context: CompletionContext) -> list[Completion]:
    out = []
    for position, token in enumerate(context.prompt_tokens):
        word = token.strip()
        if word:
            quoted = json.dumps(word, ensure_ascii=False)
            out.append(Completion(quoted, "token", f"position {position}: {token!r}"))
    return out


def _component_candidates(prefix: str, context: CompletionContext) -> list[Completion]:
    """What `patch` takes: `layer`, `heads`, or a module inside a layer (`mlp`, `self_attn.q_proj`),
    named as below layer 0 (every layer has the same ones)."""
    out = [] if prefix else [Completion("layer", "component", "the whole block"),
                             Completion("heads", "component", "each attention head's z")]
    inside = [c for c in _module_candidates("layers.0." + prefix, context)
              if not c.label[0].isdigit() and c.label not in ("*", "output")]
    return out + inside


def _module_candidates(prefix: str, context: CompletionContext) -> list[Completion]:
    """Next path segments below `prefix`, by the core's path rules over the module table."""
    info = {module["name"]: module for module in context.modules}
    names = context.table.path_names() if context.table is not None else list(info)
    n_layers = context.table.n_layers if context.table is not None else context.n_layers
    children = {child: info.get(name, {}).get("type", "") for child, name in
                paths.next_segments(prefix, names, n_layers).items()}
    for child in list(children):  # the one alias worth offering: attention goes by many names
        if child in paths.ALIASES["attn"] and child != "attn":
            children.setdefault("attn", f"alias of {child}")
    out = []
    if not paths.split_path(prefix):
        out.append(Completion("output", "module", "the logits"))
    numeric = sorted((c for c in children if c.isdigit()), key=int)
    if numeric:
        out.append(Completion("*", "module", "every layer"))
        if len(numeric) > 1:
            out.append(Completion(f"{numeric[0]}..{numeric[-1]}", "module", "a range of layers"))
    for child in sorted((c for c in children if not c.isdigit())) + numeric:
        out.append(Completion(child, "module", children[child]))
    return out
