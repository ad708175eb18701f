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


MLX_MISSING = ("MLX cannot be loaded ({error}). On Linux MLX comes with one backend, picked when installing: "
               "pip install \"mlxterp[cpu]\", \"mlxterp[cuda]\" (CUDA 12) or \"mlxterp[cuda13]\"; "
               "on macOS: pip install mlxterp")


def _load(module: str):
    import importlib

    try:
        return importlib.import_module(module, __name__)
    except ImportError as error:
        # No MLX at all (a Linux install without a backend extra), or MLX's Python part without its library.
        missing = getattr(error, "name", None) or ""
        if missing == "mlx" or missing.startswith("mlx.") or "libmlx" in str(error):
            raise ImportError(MLX_MISSING.format(error=error)) from error
        raise


def __getattr__(name):
    if name == "InterpretableModel":
        return _load(".model").InterpretableModel
    if name in ("get_activations", "batch_get_activations"):
        return getattr(_load(".analysis"), name)
    if name == "interventions":
        return _load(".interventions")
    raise AttributeError(f"module 'mlxterp' has no attribute {name!r}")
