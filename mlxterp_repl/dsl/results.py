"""The query language's results are the library's own (`mlxterp.results`).

A statement returns the object its library call returns (`lens` a `LogitLens`, `patch` an
`ActivationPatching`, `predict` a `TokenPredictions`, `stats` an `ActivationStats`), or one
of the library's generic results (`TextResult`, `TableResult`, `ValuesResult` for `save` and
`let`). They draw themselves (`render()`), turn into plain data (`to_data()`) and back
(`result_from_data`); this module only names them for the query language's users.
"""

from mlxterp.results import (  # noqa: F401  (re-exported)
    ActivationPatching,
    ActivationStats,
    LogitLens,
    Result,
    TableResult,
    TextResult,
    TokenPredictions,
    ValuesResult,
    result_from_data,
    token_label,
)
