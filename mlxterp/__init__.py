"""mlxterp: mechanistic interpretability for MLX models.

Loading is lazy (PEP 562): `import mlxterp.core` or `mlxterp.errors` never imports MLX;
`from mlxterp import InterpretableModel` loads the library on first use.
"""

from .errors import (InputError, Interrupted, LayerIndexError, MlxterpError, PositionError, TraceError,
                     UnknownModuleError)

__version__ = "0.1.0"

__all__ = [
    "InterpretableModel", "MlxterpError", "UnknownModuleError", "LayerIndexError", "PositionError", "TraceError",
    "InputError", "Interrupted", "get_activations", "batch_get_activations", "interventions", "__version__",
]


def load_ipython_extension(ipython):
    """`%load_ext mlxterp` in IPython or Jupyter: the `%mlxq` / `%%mlxq` magics (docs/notebooks.md).

    The library does not import its front ends: the magics are found through the
    `mlxterp.ipython` entry point, which the package declares for `mlxterp_repl.notebook`."""
    from importlib.metadata import entry_points

    loaders = list(entry_points(group="mlxterp.ipython"))
    if not loaders:
        raise ImportError("the mlxterp notebook magics are not installed (no 'mlxterp.ipython' entry point); "
                          "reinstall mlxterp: pip install -e .")
    for loader in loaders:
        loader.load()(ipython)


def __getattr__(name):
    import importlib

    if name == "InterpretableModel":
        return importlib.import_module(".model", __name__).InterpretableModel
    if name in ("get_activations", "batch_get_activations"):
        return getattr(importlib.import_module(".analysis", __name__), name)
    if name == "interventions":
        return importlib.import_module(".interventions", __name__)
    raise AttributeError(f"module 'mlxterp' has no attribute {name!r}")
