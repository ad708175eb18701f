"""`mlxterp run` goes through the daemon by default and prints exactly what `--local` prints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from daemon_support import MODEL, daemon_env
from mlxterp_repl import paths as daemon_files

SCRIPT = """\
prompt "The capital of France is"
tokens
save layers.8 @ "France"
lens @ -1 top 3
stats layers.0..2 @ -1
save layers.*.mlp @ -1 as $mlps
export $mlps to out/mlps.npz overwrite
save layrs.8 \\
  @ -1
predict layers.15 @ -1 top 3
"""


TOUR = Path(__file__).resolve().parent.parent / "examples" / "tour.mlxq"


def mlxterp_run(tmp_path, *flags, script="script.mlxq"):
    return subprocess.run(
        [sys.executable, "-m", "mlxterp_repl.cli", "run", str(script), "--model", MODEL, "--keep-going", *flags],
        cwd=tmp_path, env=daemon_env(tmp_path / "rt"), capture_output=True, text=True, timeout=120)


def test_run_through_the_daemon_prints_exactly_what_local_prints(tmp_path):
    (tmp_path / "script.mlxq").write_text(SCRIPT)
    files = daemon_files.daemon_paths(tmp_path / "rt")
    try:
        outputs = {}
        for flags in ([], ["--json"]):
            remote = mlxterp_run(tmp_path, *flags)
            assert daemon_files.daemon_alive(files), remote.stderr  # the run started the daemon
            local = mlxterp_run(tmp_path, "--local", *flags)
            assert remote.returncode == local.returncode == 1, local.stderr[-3000:]
            assert local.stdout, local.stderr[-3000:]
            assert remote.stdout == local.stdout
            assert remote.stderr == local.stderr
            outputs[bool(flags)] = remote
        # an error in a continued statement points into the whole script, as in-process
        assert outputs[False].stderr.startswith("line 8, column 6: no module named 'layrs.8'")
        assert "10: predict layers.15 @ -1 top 3" in outputs[False].stdout  # --keep-going went on
        assert outputs[True].stdout.count('"ok": ') == 9
        # files a query writes land where the client runs, not in the daemon's directory
        assert (tmp_path / "out" / "mlps.npz").exists()
    finally:
        pid = daemon_files.read_pid_file(files).get("pid")
        if pid:
            os.kill(pid, signal.SIGTERM)


def test_the_tour_prints_the_same_bytes_through_the_daemon_and_locally(tmp_path):
    """Every statement of examples/tour.mlxq; on a fresh daemon, so `info`'s trace cache
    line (empty at that point) reads as in the local run."""
    files = daemon_files.daemon_paths(tmp_path / "rt")
    try:
        remote = mlxterp_run(tmp_path, script=TOUR)
        local = mlxterp_run(tmp_path, "--local", script=TOUR)
        assert remote.returncode == local.returncode == 0, (remote.stderr[-3000:], local.stderr[-3000:])
        assert remote.stdout == local.stdout and remote.stderr == local.stderr
        assert "trace cache │ 0 entries, 0.0 MiB used of 512 MiB" in local.stdout
        assert "│ norm(layers.6) │    () │" in local.stdout  # a 0-d array stays 0-d through the daemon
        assert local.stdout.count("\n") > 300 and "logit lens" in local.stdout and "patching mlp" in local.stdout
    finally:
        pid = daemon_files.read_pid_file(files).get("pid")
        if pid:
            os.kill(pid, signal.SIGTERM)
