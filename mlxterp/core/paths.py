"""Module paths: their grammar, layer segments and ranges, and the one name resolver.

A path is dot-separated segments (`layers.6.mlp`, `model.model.norm`). A segment right after
the layer container (`layers`, or whatever the model calls it, e.g. `h`) may select layers:

- `3`, `-1`          one layer; negative counts from the end
- `0..5`, `7..0`     both ends included, in the order written (`7..0` is 7, 6, ..., 0);
                     each end may be negative (`-3..-1` is the last three layers)
- `[1,3]`, `[-1,0]`  the listed layers, in the order written
- `*`                every layer

The same segments are the `layers` option of `lens` and `patch` (`parse_layers`).

`NameTable` is a model's module names as plain data (full names in model order, where the
layers are, how many, and which containers forward to a single called child). It resolves
every way a person can name a module: full names, short names (`layers.6.mlp`, `embed`),
aliases (`attn`, `mlp`, `embed`, `norm`, `lm_head`), negative layers and patterns. The
library builds one from the model (`mlxterp.naming`); the daemon sends it (`to_data`) so
the language server runs this same resolver.

Hook points are names too (docs/coming-from.md): `layers.N.resid_pre|resid_mid|resid_post|
attn_out|mlp_out`, per head `layers.N.attn.q|k|v|z|pattern` with an optional head selection
`.head[3]` (`head[1,3]`, `head[0..3]`, `head[*]`), and `PATH.input` (a module's input). The
table lists which hook points the model has (`hooks`, built by `mlxterp.hooks` per
architecture); a hook's full name is its module's full name plus the hook
(`model.model.layers.8.self_attn.z.head[3]`), and `hook_parts` splits one back.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field

from mlxterp.core.errors import LayerIndexError, UnknownModuleError

ROOT = "model"
OUTPUT = "output"

# What architectures call the pieces a researcher names with one word.
ALIASES = {
    "attn": ("self_attn", "attention", "attn", "self_attention", "mixer", "linear_attn"),
    "mlp": ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"),
    "embed": ("embed_tokens", "wte", "tok_embeddings", "embed_in", "word_embeddings", "embedding", "embeddings",
              "token_embeddings"),
    "norm": ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm", "embedding_norm"),
    "lm_head": ("lm_head", "embed_out", "output"),
}
LAYER_CONTAINERS = ("layers", "h", "blocks", "layer")

_INDEX = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_LIST = re.compile(r"^\[(.*)\]$")
_SPLIT = re.compile(r"(?<!\.)\.(?!\.)")

LAYERS_HELP = "3, -1, 0..5, 7..0, [1,3] or *"

# Hook points: points of the residual stream of each layer, and per-head values of its attention.
LAYER_HOOKS = {
    "resid_pre": "the residual stream entering the layer (its input)",
    "resid_mid": "the residual stream between attention and MLP (resid_pre + attn_out)",
    "resid_post": "the residual stream leaving the layer (its output)",
    "attn_out": "what the attention adds to the residual stream",
    "mlp_out": "what the MLP adds to the residual stream",
}
HEAD_HOOKS = {
    "q": "queries per head (batch, positions, heads, head_dim), after norms and RoPE",
    "k": "keys per key/value head (batch, positions, kv_heads, head_dim), after norms and RoPE",
    "v": "values per key/value head (batch, positions, kv_heads, head_dim)",
    "z": "each head's mix of values, the output projection's input (batch, positions, heads, head_dim)",
    "pattern": "attention probabilities (batch, heads, query, key)",
}
INPUT = "input"
MEMO_LIMIT = 4096  # remembered resolve()/expand() answers per name table
HOOK_HELP = ("layers.N.resid_pre, resid_mid, resid_post, attn_out, mlp_out; layers.N.attn.q, k, v, z, pattern "
             "(optionally .head[H]); PATH.input")
_HEAD = re.compile(r"^head\[(.*)\]$")


def split_path(text: str) -> list[str]:
    """Segments of a path: split on single dots, keeping `A..B` ranges and `[a,b]` lists whole."""
    parts, depth, current = [], 0, ""
    for piece in _SPLIT.split(text):
        current = piece if not current and depth == 0 else current + "." + piece
        depth = current.count("[") - current.count("]")
        if depth <= 0:
            parts.append(current)
            current, depth = "", 0
    if current:
        parts.append(current)
    return [part for part in parts if part != ""]


@dataclass(frozen=True)
class LayerSelection:
    """A layer segment as written; `indices(n_layers)` turns it into layer numbers."""

    text: str
    kind: str  # "index" | "range" | "list" | "all"
    values: tuple[int, ...] = ()

    def indices(self, n_layers: int) -> list[int]:
        """Layer numbers (0..n_layers-1) in the order written; LayerIndexError names a bad one."""
        if self.kind == "all":
            return list(range(n_layers))
        for value in self.values:
            if not -n_layers <= value < n_layers:
                raise LayerIndexError(value, n_layers)
        resolved = [value % n_layers for value in self.values]
        if self.kind == "range":
            lo, hi = resolved
            return list(range(lo, hi + 1)) if lo <= hi else list(range(lo, hi - 1, -1))
        return resolved

    @property
    def single(self) -> bool:
        return self.kind == "index"


def parse_layers(text: str) -> LayerSelection | None:
    """The layer selection a segment writes (`3`, `-1`, `0..5`, `[1,3]`, `*`), or None when the
    segment is not one (a module name). A malformed list raises UnknownModuleError."""
    text = text.strip()
    if text == "*":
        return LayerSelection("*", "all")
    if _INDEX.match(text):
        return LayerSelection(str(int(text)), "index", (int(text),))
    m = _RANGE.match(text)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        return LayerSelection(f"{lo}..{hi}", "range", (lo, hi))
    m = _LIST.match(text)
    if m:
        items = [item.strip() for item in m.group(1).split(",")]
        if not all(_INDEX.match(item) for item in items):
            raise UnknownModuleError(text, [], f"a layer list holds integers, e.g. [1,3,5]; layers are {LAYERS_HELP}")
        values = tuple(int(item) for item in items)
        return LayerSelection("[" + ",".join(str(v) for v in values) + "]", "list", values)
    return None


def is_layer_segment(text: str) -> bool:
    """Whether a segment is written as a layer selection (`3`, `0..5`, `[1,3]`, `*`)."""
    try:
        return parse_layers(text) is not None
    except UnknownModuleError:
        return False


def _is_pattern(parts: list[str]) -> bool:
    return any(ch in part for part in parts for ch in "*?[")


@dataclass
class NameTable:
    """A model's module names as plain data, and the resolver over them."""

    names: list[str]  # full names ("model.model.layers.0.mlp"), in model order
    layers_prefix: str | None = None  # full name of the layer list, e.g. "model.model.layers"
    n_layers: int = 0
    forwards: dict[str, str] = field(default_factory=dict)  # container never called itself -> its one child
    hooks: list[str] = field(default_factory=list)  # hook points every layer has: "resid_pre", "attn.z", ...
    n_heads: int = 0  # query heads per layer (0: unknown), for head selections
    hooks_note: str = ""  # why some hook points are missing (names the architecture)

    def __post_init__(self):
        self.names = list(dict.fromkeys(self.names))
        self._known = set(self.names)
        self._order = {name: i for i, name in enumerate(self.names)}
        self._by_suffix: dict[str, list[str]] = {}
        for full in self.names:
            parts = full.split(".")
            for k in range(1, len(parts) + 1):
                self._by_suffix.setdefault(".".join(parts[-k:]), []).append(full)
        self.layer_names = [f"{self.layers_prefix}.{i}" for i in range(self.n_layers)] if self.layers_prefix else []
        self._short = {full: self._shortest_unique(full) for full in self.names}
        # Answers of resolve() and expand() by the text asked: a patching sweep or a trace with
        # interventions asks the same names dozens of times, each answer costing 10-30 us of parsing.
        self._resolved: dict[str, str] = {}
        self._expanded: dict[str, tuple[str, ...]] = {}
        self._found: dict[str, str | None] = {}  # find(role), for the roles ALIASES names

    def set_hooks(self, hooks: list[str], n_heads: int, note: str) -> None:
        """The hook points every layer has, the heads per layer and why some are missing (they
        change what names resolve to, so remembered answers are dropped)."""
        self.hooks, self.n_heads, self.hooks_note = hooks, n_heads, note
        self._resolved.clear()
        self._expanded.clear()

    def _remember(self, memo: dict, key: str, value) -> None:
        if len(memo) >= MEMO_LIMIT:  # names typed in a long daemon session: bounded, dropped wholesale
            memo.clear()
        memo[key] = value

    # -- plain data ------------------------------------------------------
    def to_data(self) -> dict:
        return {"names": list(self.names), "layers_prefix": self.layers_prefix, "n_layers": self.n_layers,
                "forwards": dict(self.forwards), "hooks": list(self.hooks), "n_heads": self.n_heads,
                "hooks_note": self.hooks_note}

    @classmethod
    def from_data(cls, data: dict) -> "NameTable":
        return cls(list(data.get("names") or []), data.get("layers_prefix"), int(data.get("n_layers") or 0),
                   dict(data.get("forwards") or {}), list(data.get("hooks") or []), int(data.get("n_heads") or 0),
                   str(data.get("hooks_note") or ""))

    def __contains__(self, full: str) -> bool:
        return full in self._known

    # -- short names -----------------------------------------------------
    def _shortest_unique(self, full: str) -> str:
        if full == ROOT:
            return ROOT
        if self.layers_prefix and full.startswith(self.layers_prefix + "."):
            return "layers" + full[len(self.layers_prefix):]
        parts = full.split(".")
        for k in range(1, len(parts)):
            tail = ".".join(parts[-k:])
            if len(self._by_suffix.get(tail, ())) == 1:
                return tail
        return full

    def short(self, full: str) -> str:
        """The shortest name that still names `full` alone (`layers.6.mlp`, `embed_tokens`)."""
        if full == OUTPUT:
            return OUTPUT
        if full not in self._short:
            parts = self.hook_parts(full)
            if parts is not None:
                module, hook, heads = parts
                return ".".join([self.short(module), hook.split(".")[-1]] + ([f"head[{heads}]"] if heads else []))
        return self._short.get(full, full)

    def short_names(self) -> list[str]:
        return [self._short[full] for full in self.names]

    def path_names(self) -> list[str]:
        """Short names of the modules and of every layer's hook points (what completion offers)."""
        names = self.short_names()
        for layer in self.layer_names:
            names += self._layer_hook_names(layer)
        return names

    def _layer_hook_names(self, layer: str) -> list[str]:
        """Short names of one layer's hook points (`layers.8.resid_pre`, `layers.8.self_attn.z`)."""
        short = self._short.get(layer, layer)
        attention = self.attention_of(layer)
        found = [f"{short}.{INPUT}"] if self.hooks else []
        for hook in self.hooks:
            if not hook.startswith("attn."):
                found.append(f"{short}.{hook}")
            elif attention is not None:
                found.append(f"{self._short[attention]}.{hook[5:]}")
        return found

    # -- hook points -------------------------------------------------------
    def attention_of(self, layer_full: str) -> str | None:
        """Full name of a layer's attention module (`self_attn`, `attention`, ...), or None."""
        for variant in ALIASES["attn"]:
            if f"{layer_full}.{variant}" in self._known:
                return self._called(f"{layer_full}.{variant}")
        return None

    @staticmethod
    def _split_hook(parts: list[str]) -> tuple[list[str], str, str | None] | None:
        """(module path parts, hook word, head selection text) of a written hook name, or None."""
        heads = None
        if parts and _HEAD.match(parts[-1]):
            heads = _HEAD.match(parts[-1]).group(1).replace(" ", "")
            parts = parts[:-1]
        if len(parts) < 2:
            return None
        last = parts[-1]
        if last == INPUT or last in LAYER_HOOKS:
            return parts[:-1], last, heads
        if last in HEAD_HOOKS:
            return parts[:-1], "attn." + last, heads
        return None

    def hook_parts(self, full: str) -> tuple[str, str, str | None] | None:
        """A hook point's full name split into (module full name, hook, head selection), or None
        when `full` is not one (`...layers.8.self_attn.z.head[3]` -> (`...self_attn`, `attn.z`, `3`))."""
        if not isinstance(full, str) or full in self._known or full == OUTPUT:
            return None
        split = self._split_hook(split_path(full))
        if split is None:
            return None
        module = ".".join(split[0])
        return (module, split[1], split[2]) if module in self._known else None

    def describe_hook(self, name: str) -> str | None:
        """Markdown saying what hook point `name` is (for hover), or None when it names none."""
        try:
            full = self.resolve(name)
        except (UnknownModuleError, LayerIndexError):
            return None
        parts = self.hook_parts(full)
        if parts is None:
            return None
        module, hook, heads = parts
        what = LAYER_HOOKS.get(hook) or HEAD_HOOKS.get(hook[5:]) or f"the input of {self.short(module)}"
        text = f"**{self.short(full)}** (hook point): {what}"
        if heads is not None:
            text += f"; heads {heads}"
        return text

    def head_indices(self, heads: str | None) -> list[int] | None:
        """Head numbers of a head selection text (`3`, `[1,3]`, `0..3`, `*`); None: every head."""
        if heads is None:
            return None
        selection = parse_layers(heads if not heads.count(",") or heads.startswith("[") else f"[{heads}]")
        if selection is None or not self.n_heads:
            raise UnknownModuleError(f"head[{heads}]", [], "a head selection is head[3], head[1,3], head[0..3] or "
                                     "head[*]" + ("" if self.n_heads else "; this model's heads are not known"))
        try:
            return selection.indices(self.n_heads)
        except LayerIndexError:
            raise UnknownModuleError(f"head[{heads}]", [f"head[{self.n_heads - 1}]"],
                                     f"the attention has {self.n_heads} heads: 0..{self.n_heads - 1}") from None

    def _hooks(self, name: str, split) -> list[str]:
        """Full names of a written hook name over every module its path stands for."""
        module_parts, hook, heads = split
        if hook == INPUT:
            if heads is not None:
                raise UnknownModuleError(name, [], "a head selection follows attn.q, k, v, z or pattern")
            return [f"{full}.{INPUT}" for full in self.expand(".".join(module_parts)) if full != OUTPUT]
        if hook not in self.hooks:
            why = f" ({self.hooks_note})" if self.hooks_note else ""
            raise UnknownModuleError(name, [], f"hook point {hook} is not available for this model{why}; "
                                     f"it has: " + (", ".join(self.hooks) or "none"))
        if hook.startswith("attn."):
            module_parts = module_parts[:-1] if module_parts and module_parts[-1] in (
                ("attn",) + ALIASES["attn"]) else module_parts
            if heads is not None:
                self.head_indices(heads)
        elif heads is not None:
            raise UnknownModuleError(name, [], "a head selection follows attn.q, k, v, z or pattern")
        layers = self.expand(".".join(module_parts)) if module_parts else []
        found = []
        for layer in layers:
            if layer not in self.layer_names:
                where = "a layer's attention" if hook.startswith("attn.") else "a layer"
                raise UnknownModuleError(name, [f"layers.0.{hook}"], f"{hook.split('.')[-1]} is a hook point of "
                                         f"{where}: layers.N.{hook}")
            if hook.startswith("attn."):
                attention = self.attention_of(layer)
                if attention is None:
                    raise UnknownModuleError(name, [], f"layer {layer} has no attention module")
                base = f"{attention}.{hook[5:]}"
            else:
                base = f"{layer}.{hook}"
            found.append(base + (f".head[{heads}]" if heads is not None else ""))
        return found

    def layer_index(self, full: str) -> int | None:
        """The index of the layer a module belongs to, or None."""
        if self.layers_prefix and full.startswith(self.layers_prefix + "."):
            head = full[len(self.layers_prefix) + 1:].split(".")[0]
            return int(head) if head.isdigit() else None
        return None

    def find(self, role: str) -> str | None:
        """Full name of the top-level module playing `role` (embed, norm, lm_head), or None."""
        if role not in self._found:
            self._found[role] = self._find(role)
        return self._found[role]

    def _find(self, role: str) -> str | None:
        outside = [f for f in self.names if self.layer_index(f) is None]
        for alias in ALIASES[role]:
            for full in outside:
                if full.split(".")[-1] == alias:
                    return full
        return None

    def _is_container(self, part: str) -> bool:
        return part == "layers" or (self.layers_prefix is not None and part == self.layers_prefix.split(".")[-1])

    # -- resolving -------------------------------------------------------
    def resolve(self, name: str) -> str:
        """Full name for any single-module name; raises with the closest valid names."""
        found = self._resolved.get(name) if type(name) is str else None
        if found is None:
            found = self._resolve(name)
            self._remember(self._resolved, name, found)
        return found

    def _resolve(self, name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise UnknownModuleError(str(name), self.suggest("layers.0"), "a module name is a non-empty string")
        name = name.strip()
        if name == OUTPUT:
            return name
        if name in self._known:
            return self._called(name)
        if name == "logits":
            return OUTPUT
        parts = split_path(name)
        hook = self._split_hook(parts)
        if hook is not None:
            found = self._hooks(name, hook)
            if len(found) == 1:
                return found[0]
            raise UnknownModuleError(name, [self.short(f) for f in found[:6]],
                                     f"a pattern naming {len(found)} hook points where one is needed")
        if self.layer_segment_at(parts) is not None or _is_pattern(parts):
            found = self.expand(name)
            if len(found) == 1:
                return found[0]
            raise UnknownModuleError(name, [self.short(f) for f in found[:6]],
                                     f"a pattern naming {len(found)} modules where one module is needed")
        ambiguous = []
        for candidate in self._alias_variants(parts):
            found = self._by_suffix.get(candidate, [])
            # "norm" is the final norm even where blocks hold a norm too (mamba, qwen3_next).
            outside = [f for f in found if self.layer_index(f) is None]
            if len(found) == 1 or len(outside) == 1:
                return self._called(found[0] if len(found) == 1 else outside[0])
            if found and not ambiguous:
                ambiguous = found
        if ambiguous:
            raise UnknownModuleError(name, [self.short(f) for f in ambiguous][:6],
                                     f"ambiguous: it names {len(ambiguous)} modules")
        raise UnknownModuleError(name, self.suggest(name))

    def layer_segment_at(self, parts: list[str]) -> int | None:
        """Index (in `split_path`'s parts) of the layer segment of a path (`layers.<here>...`, `model.layers.<here>`), or None."""
        if not self.layers_prefix:
            return None
        container = self.layers_prefix.split(".")
        for i, part in enumerate(parts[:-1]):
            if not self._is_container(part) or parse_layers(parts[i + 1]) is None:
                continue
            head = parts[:i]
            if head and container[:-1][-len(head):] != head:
                continue
            return i + 1
        return None

    def _in_layer(self, name: str, index: int, rest: list[str]) -> str:
        """The module `rest` names inside layer `index`."""
        base = f"{self.layers_prefix}.{index}"
        if not rest:
            return base
        for variant in self._alias_variants(rest):
            full = base + "." + variant
            if full in self._known:
                return self._called(full)
        children = [self.short(f) for f in self.names if f.startswith(base + ".")] + self._layer_hook_names(base)
        close = difflib.get_close_matches(self.short(base) + "." + ".".join(rest), children, n=5, cutoff=0.5)
        raise UnknownModuleError(name, close or children[:8])

    def _called(self, full: str) -> str:
        """A container that is never called itself (exaone's `attn` holds `attention`): its one child."""
        seen = set()
        while full in self.forwards and full not in seen:
            seen.add(full)
            full = f"{full}.{self.forwards[full]}"
        return full

    def _alias_variants(self, parts: list[str]) -> list[str]:
        """The name with each alias word replaced by the names architectures use for it."""
        variants = [[]]
        for part in parts:
            options = (part,) + tuple(a for a in ALIASES.get(part, ()) if a != part)
            variants = [v + [o] for v in variants for o in options]
            if len(variants) > 64:
                break
        return [".".join(v) for v in variants]

    def suggest(self, name: str, n: int = 5) -> list[str]:
        """Valid names close to `name`."""
        shorts = sorted(set(self.path_names()) - {ROOT}) + [OUTPUT]
        close = difflib.get_close_matches(name, shorts, n=n, cutoff=0.5)
        if not close:
            last = split_path(name)[-1] if split_path(name) else name
            close = [s for s in shorts if s.split(".")[-1] == last][:n]
        return close or [s for s in shorts if s.count(".") <= 1][:n]

    # -- patterns ----------------------------------------------------------
    def expand(self, pattern: str) -> list[str]:
        """Full names a pattern stands for, in layer order as written; a plain name gives one."""
        found = self._expanded.get(pattern) if type(pattern) is str else None
        if found is None:
            found = tuple(self._expand(pattern))
            self._remember(self._expanded, pattern, found)
        return list(found)

    def _expand(self, pattern: str) -> list[str]:
        if not isinstance(pattern, str) or not pattern.strip():
            raise UnknownModuleError(str(pattern), self.suggest("layers.0"), "a module name is a non-empty string")
        pattern = pattern.strip()
        if pattern in (OUTPUT, "logits") or pattern in self._known:
            return [self.resolve(pattern)]
        parts = split_path(pattern)
        hook = self._split_hook(parts)
        if hook is not None:
            return self._hooks(pattern, hook)
        at = self.layer_segment_at(parts)
        if at is not None:
            selection = parse_layers(parts[at])
            rest = parts[at + 1:]
            found = []
            for index in selection.indices(self.n_layers):
                if _is_pattern(rest):
                    found.extend(self._glob(pattern, f"{self.layers_prefix}.{index}", rest))
                else:
                    found.append(self._in_layer(pattern, index, rest))
            return found
        if _is_pattern(parts):
            return self._glob(pattern, None, parts)
        return [self.resolve(pattern)]

    def _glob(self, pattern: str, base: str | None, parts: list[str]) -> list[str]:
        """Modules matching a pattern with `*`/`?` (below `base`, a layer, when given)."""
        if base is not None:
            wanted = base + "." + ".".join(parts)
            found = [f for f in self.names if fnmatch.fnmatchcase(f, wanted)]
        else:
            text = ".".join(parts)
            found = [f for f in self.names if fnmatch.fnmatchcase(self._short[f], text)]
            found += [f for f in self.names if fnmatch.fnmatchcase(f, text) and f not in found]
        if not found:
            raise UnknownModuleError(pattern, self.suggest(pattern.replace("*", "0")), "the pattern matches no module")
        return sorted(found, key=self._order.__getitem__)


def segment_matches(typed: str, actual: str, n_layers: int | None = None) -> bool:
    """Whether a written segment stands for an actual one: the same word, an alias of it
    (`attn` for `self_attn`), or a layer selection containing that layer number."""
    if typed == actual or actual in ALIASES.get(typed, ()):
        return True
    if not actual.isdigit():
        return False
    try:
        selection = parse_layers(typed)
    except UnknownModuleError:
        return False
    if selection is None:
        return False
    if not n_layers:
        return True
    try:
        return int(actual) in selection.indices(n_layers)
    except LayerIndexError:
        return False


def next_segments(prefix: str, names: list[str], n_layers: int | None = None) -> dict[str, str]:
    """What may follow a typed path prefix (`layers.0..3.`): each next segment of `names` (short
    names, in model order) below it, with the name it continues."""
    typed = split_path(prefix)
    found: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        if len(parts) <= len(typed) or not all(segment_matches(t, a, n_layers) for t, a in zip(typed, parts)):
            continue
        found.setdefault(parts[len(typed)], ".".join(parts[: len(typed) + 1]))
    return found
