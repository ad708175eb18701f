"""Past one machine: the few collectives mlxterp needs on top of ``mx.distributed``.

mlxterp writes no transport of its own. Processes are started by ``mlx.launch``
(ring, MPI, ... backends) and talk through ``mx.distributed``; this module
holds what the library builds on it:

* ``world()``, ``barrier()``, ``broadcast_bytes()``, ``all_gather_bytes()``:
  plain data (JSON, requests) between the processes of a group.
* ``share()``: an activation computed by one process made available on every
  process (the owner contributes the value, the others zeros, one ``all_sum``).
* ``agreed_stop()``: a ``should_stop`` all processes agree on (one ``all_sum`` of
  a 0/1 flag per check), so a split forward pass is interrupted everywhere or nowhere.
* ``tensor_group()``: the group of a model split with mlx-lm's tensor
  parallelism (``model.shard(group)``); every process holds every module.
* ``pipeline_size()`` and ``complete_pipeline_names()``: a model split with
  mlx-lm's pipeline parallelism (``model.model.pipeline(group)``) holds only its
  own layers (``None`` for the layers other processes own); the module table is
  gathered from every process so that names are the same everywhere.

Every function here is collective: all processes of the group call it, in the
same order, or the program waits forever. That is how scripts under
``mlx.launch`` run anyway (each process runs the same script).
"""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn

# Codes for dtypes in the headers share() exchanges.
DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.int64, mx.uint32, mx.uint8, mx.bool_, mx.int8,
          mx.int16, mx.uint16, mx.uint64, mx.float64, mx.complex64]
MAX_DIMS = 8


BACKENDS = ("any", "ring", "mpi", "nccl", "jaccl")


def backend_choice() -> str:
    """The ``mx.distributed`` backend to start: ``MLXTERP_DISTRIBUTED_BACKEND`` when set; on an NVIDIA GPU
    ``nccl`` when this MLX build has it (GPU-to-GPU collectives; ``mlx.launch --backend nccl``); else ``any``
    (whatever ``mlx.launch`` set up: ring, MPI, ...)."""
    wanted = os.environ.get("MLXTERP_DISTRIBUTED_BACKEND", "").strip().lower()
    if wanted:
        if wanted not in BACKENDS:
            raise ValueError(f"MLXTERP_DISTRIBUTED_BACKEND={wanted!r} is not a backend; valid: {', '.join(BACKENDS)}")
        return wanted
    on_cuda = hasattr(mx, "cuda") and mx.cuda.is_available()
    if on_cuda and mx.distributed.is_available(backend="nccl") and _launched_for("nccl"):
        return "nccl"
    return "any"


def _launched_for(backend: str) -> bool:
    """Whether the environment of this process was set up by a launcher for ``backend``."""
    if backend == "nccl":
        return bool(os.environ.get("NCCL_HOST_IP"))
    return False


def init_world():
    """The global group of the processes ``mlx.launch`` started, on the backend ``backend_choice()``
    names (a group of size 1 when the process runs alone)."""
    return mx.distributed.init(backend=backend_choice())


def world(group=None):
    """The group to use: ``group`` as given, else the global one started by ``mlx.launch`` (size 1 alone)."""
    if group is not None:
        return group
    return init_world()


def is_distributed(group) -> bool:
    return group is not None and group.size() > 1


def barrier(group) -> None:
    """Return once every process of ``group`` got here."""
    if is_distributed(group):
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))


def broadcast_bytes(data: bytes | None, group, root: int = 0) -> bytes:
    """``data`` of process ``root`` on every process (the others pass None)."""
    if not is_distributed(group):
        return data or b""
    mine = group.rank() == root
    length = mx.distributed.all_sum(mx.array(len(data) if mine else 0), group=group).item()
    if length == 0:
        return b""
    payload = mx.array(list(data), dtype=mx.uint8) if mine else mx.zeros((length,), dtype=mx.uint8)
    out = mx.distributed.all_sum(payload, group=group)
    mx.eval(out)
    return bytes(memoryview(out))


def broadcast_json(value, group, root: int = 0):
    data = json.dumps(value).encode() if group is None or group.rank() == root else None
    return json.loads(broadcast_bytes(data, group, root) or b"null")


def all_gather_bytes(data: bytes, group) -> list[bytes]:
    """Every process's ``data``, in rank order, on every process."""
    if not is_distributed(group):
        return [data]
    size = group.size()
    lengths = mx.zeros((size,), dtype=mx.int32)
    lengths[group.rank()] = len(data)
    lengths = mx.distributed.all_sum(lengths, group=group).tolist()
    longest = max(lengths) or 1
    padded = mx.array(list(data) + [0] * (longest - len(data)), dtype=mx.uint8)
    gathered = mx.distributed.all_gather(padded, group=group)
    mx.eval(gathered)
    raw = bytes(memoryview(gathered))
    return [raw[r * longest: r * longest + lengths[r]] for r in range(size)]


def share(value: mx.array | None, group) -> mx.array | None:
    """The array one or more processes hold, on every process; None when no process holds it.

    Processes that hold it pass it, the others pass None. When several hold
    it (modules every pipeline stage runs, like the embedding or the final
    norm) each keeps its own; otherwise the value of the highest rank holding
    it is sent to all. The result is evaluated, so collectives stay in the same
    order on every process.
    """
    if not is_distributed(group):
        return value
    if not isinstance(value, mx.array):
        value = None  # a module output that is not an array stays where it was computed
    size, rank = group.size(), group.rank()
    header = mx.zeros((size, MAX_DIMS + 3), dtype=mx.int64)
    if value is not None:
        if value.ndim > MAX_DIMS:
            raise ValueError(f"cannot share arrays of more than {MAX_DIMS} dimensions (got {value.ndim})")
        row = [1, value.ndim, DTYPES.index(value.dtype)] + list(value.shape) + [0] * (MAX_DIMS - value.ndim)
        header[rank] = mx.array(row, dtype=mx.int64)
    header = mx.distributed.all_sum(header, group=group).tolist()
    holders = [r for r in range(size) if header[r][0]]
    if not holders:
        return None
    if len(holders) == size:
        return value
    owner = holders[-1]
    ndim, dtype = header[owner][1], DTYPES[header[owner][2]]
    shape = tuple(header[owner][3:3 + ndim])
    mine = value if rank == owner else mx.zeros(shape, dtype=dtype)
    out = mx.distributed.all_sum(mine, group=group)
    mx.eval(out)
    return out


class AgreedStop:
    """A ``should_stop`` that every process of ``group`` calls at the same points of the same work.

    Each call adds up the processes' own answers (``local()``, 0 or 1; a process
    without one says 0): all processes get True as soon as any of them says
    stop, so they all stop at the same point or none does.
    """

    def __init__(self, local, group):
        self.local = local
        self.group = group

    def __call__(self) -> bool:
        flag = 1 if self.local is not None and self.local() else 0
        return mx.distributed.all_sum(mx.array(flag), group=self.group).item() > 0


def agreed_stop(should_stop, group):
    """``should_stop`` made collective over ``group``; as given when ``group`` is not split or it already is."""
    if isinstance(should_stop, AgreedStop) or not is_distributed(group):
        return should_stop
    return AgreedStop(should_stop, group)


# -- pipeline-sharded models (mlx-lm's PipelineMixin) ----------------------------------

def pipeline_size(root: nn.Module) -> int:
    """How many processes a model split with mlx-lm's ``pipeline()`` is spread over (1 when it is not)."""
    for _, module in root.named_modules():
        size = getattr(module, "pipeline_size", 1)
        if isinstance(size, int) and size > 1:
            return size
    return 1


def tensor_group(root: nn.Module):
    """The group a model split with tensor parallelism (mlx-lm's ``model.shard(group)``) runs on, or None."""
    for _, module in root.named_modules():
        for attr in ("group", "sharding_group"):
            group = getattr(module, attr, None)
            if isinstance(group, mx.distributed.Group) and group.size() > 1:
                return group
    return None


class RemoteModule(nn.Module):
    """A module another process of a pipeline holds: it has a name and a type here, no weights."""

    def __init__(self, type_name: str, params: int):
        super().__init__()
        self.type_name = type_name
        self.remote_params = params

    def __repr__(self) -> str:
        return f"{self.type_name}(on another process)"


_remote_classes: dict[tuple[str, bool], type] = {}


def remote_module(type_name: str, is_callable: bool, params: int) -> RemoteModule:
    cls = _remote_classes.get((type_name, is_callable))
    if cls is None:
        attrs = {"__module__": __name__}
        if is_callable:
            def __call__(self, *args, **kwargs):
                raise RuntimeError(f"{self.type_name} runs on another process of the pipeline")
            attrs["__call__"] = __call__
        cls = type(type_name, (RemoteModule,), attrs)
        _remote_classes[(type_name, is_callable)] = cls
    return cls(type_name, params)


def complete_pipeline_names(names, group) -> None:
    """Make ``names`` (a ``ModuleNames``) list the modules of every process, in the model's order.

    Each process describes the modules it holds; the union, ordered as in the
    unsplit model (modules before the layers, the layers in order, modules
    after), replaces the local table. Modules held elsewhere become
    ``RemoteModule`` placeholders.
    """
    from mlx.utils import tree_flatten

    table = []
    seen_layer = False
    for full, module in names.modules.items():
        layer = names.layer_index(full)
        seen_layer = seen_layer or layer is not None
        part = 1 if layer is not None else (2 if seen_layer else 0)
        params = sum(v.size for _, v in tree_flatten(module.parameters()))
        table.append([full, type(module).__name__, callable(module), params, part, layer])
    tables = [json.loads(raw) for raw in all_gather_bytes(json.dumps(table).encode(), group)]

    merged: dict[str, tuple] = {}
    for owner_table in tables:
        for position, (full, type_name, is_callable, params, part, layer) in enumerate(owner_table):
            if full not in merged:
                key = (part, layer if layer is not None else 0, position)
                merged[full] = (key, type_name, is_callable, params)
    n_layers = 1 + max((entry[0][1] for entry in merged.values() if entry[0][0] == 1), default=-1)
    modules = {}
    for full, (_, type_name, is_callable, params) in sorted(merged.items(), key=lambda item: item[1][0]):
        local = names.modules.get(full)
        modules[full] = local if local is not None else remote_module(type_name, is_callable, params)
    names.set_table(modules, n_layers)
