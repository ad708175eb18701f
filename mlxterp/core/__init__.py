"""mlxterp's pure-Python core: the rules every part of mlxterp shares, with no MLX or numpy.

`paths` owns module-path grammar, layer segments and the name resolver over a plain name
table; `positions` owns position selection and token-text matching. The library, the query
language, completion, hover and the language server all call these, so they cannot disagree.
"""

from mlxterp.core.paths import LayerSelection, NameTable, parse_layers, split_path
from mlxterp.core.positions import ALL, match_token, select_positions

__all__ = ["ALL", "LayerSelection", "NameTable", "match_token", "parse_layers", "select_positions", "split_path"]
