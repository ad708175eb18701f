"""Spans and the query language's one error type.

Every error the language reports -- from the lexer, the parser or the evaluator -- is a
`QueryError` carrying the span of the text it is about and what would be valid there.
`render(source)` draws it for a terminal: line and column, the line itself, the span
underlined, then the suggestions.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A stretch of source text: 1-based line and column, the end is exclusive."""

    line: int
    col: int
    end_line: int
    end_col: int

    def to(self, other: "Span") -> "Span":
        """The span from the start of this one to the end of `other`."""
        return Span(self.line, self.col, other.end_line, other.end_col)

    def to_data(self) -> dict:
        return {"line": self.line, "col": self.col, "end_line": self.end_line, "end_col": self.end_col}


class QueryError(Exception):
    """An error in a query, pinned to the span of text it is about."""

    def __init__(self, message: str, span: Span, suggestions: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.suggestions = list(suggestions or [])

    def __str__(self) -> str:
        return f"line {self.span.line}, column {self.span.col}: {self.message}"

    def render(self, source: str) -> str:
        """The error as a terminal shows it: position, the line, ^^^ under the span, suggestions."""
        lines = source.split("\n")
        out = [f"line {self.span.line}, column {self.span.col}: {self.message}"]
        if 1 <= self.span.line <= len(lines):
            text = lines[self.span.line - 1].replace("\t", " ")
            number = str(self.span.line)
            start = max(self.span.col - 1, 0)
            end = self.span.end_col - 1 if self.span.end_line == self.span.line else len(text)
            width = max(end - start, 1)
            out.append(f"  {number} | {text}")
            out.append(f"  {' ' * len(number)} | {' ' * start}{'^' * width}")
        if self.suggestions:
            out.append("  valid here: " + ", ".join(self.suggestions))
        return "\n".join(out)

    def to_data(self) -> dict:
        return {"message": self.message, "span": self.span.to_data(), "suggestions": list(self.suggestions)}

    @classmethod
    def from_data(cls, data: dict) -> "QueryError":
        """The error of `to_data()`'s form (e.g. a daemon's `query_error` reply)."""
        return cls(data["message"], Span(**data["span"]), data.get("suggestions"))


def closest(word: str, candidates, n: int = 5) -> list[str]:
    """The candidates closest to a misspelt word, best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


@dataclass
class ParseResult:
    """What `parse` returns: the statements it could read and the errors it met."""

    statements: list = field(default_factory=list)
    errors: list[QueryError] = field(default_factory=list)
