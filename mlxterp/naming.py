"""The one name resolver: every way a person can name a module, turned into its full name.

Full names are the module paths of the wrapped model prefixed with ``model``
(``model.model.layers.6.self_attn.q_proj`` for an mlx-lm model). Short forms
(``layers.6.mlp``, ``embed``, ``norm``), aliases (``attn`` for whatever the
architecture calls its attention module, ``mlp`` for its feed-forward block),
negative layer indices and patterns (``layers.*.mlp``, ``layers.0..5``,
``layers.[1,3,5].attn``) all resolve here, for proxies, ``trace.activations``,
intervention keys, the query language and the editor alike.
"""

from __future__ import annotations

import difflib
import fnmatch
import re

import mlx.nn as nn

from .errors import LayerIndexError, UnknownModuleError

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


def walk_modules(root: nn.Module, prefix: str = ROOT) -> list[tuple[str, nn.Module]]:
    """All sub-modules of ``root`` in definition order (the order data flows in mlx-lm models)."""
    found = [(prefix, root)]

    def visit(value, path):
        if isinstance(value, nn.Module):
            found.append((path, value))
            for key, child in value.items():
                visit(child, f"{path}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, child in enumerate(value):
                visit(child, f"{path}.{i}")
        elif isinstance(value, dict):
            for key, child in value.items():
                visit(child, f"{path}.{key}")

    for key, child in root.items():
        visit(child, f"{prefix}.{key}")
    return found


def find_layers(root: nn.Module, layer_attr: str = "layers") -> str:
    """Full name of the list of transformer blocks, e.g. ``model.model.layers``."""
    wanted = [layer_attr] if layer_attr != "layers" else list(LAYER_CONTAINERS)
    candidates = []
    for path, module in walk_modules(root):
        for attr in wanted:
            head, _, last = attr.rpartition(".")
            owner = module
            if head:
                owner = _get_path(module, head)
            value = owner.get(last) if isinstance(owner, nn.Module) else None
            # A pipeline-sharded mlx-lm model keeps None where other processes own the layer.
            if isinstance(value, (list, tuple)) and any(isinstance(v, nn.Module) for v in value) and all(
                isinstance(v, nn.Module) or v is None for v in value
            ):
                candidates.append((wanted.index(attr), path.count("."), f"{path}.{attr}"))
    if not candidates:
        raise UnknownModuleError(
            layer_attr, [], "no list of layer modules found; pass layer_attr= with its dotted path, e.g. 'h' or 'transformer.blocks'"
        )
    return min(candidates)[2]


def _get_path(module, dotted: str):
    for part in dotted.split("."):
        if isinstance(module, nn.Module) and part in module:
            module = module[part]
        else:
            return None
    return module


class ModuleNames:
    """The module table of one model and the resolver over it."""

    def __init__(self, root: nn.Module, layer_attr: str = "layers"):
        self.modules: dict[str, nn.Module] = {}
        for path, module in walk_modules(root):
            self.modules.setdefault(path, module)
        try:
            self.layers_prefix = find_layers(root, layer_attr)
        except UnknownModuleError:
            if layer_attr != "layers":
                raise
            self.layers_prefix = None
        layers = _get_path(root, self.layers_prefix.split(".", 1)[1]) if self.layers_prefix else []
        self.set_table(self.modules, len(layers))

    def set_table(self, modules: dict[str, nn.Module], n_layers: int) -> None:
        """Use ``modules`` (full name -> module, in model order) and ``n_layers`` layers as the table.

        mlxterp.distributed calls it with the modules of every process of a pipeline-sharded model.
        """
        self.modules = modules
        self.n_layers = n_layers
        self.layer_names = [f"{self.layers_prefix}.{i}" for i in range(self.n_layers)]
        self._short = {full: self._shortest_unique(full) for full in self.modules}

    # -- short names -----------------------------------------------------
    def _shortest_unique(self, full: str) -> str:
        if full == ROOT:
            return ROOT
        if self.layers_prefix and full.startswith(self.layers_prefix + "."):
            return "layers" + full[len(self.layers_prefix):]
        parts = full.split(".")
        for k in range(1, len(parts)):
            tail = ".".join(parts[-k:])
            if len(self._suffix_matches(tail)) == 1:
                return tail
        return full

    def short(self, full: str) -> str:
        return OUTPUT if full == OUTPUT else self._short.get(full, full)

    def _suffix_matches(self, tail: str) -> list[str]:
        return [f for f in self.modules if f == tail or f.endswith("." + tail)]

    # -- resolving -------------------------------------------------------
    def resolve(self, name: str) -> str:
        """Full name for any single-module name; raises with the closest valid names."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownModuleError(str(name), self.suggest("layers.0"), "a module name is a non-empty string")
        name = name.strip()
        if name == OUTPUT:
            return name
        if name in self.modules:
            return self._called_module(name)
        if name == "logits":
            return OUTPUT
        layer_form = self._resolve_layer_form(name)
        if layer_form:
            return layer_form
        ambiguous = []
        for candidate in self._alias_variants(name.split(".")):
            found = self._suffix_matches(candidate)
            # "norm" is the final norm even where blocks hold a norm too (mamba, qwen3_next).
            outside = [f for f in found if self.layer_index(f) is None]
            if len(found) == 1 or len(outside) == 1:
                return self._called_module(found[0] if len(found) == 1 else outside[0])
            if found and not ambiguous:
                ambiguous = found
        if ambiguous:
            shorts = [self.short(f) for f in ambiguous]
            raise UnknownModuleError(name, shorts[:6], f"ambiguous: it names {len(ambiguous)} modules")
        raise UnknownModuleError(name, self.suggest(name))

    def _resolve_layer_form(self, name: str) -> str | None:
        """``layers.6.mlp``, ``model.layers.-1``, ``h.3.attn`` ... relative to the layer list."""
        if not self.layers_prefix:
            return None
        parts = name.split(".")
        container = self.layers_prefix.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in (container[-1], "layers") or not _INDEX.match(parts[i + 1]):
                continue
            head = parts[:i]
            if head and container[:-1][-len(head):] != head:
                continue
            index = int(parts[i + 1])
            if not -self.n_layers <= index < self.n_layers:
                raise LayerIndexError(index, self.n_layers)
            index %= self.n_layers
            base = f"{self.layers_prefix}.{index}"
            rest = parts[i + 2:]
            if not rest:
                return base
            for variant in self._alias_variants(rest):
                full = base + "." + variant
                if full in self.modules:
                    return self._called_module(full)
            children = [self.short(f) for f in self.modules if f.startswith(base + ".")]
            close = difflib.get_close_matches(self.short(base) + "." + ".".join(rest), children, n=5, cutoff=0.5)
            raise UnknownModuleError(name, close or children[:8])
        return None

    def _called_module(self, full: str) -> str:
        """A container that is never called itself (exaone's ``attn`` holds ``attention``): its one child."""
        module = self.modules[full]
        while not callable(module):
            children = [k for k, v in module.children().items() if isinstance(v, nn.Module)]
            if len(children) != 1:
                break
            full = f"{full}.{children[0]}"
            module = self.modules[full]
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
        shorts = sorted(set(self._short.values()) - {ROOT}) + [OUTPUT]
        close = difflib.get_close_matches(name, shorts, n=n, cutoff=0.5)
        if not close:
            last = name.split(".")[-1]
            close = [s for s in shorts if s.split(".")[-1] == last][:n]
        return close or [s for s in shorts if "." not in s or s.count(".") == 1][:n]

    # -- patterns ----------------------------------------------------------
    def expand(self, pattern: str) -> list[str]:
        """Full names a pattern stands for, in layer order; a plain name gives one."""
        if not isinstance(pattern, str) or not pattern.strip():
            raise UnknownModuleError(str(pattern), self.suggest("layers.0"), "a module name is a non-empty string")
        pattern = pattern.strip()
        parts = pattern.split(".")
        for i, part in enumerate(parts[:-1] if len(parts) > 1 else parts):
            nxt = parts[i + 1] if i + 1 < len(parts) else ""
            indices = self._layer_indices(nxt, pattern) if part in ("layers", (self.layers_prefix or "").split(".")[-1]) else None
            if indices is not None:
                head, rest = parts[: i + 1], parts[i + 2:]
                names = []
                for index in indices:
                    names.extend(self.expand(".".join(head + [str(index)] + rest)))
                return names
        # ``0..5`` written in one segment splits on its dots: rejoin.
        if ".." in pattern:
            m = re.match(r"^(.*?\blayers)\.(-?\d+)\.\.(-?\d+)(\..*)?$", pattern)
            if m:
                head, lo, hi, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or ""
                return [n for i in self._range(lo, hi, pattern) for n in self.expand(f"{head}.{i}{rest}")]
        if "*" in pattern or "?" in pattern:
            shorts = {self.short(f): f for f in self.modules}
            found = [full for short, full in shorts.items() if fnmatch.fnmatchcase(short, pattern)]
            found += [f for f in self.modules if fnmatch.fnmatchcase(f, pattern) and f not in found]
            if not found:
                raise UnknownModuleError(pattern, self.suggest(pattern.replace("*", "0")), "the pattern matches no module")
            order = {f: i for i, f in enumerate(self.modules)}
            return sorted(found, key=order.__getitem__)
        return [self.resolve(pattern)]

    def _layer_indices(self, segment: str, pattern: str) -> list[int] | None:
        if segment == "*":
            return list(range(self.n_layers))
        m = re.match(r"^\[(.*)\]$", segment)
        if m:
            try:
                values = [int(v) for v in m.group(1).split(",") if v.strip()]
            except ValueError:
                raise UnknownModuleError(pattern, [], "a layer list holds integers, e.g. layers.[1,3,5]") from None
            for v in values:
                if not -self.n_layers <= v < self.n_layers:
                    raise LayerIndexError(v, self.n_layers)
            return [v % self.n_layers for v in values]
        return None

    def _range(self, lo: int, hi: int, pattern: str) -> list[int]:
        for v in (lo, hi):
            if not -self.n_layers <= v < self.n_layers:
                raise LayerIndexError(v, self.n_layers)
        lo, hi = lo % self.n_layers, hi % self.n_layers
        if lo > hi:
            raise UnknownModuleError(pattern, [], f"the range {lo}..{hi} is empty; write low..high (both included)")
        return list(range(lo, hi + 1))

    def layer_index(self, full: str) -> int | None:
        """The index of the layer a module belongs to, or None."""
        if self.layers_prefix and full.startswith(self.layers_prefix + "."):
            return int(full[len(self.layers_prefix) + 1:].split(".")[0])
        return None

    def find(self, role: str) -> str | None:
        """Full name of the top-level module playing ``role`` (embed, norm, lm_head), or None."""
        outside = [f for f in self.modules if self.layer_index(f) is None]
        for alias in ALIASES[role]:
            for full in outside:
                if full.split(".")[-1] == alias:
                    return full
        return None
