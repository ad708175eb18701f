"""The daemon's wire protocol: frames, messages, arrays, errors. See docs/protocol.md.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack,
which decode to a map. Requests carry `op` and `id`; every reply carries the
request's `id` and a `type`; each request ends with exactly one `done` reply.
Arrays travel as {"dtype", "shape", "data"} with little-endian C-order bytes.

This module imports neither mlx nor, until an array is decoded, numpy and the query
language's results (which own the array form: `array_data` / `array_from_data`), so
clients and the daemon start fast.
"""

from __future__ import annotations

import asyncio
import struct

import msgpack

PROTOCOL_VERSION = 1

OPS = (
    "hello", "exec", "complete", "hover", "modules", "tokens",
    "fetch", "interrupt", "ping", "stats", "shutdown",
)
# Answered on the daemon's event loop, never queued behind running model work.
IMMEDIATE_OPS = ("hello", "interrupt", "ping", "stats", "complete", "hover", "shutdown", "fetch")

# Reply types
PROGRESS, OUT, RESULT, ERROR, DONE = "progress", "out", "result", "error", "done"

# Error codes (the "code" field of an error reply)
BAD_FRAME = "bad_frame"            # not msgpack, or not a map
FRAME_TOO_LARGE = "frame_too_large"
BAD_REQUEST = "bad_request"        # a field missing or of the wrong type
UNKNOWN_OP = "unknown_op"
NEED_HELLO = "need_hello"
BAD_TOKEN = "bad_token"
VERSION_MISMATCH = "version_mismatch"
QUERY_ERROR = "query_error"        # the query language rejected the text (has span, suggestions)
INTERRUPTED = "interrupted"
MODEL_ERROR = "model_error"        # the model failed to load
NOT_FOUND = "not_found"            # unknown fetch handle
INTERNAL = "internal"

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024      # what the daemon accepts from a client
CLIENT_MAX_FRAME = 512 * 1024 * 1024      # what a client accepts from the daemon
FETCH_CHUNK = 1024 * 1024                 # bytes per fetched chunk of a big array
INLINE_ARRAY_LIMIT = 256 * 1024           # arrays bigger than this are summarised


class ProtocolError(Exception):
    """A protocol-level failure, carrying an error `code` from the list above."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def to_data(self) -> dict:
        return {"code": self.code, "message": self.message, **self.extra}


class FrameTooLarge(ProtocolError):
    def __init__(self, size: int, limit: int):
        super().__init__(FRAME_TOO_LARGE, f"frame of {size} bytes exceeds the limit of {limit} bytes",
                         size=size, limit=limit)


# --- frames -------------------------------------------------------------------

def pack(message: dict) -> bytes:
    """One message as a complete frame (header + msgpack body)."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> dict:
    """Decode a frame body; raises ProtocolError(BAD_FRAME) unless it is a msgpack map."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for bad input
        raise ProtocolError(BAD_FRAME, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_FRAME, f"a message must be a msgpack map, got {type(message).__name__}")
    return message


async def read_frame(reader: asyncio.StreamReader, max_size: int = CLIENT_MAX_FRAME) -> bytes | None:
    """The next frame's body, or None at a clean end of stream. Raises FrameTooLarge."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ConnectionResetError("connection closed inside a frame header") from None
    (size,) = HEADER.unpack(header)
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("connection closed inside a frame") from None


def read_frame_sync(sock, max_size: int = CLIENT_MAX_FRAME) -> bytes | None:
    """Blocking twin of `read_frame` for a socket object."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    body = _recv_exactly(sock, size)
    if body is None:
        raise ConnectionResetError("connection closed inside a frame")
    return body


def _recv_exactly(sock, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise ConnectionResetError("connection closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)


# --- messages -----------------------------------------------------------------

def reply(request_id, type_: str, **fields) -> dict:
    return {"id": request_id, "type": type_, **fields}


def error_reply(request_id, code: str, message: str, **extra) -> dict:
    return reply(request_id, ERROR, error={"code": code, "message": message, **extra})


def done_reply(request_id, status: str = "ok", value=None) -> dict:
    message = reply(request_id, DONE, status=status)
    if value is not None:
        message["value"] = value
    return message


# --- arrays -------------------------------------------------------------------

def is_array_data(value) -> bool:
    """True for the wire form of an array: a map with dtype, shape and data (or a fetch handle)."""
    return isinstance(value, dict) and "dtype" in value and "shape" in value and ("data" in value or "handle" in value)


def decode_array(data: dict, data_bytes: bytes | None = None):
    """Wire form -> numpy array (the query language's `array_from_data`, with the bytes of a
    fetched handle when given). bfloat16 (no numpy dtype) comes back as float32."""
    from mlxterp_repl.dsl.results import array_from_data

    if data_bytes is not None:
        data = {**data, "data": data_bytes}
    try:
        return array_from_data(data)
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, str(exc)) from None


def summarise_array(data: dict, handle: str) -> dict:
    """Replace a big array's bytes by a handle plus a few statistics, for fetching later."""
    raw = data["data"]
    summary = {k: v for k, v in data.items() if k != "data"}
    summary.update(handle=handle, nbytes=len(raw))
    try:
        values = decode_array(data).astype("float64", copy=False)
        if values.size:
            summary["stats"] = {
                "min": float(values.min()), "max": float(values.max()),
                "mean": float(values.mean()), "std": float(values.std()),
            }
    except Exception:
        pass
    return summary


def walk_arrays(value, on_array):
    """Rebuild `value` with every array dict replaced by on_array(array_dict)."""
    if is_array_data(value):
        return on_array(value)
    if isinstance(value, dict):
        return {k: walk_arrays(v, on_array) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [walk_arrays(v, on_array) for v in value]
    return value
