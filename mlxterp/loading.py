"""Loading models: the bundled demo model, local mlx-lm directories and hub ids."""

from __future__ import annotations

from pathlib import Path

from .errors import MlxterpError

DEMO_PATH = Path(__file__).parent / "assets" / "demo"


def demo_path() -> Path:
    """Directory of the bundled demo model (a 16-layer Llama that knows capitals)."""
    if not (DEMO_PATH / "config.json").exists():
        raise MlxterpError(
            f"the demo model is missing from {DEMO_PATH}; "
            "train it with: python scripts/train_demo_model.py"
        )
    return DEMO_PATH


def load(source: str):
    """(model, tokenizer, description) for "demo", a local mlx-lm directory or a hub id."""
    from mlx_lm import load as mlx_lm_load

    if source == "demo":
        path = demo_path()
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser()
        if not (path / "config.json").exists():
            raise MlxterpError(f"{path} is not an mlx-lm model directory: it has no config.json")
    elif Path(source).expanduser().exists():
        raise MlxterpError(f"{source} is a file; give a model directory (config.json, *.safetensors, tokenizer files)")
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        path = source  # a hub id: mlx_lm downloads it (needs a network)
    else:
        raise MlxterpError(
            f"cannot load {source!r}: give 'demo', a local mlx-lm directory, or a hub id like "
            "'mlx-community/Llama-3.2-1B-Instruct'"
        )
    try:
        model, tokenizer = mlx_lm_load(str(path))
    except MlxterpError:
        raise
    except Exception as exc:  # mlx_lm raises many kinds; say which model failed and why
        raise MlxterpError(f"could not load model {source!r}: {type(exc).__name__}: {exc}") from exc
    return model, tokenizer, str(source)
