"""Plots of analysis results, drawn with matplotlib into PNG files.

matplotlib is imported only when a plot is asked for, and only its object
API (``matplotlib.figure.Figure`` with the Agg canvas) is used: no window, no
global pyplot state, so plotting works on a headless machine and inside the
daemon. Each function returns the path of the PNG it wrote.
"""

import os
import tempfile
from typing import Dict, List, Optional


def _figure(figsize):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        from .errors import MlxterpError

        raise MlxterpError("plotting needs matplotlib: pip install matplotlib (or pip install 'mlxterp[viz]')") from None
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def _output_path(save_path: Optional[str], stem: str, suffix: str = ".png") -> str:
    """``save_path`` (its directory created), else a new private file in the user's cache."""
    if save_path is not None:
        path = os.fspath(save_path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return path
    # The user's cache, not a shared predictable place under /tmp (docs/security.md).
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(cache, "mlxterp", "plots")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f"{stem}-", suffix=suffix, dir=directory)
    os.close(handle)
    return path


def _save(figure, save_path: Optional[str], stem: str) -> str:
    """Lay out ``figure`` and write it as a PNG to ``save_path`` (or a new file named after ``stem``)."""
    figure.tight_layout()
    path = _output_path(save_path, stem)
    figure.savefig(path, dpi=100)
    return path


def _label(token: str) -> str:
    return repr(token)[1:-1] if token.strip() != token or not token else token


def plot_logit_lens(results: Dict[int, List[list]], input_tokens: List[str], max_display_tokens: int = 15,
                    figsize=(16, 10), cmap: str = "viridis", save_path: Optional[str] = None) -> str:
    """Heatmap of the top prediction per (layer, position); same colour = same predicted token.

    ``results`` is ``logit_lens``'s ``{layer: [[(id, score, str), ...] per position]}``;
    only the last ``max_display_tokens`` positions are drawn.
    """
    layers = sorted(results)
    n_positions = len(input_tokens)
    shown = list(range(max(0, n_positions - max_display_tokens), n_positions))
    top = [[results[layer][p][0] for p in shown] for layer in layers]
    palette = {}
    for row in top:
        for token_id, _, _ in row:
            palette.setdefault(token_id, len(palette))
    colours = [[palette[token_id] for token_id, _, _ in row] for row in top]

    figure = _figure(figsize)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(colours, aspect="auto", cmap=cmap, origin="lower", interpolation="nearest")
    for y, row in enumerate(top):
        for x, (_, _, token) in enumerate(row):
            axes.text(x, y, _label(token)[:12], ha="center", va="center", fontsize=8, color="white",
                      bbox=dict(boxstyle="round,pad=0.1", facecolor="black", alpha=0.35, linewidth=0))
    axes.set_xticks(range(len(shown)))
    axes.set_xticklabels([_label(input_tokens[p]) for p in shown], rotation=45, ha="right")
    axes.set_yticks(range(len(layers)))
    axes.set_yticklabels([f"Layer {layer}" for layer in layers])
    axes.set_xlabel("Input token (prediction after seeing up to it)")
    axes.set_ylabel("Layer")
    axes.set_title("Logit lens: top prediction per layer and position")
    return _save(figure, save_path, "logit-lens")


def plot_patching(results: Dict[int, object], title: str = "Activation patching",
                  position_labels=None, save_path: Optional[str] = None) -> str:
    """Bar chart of recovery % per layer, or a layer x position heatmap for per-position results.

    ``position_labels``: the token text of each position (a list indexed by position, or
    ``{position: text}``)."""
    layers = sorted(results)
    by_position = layers and isinstance(results[layers[0]], dict)
    figure = _figure((12, 6))
    axes = figure.add_subplot(1, 1, 1)
    if by_position:
        positions = sorted(results[layers[0]])
        grid = [[results[layer][p] for p in positions] for layer in layers]
        image = axes.imshow(grid, aspect="auto", cmap="RdBu", origin="lower", vmin=-100, vmax=100)
        figure.colorbar(image, ax=axes, label="recovery %")
        axes.set_xticks(range(len(positions)))
        labels = [_label(position_labels[p]) if position_labels else str(p) for p in positions]
        axes.set_xticklabels(labels, rotation=45, ha="right")
        axes.set_yticks(range(len(layers)))
        axes.set_yticklabels([str(layer) for layer in layers])
        axes.set_xlabel("Position")
        axes.set_ylabel("Layer")
    else:
        values = [results[layer] for layer in layers]
        axes.bar(range(len(layers)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
        axes.axhline(0, color="black", linewidth=0.8)
        axes.set_xticks(range(len(layers)))
        axes.set_xticklabels([str(layer) for layer in layers])
        axes.set_xlabel("Layer")
        axes.set_ylabel("Recovery %")
    axes.set_title(title)
    return _save(figure, save_path, "patching")


def plot_head_grid(values, layers: List[int], title: str, label: str, save_path: Optional[str] = None,
                   stem: str = "heads", limit: Optional[float] = None) -> str:
    """Heatmap of one value per (layer, head), e.g. direct logit attribution or head patching."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    bound = limit if limit is not None else float(np.nanmax(np.abs(values))) if values.size else 1.0
    figure = _figure((max(6, values.shape[1] * 0.5 + 3), max(4, len(layers) * 0.35 + 2)))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(values, aspect="auto", cmap="RdBu", origin="lower", vmin=-bound, vmax=bound,
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, label=label)
    axes.set_xticks(range(values.shape[1]))
    axes.set_xlabel("Head")
    axes.set_yticks(range(len(layers)))
    axes.set_yticklabels([str(layer) for layer in layers])
    axes.set_ylabel("Layer")
    axes.set_title(title)
    return _save(figure, save_path, stem)


def plot_head_attention(patterns, heads: List[int], layer: int, tokens: List[str],
                        save_path: Optional[str] = None) -> str:
    """One query x key heatmap of attention probabilities per head of ``layer``."""
    import math

    count = len(heads)
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    side = max(3.0, min(8.0, len(tokens) * 0.3 + 2)) if tokens else 4.0
    figure = _figure((side * columns, side * rows))
    labels = [_label(t) for t in tokens]
    for index, head in enumerate(heads):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(patterns[index], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        axes.set_title(f"Layer {layer} head {head}")
        if labels and len(labels) <= 40:
            axes.set_xticks(range(len(labels)))
            axes.set_xticklabels(labels, rotation=90, fontsize=7)
            axes.set_yticks(range(len(labels)))
            axes.set_yticklabels(labels, fontsize=7)
        axes.set_xlabel("Key")
        axes.set_ylabel("Query")
    return _save(figure, save_path, "head-attention")
