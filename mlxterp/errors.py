"""The library's errors, as users import them (`from mlxterp.errors import ...`).

Defined in `mlxterp.core.errors` (stdlib only), where the resolver and position rules raise them.
"""

from mlxterp.core.errors import (  # noqa: F401
    InputError,
    Interrupted,
    LayerIndexError,
    MlxterpError,
    PositionError,
    TraceError,
    UnknownModuleError,
)
