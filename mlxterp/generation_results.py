"""The result of ``mlxterp.generate``: the prompt, the generated ids and text, what was captured.

Kept apart from the generation loop so that clients that only draw results (the REPL, the
language server, notebooks through the daemon) rebuild it without importing mlx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .results import Column, FitTable, Result, _common, as_numpy, prompt_label, shorten, token_label


@dataclass
class Step:
    """One generated token: its step number, id, text, and the activations captured at that step."""

    step: int
    token: int
    text: str
    activations: dict  # {short name: mx.array}


@dataclass(eq=False)
class Generation(Result):
    """What ``model.generate`` returns: the prompt, the generated tokens and the captures per step.

    ``text`` is the generated text (without the prompt); ``tokens`` the generated ids and
    ``token_texts`` each one's text; ``activations[name][step]`` the output of ``name``
    captured at that step (step 0: every prompt position; later steps: the one new token).
    """

    prompt: str
    tokens: list[int]
    token_texts: list[str]
    activations: dict = field(default_factory=dict)  # {short name: [np.ndarray per step]}
    intervened: list[str] = field(default_factory=list)  # short names of modules changed
    steps: Optional[list[int]] = None  # the steps interventions applied at (None: every step)
    temperature: float = 0.0
    interrupted: bool = False
    stopped: str = "length"  # why it ended: "length" (max_tokens), "eos" or "interrupted"
    kind = "generation"

    @property
    def text(self) -> str:
        return "".join(self.token_texts)

    def __str__(self) -> str:
        return self.text

    def stacked(self, name: str) -> np.ndarray:
        """The captures of ``name`` at every step joined along the token axis: ``(1, all tokens, ...)``."""
        if name not in self.activations:
            raise KeyError(f"{name!r} was not captured; captured: {', '.join(self.activations) or 'nothing'}")
        return np.concatenate([np.asarray(a) for a in self.activations[name]], axis=1)

    def data(self):
        return {"prompt": self.prompt, "tokens": list(self.tokens), "token_texts": list(self.token_texts),
                "activations": {k: [as_numpy(a) for a in v] for k, v in self.activations.items()},
                "intervened": list(self.intervened), "steps": self.steps, "temperature": self.temperature,
                "interrupted": self.interrupted, "stopped": self.stopped}

    @classmethod
    def from_data(cls, data):
        return cls(data["prompt"], [int(t) for t in data["tokens"]], list(data["token_texts"]),
                   activations={k: [np.asarray(a) for a in v] for k, v in (data.get("activations") or {}).items()},
                   intervened=list(data.get("intervened") or []), steps=data.get("steps"),
                   temperature=float(data.get("temperature") or 0.0), interrupted=bool(data.get("interrupted")),
                   stopped=str(data.get("stopped") or "length"), **_common(data))

    def body(self):
        from rich.console import Group
        from rich.text import Text

        head = Text(prompt_label(self.prompt, 60), style="dim") + Text(self.text, style="bold")
        parts = [head]
        what = f"{len(self.tokens)} tokens"
        if self.temperature:
            what += f", temperature {self.temperature:g}"
        if self.intervened:
            where = ", ".join(self.intervened)
            what += f", interventions on {where}" + (f" at steps {self.steps}" if self.steps is not None else "")
        what += {"eos": ", ended at the end-of-sequence token", "interrupted": ", interrupted"}.get(self.stopped, "")
        parts.append(Text(what, style="dim"))
        if self.activations:
            rows = [[name, str(len(arrays)), str(tuple(np.asarray(arrays[0]).shape)) if arrays else "",
                     str(tuple(np.asarray(arrays[-1]).shape)) if arrays else ""]
                    for name, arrays in self.activations.items()]
            parts.append(FitTable([Column("captured"), Column("steps", "right"), Column("step 0"),
                                   Column("last step", drop=1)], rows))
        return Group(*parts)

    def short(self):
        return shorten(f"generated {token_label(self.text)}" + (" (interrupted)" if self.interrupted else ""), 200)

    def table(self):
        rows = [[i, t, token_label(s)] for i, (t, s) in enumerate(zip(self.tokens, self.token_texts))]
        return f"{self.prompt}{self.text}", ["step", "id", "token"], rows
