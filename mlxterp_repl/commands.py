"""`mlxterp status` and `mlxterp stop`: the daemon seen from the command line.

Both talk to the daemon through the client; `status_text` is also what the REPL's
`:model` shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mlxterp_repl import paths as daemon_files
from mlxterp_repl import spawn
from mlxterp_repl.client import DaemonNotRunning, connect


def _command_parser(name: str, description: str):
    parser = argparse.ArgumentParser(prog=f"mlxterp {name}", description=description)
    parser.add_argument("--runtime-dir", help="the daemon's runtime directory (default: as `mlxterp serve`)")
    parser.add_argument("--socket", help="the daemon's socket path")
    return parser


def _megabytes(n) -> str:
    return f"{n / 1e6:.1f} MB"


def status_text(stats: dict) -> str:
    model = stats.get("model", {})
    lines = [f"daemon {stats['daemon_id']} running (pid {stats['pid']}, up {stats['uptime']:.0f} s)",
             f"socket  {stats['socket']}"]
    if stats.get("tcp"):
        lines.append(f"tcp     {stats['tcp']} (token in the connection file)")
    state = model.get("state", "?")
    detail = ""
    if state == "ready" and "n_layers" in model:
        device = f", on {model['device']}" if model.get("device") else ""
        detail = f" ({model['n_layers']} layers, hidden size {model.get('hidden_size', '?')}{device})"
    elif state == "loading":
        detail = f" ({model.get('message', '')}, {100 * model.get('progress', 0):.0f}%)"
    elif state == "failed":
        detail = f": {model.get('error', '')}"
    lines.append(f"model   {model.get('name', '?')}: {state}{detail}")
    lines.append(f"clients {stats['connections']} connected, {stats['sessions']} with a session, "
                 f"{stats['queued']} queries running or queued")
    cache = stats.get("cache")
    if cache:
        used = cache.get("bytes", cache.get("nbytes"))
        parts = [f"{cache.get('entries', '?')} traces"]
        if used is not None:
            parts.append(f"{_megabytes(used)} of {_megabytes(cache['budget'])}")
        if "hits" in cache:
            parts.append(f"{cache['hits']} hits, {cache.get('misses', 0)} misses")
        lines.append("cache   " + ", ".join(parts))
    if "forward_count" in stats:
        lines.append(f"forward passes run: {stats['forward_count']}")
    idle = stats.get("idle_timeout")
    lines.append(f"stops   after {idle / 60:g} minutes with no client; `mlxterp stop` stops it now" if idle
                 else "stops   only when told: `mlxterp stop`")
    return "\n".join(lines)


def status_main(argv: list[str] | None = None) -> int:
    options = _command_parser("status", "Show whether the daemon runs, its model and clients.").parse_args(argv)
    files = daemon_files.daemon_paths(options.runtime_dir, options.socket)
    try:
        with connect(runtime_dir=options.runtime_dir, socket_path=options.socket, autostart=False) as client:
            print(status_text(client.stats()))
    except (DaemonNotRunning, ConnectionError) as exc:
        stale = " (a stale socket from a dead daemon is there)" if files.socket.exists() else ""
        print(f"no daemon running at {files.socket}{stale}", file=sys.stderr)
        return 1
    return 0


def stop_main(argv: list[str] | None = None) -> int:
    parser = _command_parser("stop", "Stop the daemon.")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait before killing it")
    options = parser.parse_args(argv)
    files = daemon_files.daemon_paths(options.runtime_dir, options.socket)
    info = daemon_files.read_pid_file(files)
    try:
        with connect(runtime_dir=options.runtime_dir, socket_path=options.socket, autostart=False) as client:
            daemon_id, pid = client.hello["daemon_id"], client.hello["pid"]
            client.shutdown()
    except (DaemonNotRunning, ConnectionError):
        if not daemon_files.daemon_alive(files):
            spawn.remove_stale_files(files)
            print(f"no daemon running at {files.socket}", file=sys.stderr)
            return 1
        daemon_id, pid = info.get("daemon_id", "?"), info.get("pid")
        if pid:
            os.kill(pid, 15)
    deadline = time.monotonic() + options.timeout
    while daemon_files.daemon_alive(files) and time.monotonic() < deadline:
        time.sleep(0.02)
    if daemon_files.daemon_alive(files) and pid:
        os.kill(pid, 9)
        time.sleep(0.1)
    spawn.remove_stale_files(files)
    print(f"stopped daemon {daemon_id} (pid {pid})")
    return 0
