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
`" France"`); else the first run of consecutive tokens that together spell the text (spaces
around it ignored): `"Zürich"` finds `Z <0xC3> <0xBC> ric h` and names all five. Nothing else
matches -- no substrings -- and the empty string is an error.

Token text shows a byte that is not valid UTF-8 on its own as `<0xC3>` (`show_bytes`);
`token_bytes` reads such text back into the token's bytes.
Every failure raises `PositionError` naming what was wrong and what is valid.
"""

from __future__ import annotations

import difflib
import re

from mlxterp.core.errors import PositionError

ALL = "*all*"  # the selection of every position (a str no one writes as token text)


def token_label(token: str) -> str:
    return repr(token) if token != token.strip() or not token else token


BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def show_bytes(data: bytes) -> str:
    """Bytes as text: valid UTF-8 as its characters, every other byte as `<0xC3>`."""
    out, i = [], 0
    while i < len(data):
        for n in (1, 2, 3, 4):
            try:
                out.append(data[i:i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(f"<0x{data[i]:02X}>")
            i += 1
    return "".join(out)


def token_bytes(token: str) -> bytes:
    """The bytes a token's text stands for (`<0xC3>` is the byte 0xC3)."""
    parts, last = [], 0
    for found in BYTE.finditer(token):
        parts.append(token[last:found.start()].encode("utf-8"))
        parts.append(bytes([int(found.group(1), 16)]))
        last = found.end()
    parts.append(token[last:].encode("utf-8"))
    return b"".join(parts)


def find_run(text: str, tokens: list[str]) -> list[int] | None:
    """The positions of the first run of two or more consecutive tokens whose bytes together
    spell `text` (whitespace around it ignored), or None."""
    wanted = text.strip().encode("utf-8")
    if not wanted:
        return None
    pieces = [token_bytes(t) for t in tokens]
    for start in range(len(tokens)):
        joined = b""
        for end in range(start, len(tokens)):
            joined += pieces[end]
            spelled = joined.lstrip()
            if not spelled:
                continue
            if spelled.rstrip() == wanted and end > start and pieces[start].strip():
                return list(range(start, end + 1))
            if not wanted.startswith(spelled):
                break
    return None


def match_tokens(text: str, tokens: list[str]) -> list[int]:
    """The positions token text names: one token that matches, else the run of tokens that
    spells it; PositionError with the closest tokens otherwise."""
    if isinstance(text, str) and text and find_token(text, tokens) is None:
        run = find_run(text, tokens)
        if run is not None:
            return run
    return [match_token(text, tokens)]


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
        return [p for item in spec for p in select_positions(item, tokens)]
    if isinstance(spec, str):
        return match_tokens(spec, tokens)
    return [select_position(spec, tokens)]


def names_one(spec) -> bool:
    """Whether `spec` names a single token (an index or a token text, not a list or slice); a
    text spelled by several tokens names them all (check the selection's length too)."""
    return (isinstance(spec, int) and not isinstance(spec, bool)) or (isinstance(spec, str) and spec != ALL)
