"""Front ends of mlxterp: the query language (dsl/), the daemon, its protocol and client, the REPL and the `mlxterp` command.

Kept import-light: importing this package must not import mlx, so `mlxterp --version` stays fast.
"""
