"""Results of the tuned lens and sparse autoencoders (``mlxterp.tuned_lens``, ``mlxterp.sae``).

Plain data like every ``mlxterp.results`` result (``to_data`` / ``from_data``, ``__rich__``,
``_repr_html_``, ``summary``); this module imports no mlx, so a client can draw them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .results import Result, number


# -- the base ------------------------------------------------------------------------------

@dataclass(eq=False)
class FieldResult(Result):
    """Base of this area's results: its dataclass fields are its data; ``columns`` and ``rows()`` its table.

    A subclass sets ``kind`` and ``columns`` and defines ``rows()`` and ``short()``.
    """

    columns = ("",)

    def rows(self) -> list:
        return []

    def data(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "notes"}

    @classmethod
    def from_data(cls, data: dict):
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def body(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        # the heading as a line of its own: a table's title wraps at the (often narrow) table's width
        table = Table(*self.columns)
        for row in self.rows():
            table.add_row(*(number(c) if isinstance(c, float) else str(c) for c in row))
        return Group(Text(self.short(), style="italic"), table)

    def table(self):
        return self.short(), list(self.columns), [list(r) for r in self.rows()]


# -- tuned lens -------------------------------------------------------------------------

@dataclass(eq=False)
class LensComparison(FieldResult):
    """Mean KL divergence (nats) to the model's final distribution, per layer, for the logit and tuned lens."""

    layers: List[int]
    logit_lens_kl: List[float]
    tuned_lens_kl: List[float]
    n_tokens: int = 0

    kind = "lens_comparison"

    def short(self) -> str:
        better = sum(t < l for t, l in zip(self.tuned_lens_kl[:-1], self.logit_lens_kl[:-1]))
        return (f"tuned lens KL below the logit lens at {better} of {len(self.layers) - 1} layers before the last "
                f"({self.n_tokens} tokens; mean {np.mean(self.logit_lens_kl):.3f} -> "
                f"{np.mean(self.tuned_lens_kl):.3f} nats)")

    def rows(self):
        return [(layer, f"{a:.4f}", f"{b:.4f}")
                for layer, a, b in zip(self.layers, self.logit_lens_kl, self.tuned_lens_kl)]

    columns = ("layer", "logit lens KL", "tuned lens KL")

    def draw(self, save_path: Optional[str] = None) -> str:
        """A PNG of both curves against the layer (log scale); returns its path."""
        from .plots import _figure, _output_path

        fig = _figure((7, 4))
        ax = fig.add_subplot()
        ax.plot(self.layers, self.logit_lens_kl, "o-", label="logit lens")
        ax.plot(self.layers, self.tuned_lens_kl, "o-", label="tuned lens")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("layer")
        ax.set_ylabel("KL to the final distribution (nats)")
        ax.set_title(f"Logit lens vs tuned lens ({self.n_tokens} held-out tokens)")
        ax.legend()
        ax.grid(alpha=0.3)
        path = _output_path(save_path, "tuned-lens-kl")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        return path


# -- sparse autoencoders ----------------------------------------------------------------

@dataclass(eq=False)
class SAEMetrics(FieldResult):
    """How well an SAE reconstructs its module: on collected activations and spliced into the model.

    ``explained_variance``: ``1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2``.
    ``l0``: mean number of active features per token. ``dead_features``: features that
    never fired on these tokens. ``loss_recovered``: ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``,
    next-token cross-entropy with the module's output zeroed, replaced by the SAE's
    reconstruction, and untouched (1 = the SAE loses nothing the model uses).
    """

    explained_variance: float
    l0: float
    dead_features: int
    n_features: int
    n_tokens: int
    ce_clean: Optional[float] = None
    ce_sae: Optional[float] = None
    ce_zero: Optional[float] = None
    loss_recovered: Optional[float] = None

    kind = "sae_metrics"
    columns = ("metric", "value")

    def rows(self):
        rows = [("explained variance", f"{self.explained_variance:.4f}"), ("L0", f"{self.l0:.2f}"),
                ("dead features", f"{self.dead_features} of {self.n_features}"), ("tokens", self.n_tokens)]
        if self.loss_recovered is not None:
            rows += [("cross-entropy clean / SAE / zeroed",
                      f"{self.ce_clean:.4f} / {self.ce_sae:.4f} / {self.ce_zero:.4f}"),
                     ("loss recovered", f"{self.loss_recovered:.4f}")]
        return rows

    def short(self) -> str:
        text = (f"explained variance {self.explained_variance:.3f}, L0 {self.l0:.1f}, "
                f"{self.dead_features}/{self.n_features} dead")
        if self.loss_recovered is not None:
            text += f", loss recovered {self.loss_recovered:.3f}"
        return text


@dataclass
class FeatureExample:
    """One token where a feature fired: its activation, where it is, and the tokens around it."""

    activation: float
    prompt: int
    position: int
    before: List[str]
    token: str
    after: List[str]

    def text(self) -> str:
        return "".join(self.before) + f"[[{self.token}]]" + "".join(self.after)


@dataclass(eq=False)
class FeatureExamples(FieldResult):
    """The top-activating tokens of each feature (``examples[feature]``, strongest first)."""

    module: str
    examples: Dict[int, List[FeatureExample]]
    n_tokens: int = 0

    kind = "feature_examples"
    columns = ("feature", "activation", "context")

    def rows(self):
        return [(feature, f"{ex.activation:.3f}", ex.text())
                for feature, items in self.examples.items() for ex in items]

    def short(self) -> str:
        return f"top-activating tokens of {len(self.examples)} features of {self.module} over {self.n_tokens} tokens"

    def data(self) -> dict:
        return {"module": self.module, "n_tokens": self.n_tokens,
                "examples": {str(f): [vars(ex) for ex in items] for f, items in self.examples.items()}}

    @classmethod
    def from_data(cls, data: dict) -> "FeatureExamples":
        examples = {int(f): [FeatureExample(**ex) for ex in items] for f, items in data["examples"].items()}
        return cls(data["module"], examples, data.get("n_tokens", 0), notes=list(data.get("notes") or []))


@dataclass(eq=False)
class ActiveFeatures(FieldResult):
    """The most active features of ``module`` at one position of a prompt."""

    module: str
    position: int
    token: str
    features: List[int]
    activations: List[float]

    kind = "active_features"
    columns = ("feature", "activation")

    def rows(self):
        return [(f, f"{a:.3f}") for f, a in zip(self.features, self.activations)]

    def short(self) -> str:
        return f"top {len(self.features)} features of {self.module} at position {self.position} ({self.token!r})"
