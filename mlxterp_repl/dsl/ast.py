"""The syntax tree of the query language: one dataclass per statement and piece.

Every node carries the `span` of the text it came from, so the evaluator can point its
errors at the exact piece (a module path, a position, a variable). Statements also keep
their source `text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxterp_repl.dsl.errors import Span


@dataclass(kw_only=True)
class Node:
    span: Span


# ---- pieces ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class Path(Node):
    """A module path or pattern, as written: `layers.8.mlp`, `layers.*.mlp`, `output`."""

    text: str


@dataclass(kw_only=True)
class Var(Node):
    """A `$name` reference (name without the `$`)."""

    name: str


@dataclass(kw_only=True)
class String(Node):
    value: str


@dataclass(kw_only=True)
class Index(Node):
    """A token index; negative counts from the end."""

    value: int


@dataclass(kw_only=True)
class Match(Node):
    """The token whose text matches, by the rule of `mlxterp.core.positions` (exact, else ignoring
    surrounding spaces)."""

    text: str


@dataclass(kw_only=True)
class Slice(Node):
    start: int | None
    stop: int | None


@dataclass(kw_only=True)
class PositionList(Node):
    items: list  # of Index | Match


@dataclass(kw_only=True)
class AllPositions(Node):
    pass


@dataclass(kw_only=True)
class Layers(Node):
    """Which layers a `lens` or `patch` covers, as written (`3`, `0..7`, `7..0`, `[0,4,8]`, `*`);
    `mlxterp.core.paths.parse_layers(text).indices(n_layers)` gives the layer numbers."""

    text: str


@dataclass(kw_only=True)
class Plot(Node):
    file: str | None  # None: the statement's default file name


@dataclass(kw_only=True)
class Intervention(Node):
    """`TARGET zero | scale K | clamp LO HI | noise STD [seed N] | add $v [* K] | replace $x`, then `[@ POSITION]`."""

    target: Path
    kind: str
    numbers: list[float] = field(default_factory=list)
    var: Var | None = None
    seed: int | None = None
    position: Node | None = None  # `@ POSITION` after it: only at those positions
    position_text: str = ""  # the position as written (spaces removed)

    def canonical(self) -> str:
        """The intervention as text with spacing normalised (part of a trace cache key)."""
        parts = [self.target.text, self.kind]
        if self.var is not None:
            parts.append("$" + self.var.name)
        if self.kind == "add" and self.numbers:
            parts.append("*")
        parts += [repr(float(x)) for x in self.numbers]
        if self.seed is not None:
            parts += ["seed", str(self.seed)]
        if self.position is not None:
            parts += ["@", self.position_text]
        return " ".join(parts)


# ---- let expressions --------------------------------------------------------------------


@dataclass(kw_only=True)
class Number(Node):
    value: float


@dataclass(kw_only=True)
class BinOp(Node):
    op: str  # + - * /
    left: Node
    right: Node


@dataclass(kw_only=True)
class Negate(Node):
    operand: Node


@dataclass(kw_only=True)
class Call(Node):
    function: str  # mean | norm
    argument: Node


# ---- statements --------------------------------------------------------------------------


@dataclass(kw_only=True)
class Statement(Node):
    text: str = ""


@dataclass(kw_only=True)
class Load(Statement):
    source: String
    options: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class Prompt(Statement):
    prompt: String


@dataclass(kw_only=True)
class Tokens(Statement):
    input: String | None = None


@dataclass(kw_only=True)
class Save(Statement):
    target: Path
    position: Node | None = None
    input: String | None = None
    name: Var | None = None


@dataclass(kw_only=True)
class Lens(Statement):
    position: Node | None = None
    top: int | None = None
    layers: Layers | None = None
    input: String | None = None
    tuned: String | None = None  # the tuned lens's directory (`tuned DIR`); None: the logit lens
    plot: Plot | None = None
    overwrite: bool = False  # replace an existing file (export, plot to FILE)


@dataclass(kw_only=True)
class Dla(Statement):
    input: String | None = None  # the prompt; None: the session's
    answer: String | None = None
    answers: list | None = None  # [String, String]: the logit difference
    layers: Layers | None = None
    plot: Plot | None = None
    overwrite: bool = False


@dataclass(kw_only=True)
class Attribute(Statement):
    clean: String | None = None
    corrupt: String | None = None
    answers: list | None = None
    layers: Layers | None = None
    plot: Plot | None = None
    overwrite: bool = False


@dataclass(kw_only=True)
class Attention(Statement):
    target: Node
    input: String | None = None
    plot: Plot | None = None
    overwrite: bool = False


@dataclass(kw_only=True)
class Generate(Statement):
    count: int = 0
    input: String | None = None
    ignore_eos: bool = False


@dataclass(kw_only=True)
class Predict(Statement):
    target: Node  # Path or Var
    position: Node | None = None
    top: int | None = None
    input: String | None = None


@dataclass(kw_only=True)
class Patch(Statement):
    component: Path
    clean: String | None = None
    corrupt: String | None = None
    position: Node | None = None  # None: one recovery per layer; else one per layer and position
    metric: String | None = None
    answers: list[String] | None = None  # (clean answer, corrupted answer) for metric logit_diff
    layers: Layers | None = None
    plot: Plot | None = None
    overwrite: bool = False  # replace an existing file (export, plot to FILE)
    force: bool = False  # run even when the estimated time is long


@dataclass(kw_only=True)
class Sae(Statement):
    source: String | None = None  # the SAE's directory (`sae load DIR`); None: list the loaded ones


@dataclass(kw_only=True)
class Features(Statement):
    target: Path
    position: Node | None = None
    top: int | None = None
    input: String | None = None


@dataclass(kw_only=True)
class Heads(Statement):
    kind: String | None = None  # induction | previous | first; None: all three
    layers: Layers | None = None
    input: String | None = None
    plot: Plot | None = None
    overwrite: bool = False  # replace an existing file (plot to FILE)


@dataclass(kw_only=True)
class Causal(Statement):
    input: String | None = None  # the prompt; None: the session's
    subject: String | None = None  # required: the parser refuses a causal without `subject`
    answer: String | None = None
    layers: Layers | None = None
    plot: Plot | None = None
    overwrite: bool = False  # replace an existing file (plot to FILE)


@dataclass(kw_only=True)
class With(Statement):
    interventions: list[Intervention]
    body: Statement


@dataclass(kw_only=True)
class Steer(Statement):
    interventions: list[Intervention]  # empty: show what is on
    clear: bool = False


@dataclass(kw_only=True)
class Let(Statement):
    name: Var
    expr: Node


@dataclass(kw_only=True)
class Ls(Statement):
    path: Path | None = None


@dataclass(kw_only=True)
class Stats(Statement):
    target: Path
    position: Node | None = None
    input: String | None = None


@dataclass(kw_only=True)
class Export(Statement):
    source: Node  # Var or Path
    file: String | None = None  # required: the parser refuses an export without `to FILE`
    position: Node | None = None
    input: String | None = None
    overwrite: bool = False  # replace an existing file (export, plot to FILE)


@dataclass(kw_only=True)
class Info(Statement):
    pass


@dataclass(kw_only=True)
class Help(Statement):
    topic: String | None = None
