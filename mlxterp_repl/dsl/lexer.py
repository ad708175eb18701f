"""The lexer: source text to tokens, each with its offsets and line/column span.

It never raises. Text it cannot read becomes an OTHER token (the parser says what was
expected there) or an error in the returned list (an unterminated string, a bad escape).
A backslash at the end of a line joins it to the next; `#` starts a comment.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxterp_repl.dsl.errors import QueryError, Span

PUNCTUATION = {
    "..": "DOTDOT",
    ".": "DOT",
    "*": "STAR",
    ":": "COLON",
    ",": "COMMA",
    "[": "LBRACK",
    "]": "RBRACK",
    "(": "LPAREN",
    ")": "RPAREN",
    "@": "AT",
    "=": "EQUALS",
    "+": "PLUS",
    "-": "MINUS",
    "/": "SLASH",
}

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "0": "\0"}


@dataclass(frozen=True)
class Token:
    kind: str  # NAME NUMBER STRING VAR NEWLINE EOF OTHER, or a PUNCTUATION kind
    text: str  # the source text of the token
    value: object  # str for NAME/STRING/VAR (VAR without the $), int/float for NUMBER
    start: int  # offsets into the source, end exclusive
    end: int
    span: Span
    space_before: bool  # whitespace (or the start of a line) right before it


class LineIndex:
    """Offsets to 1-based (line, column) of one source text."""

    def __init__(self, source: str):
        self.starts = [0]
        for i, ch in enumerate(source):
            if ch == "\n":
                self.starts.append(i + 1)

    def position(self, offset: int) -> tuple[int, int]:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, offset - self.starts[lo] + 1

    def span(self, start: int, end: int) -> Span:
        line, col = self.position(start)
        end_line, end_col = self.position(end)
        return Span(line, col, end_line, end_col)


def _is_name_start(ch: str) -> bool:
    return ch == "_" or ch.isalpha()


def _is_name_char(ch: str) -> bool:
    return ch == "_" or ch.isalnum()


def _is_digit(ch: str) -> bool:
    return "0" <= ch <= "9"


def _continues(source: str, i: int) -> bool:
    """Whether the backslash at `i` ends its line (spaces after it allowed)."""
    rest = source[i + 1 :].split("\n", 1)[0]
    return rest.strip(" \t\r") == ""


def tokenize(source: str, should_stop=None) -> tuple[list[Token], list[QueryError]]:
    """All tokens of `source` (ending with EOF) and the lexical errors met on the way.
    `should_stop()` is asked every 1,000 lines (a huge text is read interruptibly)."""
    index = LineIndex(source)
    lines = 0
    tokens: list[Token] = []
    errors: list[QueryError] = []
    i, n = 0, len(source)
    space = True

    def add(kind, start, end, value=None):
        nonlocal space
        tokens.append(Token(kind, source[start:end], value, start, end, index.span(start, end), space))
        space = False

    while i < n:
        ch = source[i]
        if ch == "\n":
            add("NEWLINE", i, i + 1)
            space = True
            i += 1
            lines += 1
            if should_stop is not None and lines % 1000 == 0 and should_stop():
                from mlxterp.errors import Interrupted

                raise Interrupted(f"stopped while reading the text (line {lines:,})")
        elif ch.isspace():
            space = True
            i += 1
        elif ch == "#":
            while i < n and source[i] != "\n":
                i += 1
            space = True
        elif ch == "\\" and _continues(source, i):
            # line continuation: skip to after the newline, which then ends no statement
            i = source.find("\n", i)
            i = n if i < 0 else i + 1
            space = True
        elif ch == '"':
            i = _read_string(source, i, index, add, errors)
        elif _is_digit(ch):
            start = i
            while i < n and _is_digit(source[i]):
                i += 1
            after_dot = bool(tokens) and tokens[-1].kind == "DOT" and tokens[-1].end == start
            is_float = False
            # `layers.0.5` is a path; `0..5` a range; `0.5` a number.
            if not after_dot and source[i : i + 1] == "." and _is_digit(source[i + 1 : i + 2]):
                is_float = True
                i += 1
                while i < n and _is_digit(source[i]):
                    i += 1
            if not after_dot and source[i : i + 1] in ("e", "E"):
                j = i + 1
                if source[j : j + 1] in ("+", "-"):
                    j += 1
                if _is_digit(source[j : j + 1]):
                    is_float = True
                    i = j
                    while i < n and _is_digit(source[i]):
                        i += 1
            text = source[start:i]
            if len(text) > 40:
                errors.append(QueryError("number too long (more than 40 characters)", index.span(start, i)))
                add("NUMBER", start, i, 0)
            else:
                add("NUMBER", start, i, float(text) if is_float else int(text))
        elif ch == "$":
            start = i
            i += 1
            while i < n and _is_name_char(source[i]):
                i += 1
            add("VAR", start, i, source[start + 1 : i])
        elif _is_name_start(ch):
            start = i
            while i < n and _is_name_char(source[i]):
                i += 1
            add("NAME", start, i, source[start:i])
        elif source.startswith("..", i):
            add("DOTDOT", i, i + 2)
            i += 2
        elif ch in PUNCTUATION:
            add(PUNCTUATION[ch], i, i + 1)
            i += 1
        else:
            add("OTHER", i, i + 1)
            i += 1
    end = index.span(n, n)
    tokens.append(Token("EOF", "", None, n, n, end, True))
    return tokens, errors


def _read_string(source, i, index, add, errors) -> int:
    """Read a double-quoted string starting at `i`; return the offset after it."""
    start, n = i, len(source)
    i += 1
    chars = []
    while i < n and source[i] not in ('"', "\n"):
        if source[i] == "\\" and i + 1 < n and source[i + 1] != "\n":
            code = source[i + 1]
            if code in ESCAPES:
                chars.append(ESCAPES[code])
                i += 2
                continue
            digits = source[i + 2 : i + 6]
            if code == "u" and len(digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in digits):
                value = int(digits, 16)
                if 0xD800 <= value <= 0xDFFF:
                    errors.append(QueryError(f"\\u{digits} is a surrogate, not a character", index.span(i, i + 6)))
                else:
                    chars.append(chr(value))
                i += 6
                continue
            errors.append(
                QueryError(
                    f"unknown escape \\{code} in a string",
                    index.span(i, i + 2),
                    ['\\"', "\\\\", "\\n", "\\t", "\\r", "\\0", "\\uXXXX"],
                )
            )
            chars.append(code)
            i += 2
            continue
        chars.append(source[i])
        i += 1
    if i < n and source[i] == '"':
        add("STRING", start, i + 1, "".join(chars))
        return i + 1
    errors.append(QueryError('unterminated string: add the closing "', index.span(start, i)))
    add("STRING", start, i, "".join(chars))
    return i
