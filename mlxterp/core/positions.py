"""Position selection: which tokens of a prompt a position names.

A position is one of

- an index: `3`, `-1` (negative counts from the end);
- token text: `"France"`;
- a slice: `2:5`, `:3`, `-2:` (Python slice rules, the end excluded);
- a list of indices and token texts: `[0, -1, "Paris"]`, in the order written;
- every position (`*`, `ALL` here).

Token text matches ONE way, everywhere (query language, hover, language server, library):
the first token equal to the text; else the first token equal to it once spaces around
both are ignored (byte-level BPE tokenizers put a space before word tokens: `"France"` finds
`" France"`). Nothing else matches -- no substrings -- and the empty string is an error.
Every failure raises `PositionError` naming what was wrong and what is valid.
"""

from __future__ import annotations

import difflib

from mlxterp.errors import PositionError

ALL = "*all*"  # the selection of every position (a str no one writes as token text)


def token_label(token: str) -> str:
    return repr(token) if token != token.strip() or not token else token


def _valid(tokens: list[str]) -> list[str]:
    return [f"{i}:{token_label(t)}" for i, t in enumerate(tokens)]


def token_index(value: int, tokens: list[str]) -> int:
    """The position of index `value` (negative from the end)."""
    n = len(tokens)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PositionError(f"a position is an integer or a token's text, not {value!r}", _valid(tokens))
    if not -n <= value < n:
        raise PositionError(f"position {value} is outside the prompt's {n} tokens (0..{n - 1}, or -{n}..-1)",
                            _valid(tokens))
    return value % n


def find_token(text: str, tokens: list[str]) -> int | None:
    """The position token text names under the one matching rule, or None (empty text: None)."""
    if not text:
        return None
    for i, token in enumerate(tokens):
        if token == text:
            return i
    wanted = text.strip()
    if not wanted:
        return None
    for i, token in enumerate(tokens):
        if token.strip() == wanted:
            return i
    return None


def match_token(text: str, tokens: list[str]) -> int:
    """The position of the token `text` names; PositionError with the closest tokens otherwise."""
    if not isinstance(text, str):
        raise PositionError(f"token text is a string, not {text!r}", _valid(tokens))
    if text == "":
        raise PositionError('an empty token text "" names no token; write a token\'s text, e.g. "Paris", '
                            "or an index like -1", _valid(tokens))
    found = find_token(text, tokens)
    if found is not None:
        return found
    words = [t.strip() for t in tokens if t.strip()]
    close = difflib.get_close_matches(text.strip(), words, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise PositionError(f"no token of the input matches {text!r}{hint}; valid: one of its tokens, "
                        "matched exactly or ignoring surrounding spaces", _valid(tokens), close)


def slice_positions(start: int | None, stop: int | None, tokens: list[str]) -> list[int]:
    """Positions of a Python-style slice; an empty selection is an error."""
    n = len(tokens)
    chosen = list(range(n))[slice(start, stop)]
    if not chosen:
        written = f"{'' if start is None else start}:{'' if stop is None else stop}"
        raise PositionError(f"the slice {written} selects none of the prompt's {n} tokens (0..{n - 1})",
                            _valid(tokens))
    return chosen


def select_position(item, tokens: list[str]) -> int:
    """One index or token text."""
    return match_token(item, tokens) if isinstance(item, str) else token_index(item, tokens)


def select_positions(spec, tokens: list[str]) -> list[int]:
    """Positions `spec` names: an int, token text, a `slice`, a list of ints and texts, ALL or None (all)."""
    if spec is None or (isinstance(spec, str) and spec == ALL):
        return list(range(len(tokens)))
    if isinstance(spec, slice):
        return slice_positions(spec.start, spec.stop, tokens)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise PositionError("an empty list names no position; write e.g. [0, -1]", _valid(tokens))
        return [select_position(item, tokens) for item in spec]
    return [select_position(spec, tokens)]


def names_one(spec) -> bool:
    """Whether `spec` names a single token (an index or a token text, not a list or slice)."""
    return (isinstance(spec, int) and not isinstance(spec, bool)) or (isinstance(spec, str) and spec != ALL)
