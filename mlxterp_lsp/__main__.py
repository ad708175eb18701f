"""`python -m mlxterp_lsp`: the same as `mlxterp lsp`."""

import sys

from mlxterp_lsp.server import main

sys.exit(main(sys.argv[1:]))
