"""The `mlxterp` command: `--version` and the subcommand table.

Each subcommand lives in its own module and is imported only when it runs, so
`mlxterp --version` stays fast. A subcommand's function takes the rest of the command
line (a list of strings), parses it itself, and returns the exit code.

To add a subcommand, fill in its target ("module:function") in COMMANDS below.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib import metadata

from mlxterp_repl import blas

# name, what it does (shown in `mlxterp --help`), "module:function" or None while not written
COMMANDS = [
    ("run", "run a .mlxq script and print its results", "mlxterp_repl.runner:main"),
    ("serve", "start the daemon that holds a model in memory", "mlxterp_repl.daemon:serve_main"),
    ("status", "show whether the daemon runs, its model and clients", "mlxterp_repl.commands:status_main"),
    ("stop", "stop the daemon", "mlxterp_repl.commands:stop_main"),
    ("repl", "interactive prompt connected to the daemon", "mlxterp_repl.repl:main"),
    ("lsp", "language server for editors (stdio)", "mlxterp_lsp.server:main"),
    ("collect", "save activations of many prompts to files", "mlxterp_repl.collect:main"),
]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_text() -> str:
    return "\n".join(
        [
            f"mlxterp {_version('mlxterp')}",
            f"mlx {_version('mlx')}, mlx-lm {_version('mlx-lm')}, "
            f"Python {platform.python_version()} ({sys.platform}, {platform.machine()})",
            f"BLAS: {blas.blas_in_use()}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxterp",
        description="Mechanistic interpretability for MLX models.",
        epilog=f"Set {blas.OPT_OUT_VAR}=1 to keep MLX's bundled BLAS instead of the system's OpenBLAS.",
    )
    parser.add_argument("--version", action="store_true", help="show versions and the BLAS in use, then exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary, _target in COMMANDS:
        # Each command parses its own arguments (including --help), so nothing is consumed here.
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def run_command(name: str, args: list[str]) -> int:
    target = next(target for command, _summary, target in COMMANDS if command == name)
    if target is None:
        print(f"mlxterp {name}: not available yet in this version of mlxterp.", file=sys.stderr)
        return 2
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(args) or 0)


# Commands that run MLX in this process; the others (repl, lsp, status, stop) are clients
# of the daemon, which gets OpenBLAS in its own environment, so they skip the re-exec.
RUNS_MLX = {"run", "serve", "collect", None}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        command = next((a for a in argv if not a.startswith("-")), None)
        if command in RUNS_MLX:
            blas.reexec_with_openblas()
    parser = build_parser()
    options, rest = parser.parse_known_args(argv)
    if options.version:
        print(version_text())
        return 0
    if options.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help(sys.stderr)
        return 2
    return run_command(options.command, rest)


if __name__ == "__main__":
    sys.exit(main())
