"""The daemon over a model split across processes: `mlx.launch ... mlxterp serve --shard pipeline|tensor`.

Every process loads its part of the model with mlx-lm's ``sharded_load``
(pipeline or tensor parallelism). Process 0 runs the ordinary daemon: it
listens, serves clients and answers everything that does not run the model
(modules, tokens, completion, hover) alone. Each query it runs is first
announced to the other processes (a broadcast over ``mx.distributed``, from
the daemon's one worker thread, so announcements keep their order); they run
the same query in their copy of the client's session, which makes their part
of every forward pass happen. Their results are dropped: process 0 answers.

A running query can be interrupted: every process runs it with the same
collective ``should_stop`` (``mlxterp.distributed.agreed_stop``; process 0's
answers whether the client asked to stop), so all stop at the same check or
none does. Limits, by design: the trace cache is off (a hit on one process and
a miss on another would leave the others waiting); files the query language
writes (export, plots) are written by process 0 only.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

MODES = ("pipeline", "tensor")


def start():
    """The group `mlx.launch` started; a clear exit when there is none."""
    from mlxterp.distributed import init_world

    group = init_world()
    if group.size() < 2:
        raise SystemExit(
            "mlxterp serve --shard splits the model over several processes: start it with mlx.launch, e.g. "
            "`mlx.launch -n 2 --backend ring -- mlxterp serve --model DIR --shard pipeline`"
        )
    return group


def load(spec: str, mode: str, group):
    """This process's part of model ``spec`` (demo, an mlx-lm directory or a hub id), wrapped for tracing."""
    from mlx_lm.utils import sharded_load

    from mlxterp import InterpretableModel, loading
    from mlxterp.errors import MlxterpError

    if mode not in MODES:
        raise MlxterpError(f"unknown sharding {mode!r}; choose pipeline or tensor")
    path = loading.demo_path() if spec == "demo" else spec
    groups = {"pipeline_group": group} if mode == "pipeline" else {"tensor_group": group}
    try:
        base, tokenizer = sharded_load(str(path), **groups)
    except Exception as exc:  # mlx-lm says which sharding the architecture lacks
        raise MlxterpError(f"could not load {spec!r} with {mode} parallelism: {type(exc).__name__}: {exc}") from exc
    model = InterpretableModel(base, tokenizer=tokenizer)
    model.source = f"{spec} ({mode} over {group.size()} processes, this is process {group.rank()})"
    return model


def announce(message: dict, group) -> None:
    """Process 0: tell the other processes what to run next (call from the daemon's worker thread)."""
    from mlxterp import distributed

    distributed.broadcast_json(message, group)


def follow(spec: str, mode: str, group) -> int:
    """Processes 1..N-1: load the model, then run every query process 0 announces, until it stops."""
    from mlxterp import distributed
    from mlxterp_repl.dsl import Session

    model = load(spec, mode, group)
    sessions: dict = {}
    scratch = tempfile.mkdtemp(prefix=f"mlxterp-rank{group.rank()}-")
    while True:
        message = distributed.broadcast_json(None, group)
        op = message.get("op") if isinstance(message, dict) else None
        if op == "stop":
            return 0
        if op == "close":
            sessions.pop(message.get("conn"), None)
        elif op == "exec":
            session = sessions.get(message["conn"])
            if session is None:
                session = sessions[message["conn"]] = Session(model)
                session.workdir = Path(scratch)  # what queries write here is process 0's to write
            try:
                for result in session.execute(message["code"], should_stop=distributed.agreed_stop(None, group)):
                    result.to_data()
            except Exception as exc:  # noqa: BLE001 -- process 0 hits the same error and reports it
                print(f"process {group.rank()}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
