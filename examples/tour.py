"""A first look at a model: what `make demo` prints.

Loads the bundled demo model and shows, as tables: the token breakdown of a prompt, the
summary of one saved activation, the logit lens at the last position layer by layer, and an
activation-patching sweep over the MLPs.

Run it with another model: python examples/tour.py mlx-community/Llama-3.2-1B-Instruct
"""

import sys

import mlx.core as mx
from rich.console import Console
from rich.table import Table

from mlxterp import InterpretableModel

console = Console()


def token_table(model, text):
    console.print(f"\n[bold]Tokens[/] of {text!r}")
    table = Table()
    table.add_column("position", justify="right")
    table.add_column("id", justify="right")
    table.add_column("token")
    for position, token_id in enumerate(model.encode(text)):
        table.add_row(str(position), str(token_id), repr(model.token_to_str(token_id)))
    return table


def position_of(model, ids, word):
    """Position of the last token of the first occurrence of `word` in the prompt."""
    pieces = [model.token_to_str(token_id) for token_id in ids]
    text = "".join(pieces)
    start = text.find(word)
    if start < 0:
        raise SystemExit(f"{word!r} is not in the prompt's tokens: {pieces}")
    end = start + len(word)
    covered = 0
    for position, piece in enumerate(pieces):
        covered += len(piece)
        if covered >= end:
            return position
    return len(pieces) - 1


def activation_table(model, text, layer, word):
    ids = model.encode(text)
    position = position_of(model, ids, word)
    with model.trace(text):
        hidden = model.layers[layer].output.save()
    vector = hidden[0, position].astype(mx.float32)
    console.print(f"\n[bold]Saved activation[/]: layers.{layer} output at {word!r} (position {position}) of {text!r}")
    table = Table()
    for column in ("layer output", "at the token", "norm", "mean", "std"):
        table.add_column(column, justify="right")
    table.add_row(
        str(tuple(hidden.shape)),
        str(tuple(vector.shape)),
        f"{mx.linalg.norm(vector).item():.3f}",
        f"{mx.mean(vector).item():.4f}",
        f"{mx.std(vector).item():.4f}",
    )
    return table


def logit_lens_table(model, text):
    lens = model.logit_lens(text, top_k=1, position=-1)
    console.print(f"\n[bold]Logit lens[/]: top-1 prediction after {text!r}, by layer")
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("prediction")
    table.add_column("score", justify="right")
    for layer, predictions in lens.items():
        _token_id, score, token_text = predictions[0]
        table.add_row(str(layer), repr(token_text), f"{score:.3f}")
    return table


def patching_table(model, clean, corrupted, component="mlp"):
    recovery = model.activation_patching(clean, corrupted, component=component)
    console.print(f"\n[bold]Activation patching[/] of {component}: clean {clean!r}, corrupted {corrupted!r}")
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("recovery %", justify="right")
    table.add_column("")
    for layer, percent in recovery.items():
        bar = "█" * max(0, min(40, round(percent / 2.5)))
        table.add_row(str(layer), f"{percent:.1f}", bar)
    return table


def main(model_name="demo"):
    model = InterpretableModel(model_name)
    console.print(f"[bold]{model_name}[/]: {model.n_layers} layers, hidden size {model.hidden_size}, "
                  f"vocabulary {model.vocab_size}")
    console.print(token_table(model, "The capital of France is Paris"))
    console.print(activation_table(model, "The capital of France is", layer=8, word=" France"))
    console.print(logit_lens_table(model, "The capital of France is"))
    console.print(patching_table(model, "Paris is the capital of France", "London is the capital of France"))


if __name__ == "__main__":
    main(*sys.argv[1:2])
