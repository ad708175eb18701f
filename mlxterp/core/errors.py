"""The library's errors: each one says what was wrong and what would be valid.

They live in the core (stdlib only) because the core's resolver and position rules raise them;
`mlxterp.errors` re-exports them for library users."""

from __future__ import annotations


class MlxterpError(Exception):
    """Base of every error mlxterp raises on purpose."""


class UnknownModuleError(MlxterpError, LookupError):
    """A module name that resolves to nothing; carries the closest valid names."""

    def __init__(self, name: str, suggestions: list[str], detail: str = ""):
        self.name = name
        self.suggestions = list(suggestions)
        message = f"no module named {name!r}"
        if detail:
            message += f" ({detail})"
        if self.suggestions:
            message += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would otherwise quote the message
        return self.args[0]


class LayerIndexError(MlxterpError, IndexError):
    """A layer index outside the model's layers."""

    def __init__(self, index: int, n_layers: int):
        self.index = index
        self.n_layers = n_layers
        super().__init__(
            f"layer {index} is out of range: the model has {n_layers} layers "
            f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end)"
        )


class PositionError(MlxterpError, IndexError):
    """A position that names no token of the prompt; carries the valid positions and close tokens."""

    def __init__(self, message: str, valid: list[str] | None = None, suggestions: list[str] | None = None):
        self.valid = list(valid or [])
        self.suggestions = list(suggestions or [])
        super().__init__(message)


class TraceError(MlxterpError):
    """Misuse of a trace: saving outside one, reading what was not captured."""


class InputError(MlxterpError, ValueError):
    """Inputs a model cannot take: unknown token ids, wrong shapes or types."""


class Interrupted(MlxterpError):
    """A trace stopped early because its `should_stop` callback said so."""
