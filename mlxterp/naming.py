"""The mlx side of naming: walk a model's modules and build the core's name table from them.

Every rule about names (path grammar, layer segments and ranges, aliases, short names,
patterns, suggestions) lives in `mlxterp.core.paths`; `ModuleNames` only walks the model
(`walk_modules`, `find_layers`), keeps the module objects, and hands resolution to the
`NameTable` it builds, so the library, the query language and the language server resolve
names with the same code.
"""

from __future__ import annotations

import mlx.nn as nn

from .core.paths import ALIASES, LAYER_CONTAINERS, OUTPUT, ROOT, NameTable  # noqa: F401 (re-exported)
from .errors import UnknownModuleError


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
    """The module objects of one model and the core name table over their names."""

    def __init__(self, root: nn.Module, layer_attr: str = "layers"):
        modules: dict[str, nn.Module] = {}
        for path, module in walk_modules(root):
            modules.setdefault(path, module)
        try:
            self.layers_prefix = find_layers(root, layer_attr)
        except UnknownModuleError:
            if layer_attr != "layers":
                raise
            self.layers_prefix = None
        layers = _get_path(root, self.layers_prefix.split(".", 1)[1]) if self.layers_prefix else []
        self.set_table(modules, len(layers))

    def set_table(self, modules: dict[str, nn.Module], n_layers: int) -> None:
        """Use ``modules`` (full name -> module, in model order) and ``n_layers`` layers as the table.

        mlxterp.distributed calls it with the modules of every process of a pipeline-sharded model.
        """
        self.modules = modules
        self.n_layers = n_layers
        self.table = NameTable(list(modules), self.layers_prefix, n_layers, forwards(modules))
        self.layer_names = self.table.layer_names
        from . import hooks  # the hook points this architecture has exactly (mlxterp.hooks.BLOCKS)

        self.table.set_hooks(*hooks.table_entries(self.table, modules, _architecture(modules.get(ROOT))))

    def resolve(self, name: str) -> str:
        return self.table.resolve(name)

    def expand(self, pattern: str) -> list[str]:
        return self.table.expand(pattern)

    def short(self, full: str) -> str:
        return self.table.short(full)

    def suggest(self, name: str, n: int = 5) -> list[str]:
        return self.table.suggest(name, n)

    def layer_index(self, full: str) -> int | None:
        return self.table.layer_index(full)

    def find(self, role: str) -> str | None:
        return self.table.find(role)


def _architecture(root) -> str | None:
    """The mlx-lm ``model_type`` of a model (its args), or None."""
    for owner in (root, getattr(root, "model", None)):
        args = getattr(owner, "args", None)
        if getattr(args, "model_type", None):
            return args.model_type
    return getattr(root, "model_type", None)


def forwards(modules: dict) -> dict[str, str]:
    """Containers that are never called themselves (exaone's ``attn`` holds ``attention``) and the
    one child module they stand for."""
    children: dict[str, list[str]] = {}
    for full in modules:
        parent, _, child = full.rpartition(".")
        if parent in modules:
            children.setdefault(parent, []).append(child)
    return {full: kids[0] for full, kids in children.items() if len(kids) == 1 and not callable(modules[full])}
