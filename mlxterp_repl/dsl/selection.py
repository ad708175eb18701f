"""A statement's positions and layers, through the core's one set of rules.

The evaluator, hover and the language server's checks all call these: an AST position or
`layers` option becomes a call of `mlxterp.core.positions` / `mlxterp.core.paths`, and a
failure becomes a `QueryError` pinned to the piece of text it is about (the list item, the
`layers` option). No MLX here: the language server imports it.
"""

from __future__ import annotations

from mlxterp.core import paths, positions
from mlxterp.errors import LayerIndexError, PositionError, UnknownModuleError

from mlxterp_repl.dsl import ast
from mlxterp_repl.dsl.errors import QueryError


def position_items(node) -> list:
    """The position nodes that each name something (a list's items, else the node)."""
    return list(node.items) if isinstance(node, ast.PositionList) else [node]


def position_spec(node):
    """The core's form of a position node (None: every position)."""
    if node is None or isinstance(node, ast.AllPositions):
        return positions.ALL
    if isinstance(node, ast.Index):
        return node.value
    if isinstance(node, ast.Match):
        return node.text
    if isinstance(node, ast.Slice):
        return slice(node.start, node.stop)
    if isinstance(node, ast.PositionList):
        return [position_spec(item) for item in node.items]
    raise QueryError("not a position", node.span)


def select(node, tokens: list[str]) -> tuple[list[int], bool]:
    """Token indices a position node means, and whether it names a single token."""
    if isinstance(node, ast.PositionList):
        return [p for item in node.items for p in select(item, tokens)[0]], False
    spec = position_spec(node)
    try:
        chosen = positions.select_positions(spec, tokens)
        return chosen, positions.names_one(spec) and len(chosen) == 1
    except PositionError as error:
        raise QueryError(str(error), node.span, error.suggestions or error.valid) from None


def layers(node: ast.Layers | None, n_layers: int) -> list[int] | None:
    """Layer numbers of a `layers` option (None: the option is absent or `*`)."""
    if node is None:
        return None
    try:
        selection = paths.parse_layers(node.text)
        if selection is None:
            raise UnknownModuleError(node.text, [], f"layers are {paths.LAYERS_HELP}")
        return None if selection.kind == "all" else selection.indices(n_layers)
    except LayerIndexError as error:
        raise QueryError(str(error), node.span, layer_range(n_layers)) from None
    except UnknownModuleError as error:
        raise QueryError(str(error), node.span, ["0..7", "[0, 4, 8]", "*"]) from None


def layer_range(n_layers: int | None) -> list[str]:
    if not n_layers:
        return []
    return [f"0..{n_layers - 1}", f"-{n_layers}..-1"]


def patch_component(text: str) -> str | None:
    """The module name that must resolve for `patch COMPONENT` (None: `layer`/`output` need none, nor
    `heads`, which patches each attention head's z)."""
    return None if text in ("layer", "output", "heads") else f"layers.0.{text}"


def unknown_component(component: ast.Path, error: UnknownModuleError) -> QueryError:
    """The error for a `patch` component that names no module inside the layers."""
    names = sorted({s.split(".", 2)[2] for s in error.suggestions if s.count(".") >= 2})
    always = ["layer", "attn", "mlp"]  # the components most patching starts with, whatever was typed
    return QueryError(f"no component {component.text!r} in the layers", component.span,
                      names + [name for name in always if name not in names])


def select_patch(node, clean_tokens: list[str], corrupt_tokens: list[str]) -> list[int]:
    """The positions of `patch ... @ POSITION`: a token text may be one of the clean or of the
    corrupted prompt (the clean prompt is tried first; the corrupted one only when both prompts
    have the same number of tokens)."""
    try:
        return select(node, clean_tokens)[0]
    except QueryError as clean_error:
        if len(corrupt_tokens) != len(clean_tokens):
            raise
        try:
            return select(node, corrupt_tokens)[0]
        except QueryError:
            raise clean_error from None
