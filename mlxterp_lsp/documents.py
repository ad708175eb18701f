"""Per-document state of the language server: the text cut into statements, parsed.

A `.mlxq` file is one statement per logical line (a line ending in `\\` continues on
the next), so each logical line is parsed on its own and the parse is cached by its
text: typing on one line of a 1,000-line file re-parses that line only. Spans coming
out of `parse` are relative to their chunk; `Chunk.line0` turns them into document
lines. Positions here are 0-based lines and code-point columns; conversion to the
client's units (UTF-16 by default) happens in `to_client` / `from_client`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields, is_dataclass
from functools import lru_cache

from mlxterp_repl.dsl import ast
from mlxterp_repl.dsl.errors import ParseResult, Span
from mlxterp_repl.dsl.lexer import tokenize
from mlxterp_repl.dsl.parser import parse


@lru_cache(maxsize=8192)
def parse_chunk(text: str) -> ParseResult:
    return parse(text)


@lru_cache(maxsize=8192)
def lex_chunk(text: str):
    return tokenize(text)[0]


@dataclass
class Chunk:
    """One logical line: where it starts in the document, its text, its parse."""

    line0: int  # 0-based document line of the chunk's first line
    text: str

    @property
    def parsed(self) -> ParseResult:
        return parse_chunk(self.text)

    @property
    def n_lines(self) -> int:
        return self.text.count("\n") + 1

    def doc_range(self, span: Span) -> tuple[int, int, int, int]:
        """A chunk-relative span as 0-based (line, col, end_line, end_col) of the document."""
        return (self.line0 + span.line - 1, span.col - 1, self.line0 + span.end_line - 1, span.end_col - 1)


@dataclass
class Located:
    """A statement with the chunk it came from (for document positions)."""

    statement: ast.Statement
    chunk: Chunk

    def range(self, node=None) -> tuple[int, int, int, int]:
        return self.chunk.doc_range((node or self.statement).span)

    @property
    def last_line(self) -> int:
        return self.chunk.line0 + self.statement.span.end_line - 1


def continues(line: str) -> bool:
    """Whether a physical line ends in a continuation backslash, as the lexer reads it."""
    in_string = False
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if in_string:
            if ch == "\\" and i + 1 < n:
                i += 2
                continue
            if ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "#":
            return False
        elif ch == "\\" and line[i + 1 :].strip(" \t\r") == "":
            return True
        i += 1
    return False


def split_chunks(lines: list[str]) -> list[Chunk]:
    chunks, start = [], 0
    while start < len(lines):
        end = start
        while end < len(lines) - 1 and continues(lines[end]):
            end += 1
        chunks.append(Chunk(start, "\n".join(lines[start : end + 1])))
        start = end + 1
    return chunks


class Document:
    """One open `.mlxq` document: its lines, chunks, statements and parse errors."""

    def __init__(self, uri: str, text: str, version: int | None = None):
        self.uri = uri
        self.version = version
        self.set_text(text)

    def set_text(self, text: str) -> None:
        self.text = text
        self.lines = text.split("\n")
        self.chunks = split_chunks(self.lines)
        self.chunk_of_line = [0] * len(self.lines)
        for index, chunk in enumerate(self.chunks):
            for k in range(chunk.n_lines):
                self.chunk_of_line[chunk.line0 + k] = index
        self.statements = [Located(s, c) for c in self.chunks for s in c.parsed.statements]
        self.errors = [(e, c) for c in self.chunks for e in c.parsed.errors]
        self.by_chunk = {}
        for located in self.statements:
            self.by_chunk.setdefault(id(located.chunk), located)
        self.prompts = [s for s in self.statements if isinstance(s.statement, ast.Prompt)]
        self.prompt_lines = [s.last_line for s in self.prompts]

    # --- lookups -----------------------------------------------------------

    def chunk_at(self, line: int) -> Chunk | None:
        if 0 <= line < len(self.chunk_of_line):
            return self.chunks[self.chunk_of_line[line]]
        return None

    def statement_at(self, line: int) -> Located | None:
        chunk = self.chunk_at(line)
        return None if chunk is None else self.by_chunk.get(id(chunk))

    def chunk_offset(self, chunk: Chunk, line: int, col: int) -> int:
        """Offset into `chunk.text` of a document position inside it."""
        offset = 0
        for k in range(line - chunk.line0):
            offset += len(self.lines[chunk.line0 + k]) + 1
        return offset + min(col, len(self.lines[line]) if 0 <= line < len(self.lines) else 0)

    def prompt_before(self, line: int) -> Located | None:
        """The last `prompt` statement that ends before `line` (the prompt a query there sees)."""
        index = bisect.bisect_left(self.prompt_lines, line)
        return self.prompts[index - 1] if index else None

    def definitions(self) -> dict[str, list[Located]]:
        """`$name` -> the statements defining it (`save ... as $x`, `let $x = ...`), in order."""
        found: dict[str, list[Located]] = {}
        for located in self.statements:
            var = defined_var(located.statement)
            if var is not None:
                found.setdefault(var.name, []).append(located)
        return found

    def variables_before(self, line: int) -> list[str]:
        names = []
        for located in self.statements:
            if located.chunk.line0 >= line:
                break
            var = defined_var(located.statement)
            if var is not None and var.name not in names:
                names.append(var.name)
        return names


def defined_var(statement) -> ast.Var | None:
    if isinstance(statement, ast.Let):
        return statement.name
    if isinstance(statement, ast.Save):
        return statement.name
    if isinstance(statement, ast.With):
        return defined_var(statement.body)
    return None


def walk(node):
    """Every AST node under `node` (itself included), depth first."""
    yield node
    if not is_dataclass(node):
        return
    for f in fields(node):
        value = getattr(node, f.name)
        if isinstance(value, ast.Node):
            yield from walk(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, ast.Node):
                    yield from walk(item)


# --- client position units -----------------------------------------------------

def to_client(line_text: str, col: int, utf16: bool) -> int:
    """A code-point column as the client counts it."""
    col = max(0, min(col, len(line_text)))
    if not utf16 or line_text.isascii():
        return col
    return len(line_text[:col].encode("utf-16-le")) // 2


def from_client(line_text: str, character: int, utf16: bool) -> int:
    """The client's column as a code-point column."""
    if not utf16 or line_text.isascii():
        return max(0, min(character, len(line_text)))
    units = 0
    for index, ch in enumerate(line_text):
        if units >= character:
            return index
        units += 2 if ord(ch) > 0xFFFF else 1
    return len(line_text)
