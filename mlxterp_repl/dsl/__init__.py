"""The query language (`.mlxq`): parse, complete, evaluate.

`parse`, `complete` and `QueryError` need neither MLX nor a model, so the language server
imports them cheaply; `Session`, the results and the trace cache load MLX and are imported
on first use.
"""

from mlxterp_repl.dsl.complete import Completion, CompletionContext, complete
from mlxterp_repl.dsl.errors import ParseResult, QueryError, Span
from mlxterp_repl.dsl.parser import STATEMENTS, parse

__all__ = [
    "Completion",
    "CompletionContext",
    "ParseResult",
    "QueryError",
    "Result",
    "STATEMENTS",
    "Session",
    "Span",
    "TraceCache",
    "complete",
    "parse",
]


def __getattr__(name):
    if name in ("Session", "TraceCache"):
        from mlxterp_repl.dsl import evaluator

        return getattr(evaluator, name)
    if name == "Result":
        from mlxterp_repl.dsl import results

        return results.Result
    raise AttributeError(f"module 'mlxterp_repl.dsl' has no attribute {name!r}")
