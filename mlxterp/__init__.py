"""mlxterp: mechanistic interpretability for MLX models."""

from .errors import InputError, Interrupted, LayerIndexError, MlxterpError, TraceError, UnknownModuleError
from .model import InterpretableModel

__version__ = "0.1.0"

__all__ = [
    "InterpretableModel", "MlxterpError", "UnknownModuleError", "LayerIndexError", "TraceError",
    "InputError", "Interrupted", "get_activations", "batch_get_activations", "interventions", "__version__",
]


def __getattr__(name):
    # analysis and interventions load on first use, so `import mlxterp` stays light
    import importlib

    if name in ("get_activations", "batch_get_activations"):
        return getattr(importlib.import_module(".analysis", __name__), name)
    if name == "interventions":
        return importlib.import_module(".interventions", __name__)
    raise AttributeError(f"module 'mlxterp' has no attribute {name!r}")
