"""The language server for `.mlxq` query files: `mlxterp lsp` (see docs/lsp.md).

Importing this package is cheap and never imports mlx; the server itself is in
`mlxterp_lsp.server`.
"""

__version__ = "0.1.0"
