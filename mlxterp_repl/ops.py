"""The daemon's ops: one handler per op of `protocol.OPS`, and where each one runs.

Each handler is registered with `@op(name, runs_on=..., needs_session=...)`:

- `runs_on="loop"`: answered on the daemon's event loop, never queued behind model work.
  The handler is called as `handler(daemon, conn, message)` and returns the `done` value.
- `runs_on="worker"`: runs on the ONE model worker thread, one request at a time, in
  order; it can be interrupted by id. Called as `handler(daemon, conn, message, job)`; it
  streams replies with `daemon.send_threadsafe(conn, reply)` (sent at once) or appends them
  to `job.replies` (sent just before its `done`), and returns the `done` value.
- `needs_session=True`: the daemon first waits for the model (sending `progress` replies
  while it loads) and makes the connection's query-language session.
- `check=fields_check`: called as `check(message, daemon)` on the loop as soon as the request
  arrives, before any waiting, so a malformed request is answered at once.

A handler raises `protocol.ProtocolError` for a bad request; the daemon turns it into an
`error` reply and a `done` with status `error` (or `interrupted`).
"""

from __future__ import annotations

import hmac
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlxterp_repl import protocol as p
from mlxterp_repl import sharded


@dataclass(frozen=True)
class Op:
    name: str
    handler: Callable
    runs_on: str = "loop"          # "loop" or "worker"
    needs_session: bool = False
    check: Callable | None = None  # check(message, daemon): raises ProtocolError for bad fields, on the loop


HANDLERS: dict[str, Op] = {}

# Limits of one request (docs/security.md); the daemon's command line can change the exec ones.
MAX_EXEC_CHARS = 1024 * 1024      # characters of query text in one exec
MAX_STATEMENTS = 10_000           # statements in one exec
MAX_EDITOR_INPUT = 256 * 1024     # characters of code/text for complete, hover, tokens


def op(name: str, *, runs_on: str = "loop", needs_session: bool = False, check: Callable | None = None):
    """Register the decorated function as the handler of op `name`."""
    if name not in p.OPS:
        raise ValueError(f"op {name!r} is not in protocol.OPS: add its fields there first")
    if runs_on not in ("loop", "worker"):
        raise ValueError(f"runs_on must be 'loop' or 'worker', got {runs_on!r}")

    def register(handler):
        HANDLERS[name] = Op(name, handler, runs_on, needs_session, check)
        return handler

    return register


# --- answered at once, on the loop ----------------------------------------------

@op("hello")
def hello(daemon, conn, message) -> dict:
    version = message.get("protocol", p.PROTOCOL_VERSION)
    if conn.is_tcp:
        token = message.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), daemon.token.encode()):
            conn.close_after = True
            raise p.ProtocolError(p.BAD_TOKEN, "a TCP client must send the token from the connection file "
                                               f"({daemon.files.connection_file}) in 'hello'")
    if version != p.PROTOCOL_VERSION:
        raise p.ProtocolError(p.VERSION_MISMATCH, f"this daemon speaks protocol {p.PROTOCOL_VERSION}, "
                                                  f"the client asked for {version!r}",
                              protocol=p.PROTOCOL_VERSION)
    workdir = message.get("workdir")
    if isinstance(workdir, str) and os.path.isabs(workdir):
        conn.workdir = Path(workdir)
        daemon.confine(conn)  # a second hello moves an existing session too
    conn.greeted = True
    return {
        "protocol": p.PROTOCOL_VERSION, "ops": list(p.OPS), "daemon_id": daemon.daemon_id, "pid": os.getpid(),
        "session": conn.number, "model": daemon.model_summary(),
        "limits": {"max_frame": daemon.max_frame, "inline_array": p.INLINE_ARRAY_LIMIT, "fetch_chunk": p.FETCH_CHUNK},
    }


@op("ping")
def ping(daemon, conn, message) -> dict:
    return {"pong": True, "time": time.time()}


@op("stats")
def stats(daemon, conn, message) -> dict:
    info = {
        "daemon_id": daemon.daemon_id, "pid": os.getpid(), "uptime": time.time() - daemon.started,
        "socket": str(daemon.files.socket), "connections": len(daemon.connections),
        "sessions": sum(1 for c in daemon.connections.values() if c.session is not None),
        "queued": daemon.queued, "model": daemon.model_summary(),
        "idle_timeout": daemon.idle_timeout,  # seconds with no client before it stops; None: never
    }
    if daemon.tcp_address:
        info["tcp"] = p.format_host_port(*daemon.tcp_address)
    if daemon.model is not None:
        info["forward_count"] = int(getattr(daemon.model, "forward_count", 0))
    if daemon.trace_cache is not None:
        info["cache"] = daemon.trace_cache.report(shapes=False)  # (shapes: on the loop, while the worker writes)
    return info


@op("interrupt")
def interrupt(daemon, conn, message) -> dict:
    target = message.get("target")
    if not isinstance(target, (str, int)) or isinstance(target, bool):
        raise p.ProtocolError(p.BAD_REQUEST, "'target' must be the id (string or integer) of a request to stop")
    job = conn.jobs.get(target)
    if job is None:
        return {"interrupted": False, "reason": f"no running request with id {target!r} on this connection"}
    job.interrupt()
    return {"interrupted": True}


@op("fetch")
def fetch(daemon, conn, message) -> dict:
    handle = require(message, "handle", str)
    offset = message.get("offset", 0)
    size = message.get("size", p.FETCH_CHUNK)
    if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size <= 0:
        raise p.ProtocolError(p.BAD_REQUEST, "'offset' must be an integer >= 0 and 'size' an integer > 0")
    blob = conn.blobs.get(handle)
    if blob is None:
        raise p.ProtocolError(p.NOT_FOUND, f"no array with handle {handle!r} (handles live as long as "
                                           "their connection, and old ones are dropped past the budget)")
    size = min(size, p.FETCH_CHUNK * 8, daemon.max_frame)
    return {"data": blob[offset:offset + size], "offset": offset, "total": len(blob)}


@op("shutdown")
def shutdown(daemon, conn, message) -> dict:
    daemon.stop_soon()
    return {"stopping": True}


# --- on the loop, once the model is loaded ----------------------------------------

@op("modules", needs_session=True)
def modules(daemon, conn, message) -> dict:
    model = conn.session.model
    shapes = conn.output_shapes or shapes_elsewhere(daemon, model)
    entries = []
    for info in daemon.module_infos.get(id(model), []):
        entry = dict(info)
        if info.get("full_name") in shapes:
            entry["shape"] = shapes[info["full_name"]]
        entries.append(entry)
    answer = {"modules": entries, "n_layers": model.n_layers, "hidden_size": model.hidden_size}
    names = getattr(model, "names", None)
    if getattr(names, "table", None) is not None:
        answer["table"] = names.table.to_data()  # mlxterp.core.paths.NameTable, for the language server
    return answer


def shapes_elsewhere(daemon, model) -> dict:
    """Output shapes of the last trace another session ran on `model` (a notebook's, for the
    language server's hover in Python files), or {}."""
    for other in reversed(list(daemon.connections.values())):
        if other.output_shapes and other.session is not None and other.session.model is model:
            return other.output_shapes
    return {}


def tokens_check(message: dict, daemon=None) -> None:
    text = message.get("text")
    if text is not None and not isinstance(text, str):
        raise p.ProtocolError(p.BAD_REQUEST, "'text' must be a string (or absent for the session's prompt)",
                              field="text")
    if text is not None:
        within(text, MAX_EDITOR_INPUT, "text")


@op("tokens", needs_session=True, check=tokens_check)
def tokens(daemon, conn, message) -> dict:
    text = message.get("text")
    session = conn.session
    model = session.model
    if text is None:
        text = session.prompt
        if text is None:
            return {"text": None, "ids": [], "strings": []}
    if model.tokenizer is None:
        raise p.ProtocolError(p.BAD_REQUEST, "this model has no tokenizer")
    ids = model.encode(text)
    return {"text": text, "ids": list(ids), "strings": model.token_strings(ids)}


@op("complete", needs_session=True, check=lambda message, daemon: code_and_offset(message))
def complete(daemon, conn, message) -> dict:
    from mlxterp_repl.dsl import complete as dsl_complete

    code, offset = code_and_offset(message)
    items = dsl_complete(code, offset, daemon.completion_context(conn.session))
    return {"items": [{"label": c.label, "kind": c.kind, "detail": c.detail, "insert_text": c.insert_text,
                       "start": c.start} for c in items]}


@op("hover", needs_session=True, check=lambda message, daemon: code_and_offset(message))
def hover(daemon, conn, message):
    code, offset = code_and_offset(message)
    session = conn.session
    return hover_text(code, offset, daemon.module_infos.get(id(session.model), []), conn.output_shapes, session)


# --- on the model worker --------------------------------------------------------

def exec_check(message: dict, daemon) -> None:
    within(require(message, "code", str), daemon.max_exec_chars, "code", "--max-exec-chars")
    workdir = message.get("workdir")
    if workdir is not None and not (isinstance(workdir, str) and os.path.isabs(workdir)):
        raise p.ProtocolError(p.BAD_REQUEST, "'workdir' must be an absolute directory path (where files "
                                             "the query writes go)", field="workdir")


@op("exec", runs_on="worker", needs_session=True, check=exec_check)
def exec_(daemon, conn, message, job) -> None:
    """Run query-language text in the connection's session; one `result` reply per statement."""
    code = message["code"]
    full = bool(message.get("full", False))
    with_text = bool(message.get("text", False))
    workdir = message.get("workdir")
    if workdir is not None and not conn.is_tcp:  # (a TCP client's directory means nothing here)
        conn.workdir = Path(workdir)
        daemon.confine(conn)
    results, error = run_query(daemon, conn, job, code, with_text)
    for index, data in enumerate(results):
        job.replies.append(p.reply(job.request_id, p.RESULT, index=index, result=daemon.shrink(conn, data, full)))
    if error is not None:
        raise error
    return None


def bind_check(message: dict, daemon=None) -> None:
    require(message, "name", str)
    if not p.is_array_data(message.get("array")):
        raise p.ProtocolError(p.BAD_REQUEST, "'array' must be an array ({dtype, shape, data}; a client sends a "
                                             "numpy array as one)", field="array")
    label = message.get("label")
    if label is not None and not isinstance(label, str):
        raise p.ProtocolError(p.BAD_REQUEST, "'label' must be a string", field="label")


@op("bind", runs_on="worker", needs_session=True, check=bind_check)
def bind(daemon, conn, message, job) -> dict:
    """Set the session's `$name` to an array sent by the client (a notebook's Python value)."""
    try:
        result = conn.session.bind(message["name"], p.decode_array(message["array"]), message.get("label"))
    except ValueError as error:
        raise p.ProtocolError(p.BAD_REQUEST, str(error), field="name") from None
    return result.to_data()


def run_query(daemon, conn, job, code: str, with_text: bool = False):
    """Run `code` in the connection's session. Returns (result datas, error or None)."""
    from mlxterp import distributed
    from mlxterp.errors import Interrupted, MlxterpError
    from mlxterp_repl.dsl import QueryError

    def on_progress(*args, **kwargs):
        if "out" in kwargs:  # text a statement streams as it goes (the tokens of `generate`)
            daemon.send_threadsafe(conn, p.reply(job.request_id, p.OUT, text=str(kwargs["out"])))
            return
        daemon.send_threadsafe(conn, p.reply(job.request_id, p.PROGRESS, **progress_fields(args, kwargs)))

    try:
        try:
            should_stop = job.stop.is_set
            if daemon.shard:  # every process runs the query; they agree at each check on stopping (all or none)
                sharded.announce({"op": "exec", "conn": conn.number, "code": code}, daemon.group)
                should_stop = distributed.agreed_stop(should_stop, daemon.group)
            results = conn.session.execute(code, should_stop=should_stop, on_progress=on_progress,
                                           trace_cache=daemon.trace_cache, max_statements=daemon.max_statements)
        finally:
            daemon.note_model(conn)
        return [r.to_data(text=with_text) for r in results], None
    except Interrupted as exc:
        # Only raised where the work stopped: the reply says `interrupted` then, and only then.
        partial = [r.to_data(text=with_text) for r in getattr(exc, "results", None) or []]
        return partial, p.ProtocolError(p.INTERRUPTED, f"interrupted: {exc}" if str(exc) else "interrupted")
    except QueryError as exc:
        partial = [r.to_data(text=with_text) for r in getattr(exc, "results", None) or []]
        return partial, p.ProtocolError(p.QUERY_ERROR, exc.message, **without_message(exc.to_data()))
    except MlxterpError as exc:
        return [], p.ProtocolError(p.QUERY_ERROR, str(exc), suggestions=list(getattr(exc, "suggestions", [])))
    except RecursionError:
        return [], p.ProtocolError(p.QUERY_ERROR, "the query is nested too deeply to evaluate; split the "
                                                  "expression into several `let` statements")
    # Anything else is a bug: the daemon logs it and answers `internal`.


# --- checking request fields ----------------------------------------------------

def require(message: dict, field: str, kind: type):
    value = message.get(field)
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "nothing" if value is None else type(value).__name__
        raise p.ProtocolError(p.BAD_REQUEST, f"'{field}' must be a {kind.__name__}, got {got}", field=field)
    return value


def within(text: str, limit: int, field: str, option: str | None = None) -> str:
    if len(text) > limit:
        how = f" (the daemon's {option})" if option else ""
        raise p.ProtocolError(p.TOO_LARGE, f"'{field}' has {len(text):,} characters; the limit is {limit:,}{how}",
                              field=field, limit=limit)
    return text


def code_and_offset(message: dict) -> tuple[str, int]:
    code = within(require(message, "code", str), MAX_EDITOR_INPUT, "code")
    offset = message.get("offset", len(code))
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= len(code):
        raise p.ProtocolError(p.BAD_REQUEST, f"'offset' must be an integer from 0 to {len(code)} (a character "
                                             "index into 'code')", field="offset")
    return code, offset


def without_message(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "message"}


def progress_fields(args, kwargs) -> dict:
    """Whatever the query language reports as progress, as plain fields."""
    fields = {}
    for arg in args:
        if isinstance(arg, str):
            fields["message"] = arg
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            fields["fraction"] = float(arg)
        elif isinstance(arg, dict):
            fields.update(arg)
    for key, value in kwargs.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            fields[key] = value
    return fields


_WORD = re.compile(r"[$A-Za-z0-9_.\[\],*-]+")


def hover_text(code: str, offset: int, module_info, shapes, session):
    """What a hover shows for the word under `offset`: a module, a $variable, or nothing."""
    for match in _WORD.finditer(code):
        if match.start() <= offset <= match.end():
            word = match.group().strip(".,")
            break
    else:
        return None
    if word.startswith("$"):
        value = session.variables.get(word[1:])
        if value is None:
            return {"text": f"`{word}`: not set in this session", "word": word}
        return {"text": f"`{word}`: {value.summary(80)}", "word": word}
    try:
        full = session.model.resolve(word)
    except Exception:
        return None
    info = next((m for m in module_info if m.get("full_name") == full), None)
    if info is None:
        return None
    lines = [f"**{info.get('name', word)}** `{info.get('type', '?')}`", f"parameters: {info.get('params', 0):,}",
             f"full name: `{full}`"]
    shape = shapes.get(full) or shapes.get(info.get("name"))
    if shape is not None:
        lines.append(f"output shape: {tuple(shape)}")
    return {"text": "\n\n".join(lines), "word": word, "module": info.get("name")}
