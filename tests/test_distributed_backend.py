"""Which mx.distributed backend mlxterp starts: the env var, NCCL on CUDA when launched for it, else any."""

import subprocess
import sys

import pytest

from mlxterp import distributed


def test_backend_defaults_to_any_on_cpu(monkeypatch):
    monkeypatch.delenv("MLXTERP_DISTRIBUTED_BACKEND", raising=False)
    monkeypatch.setenv("NCCL_HOST_IP", "127.0.0.1")  # even when launched for NCCL: there is no GPU here
    assert distributed.backend_choice() == "any"


def test_backend_named_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MLXTERP_DISTRIBUTED_BACKEND", "Ring")
    assert distributed.backend_choice() == "ring"


def test_unknown_backend_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("MLXTERP_DISTRIBUTED_BACKEND", "gloo")
    with pytest.raises(ValueError, match="valid: any, ring, mpi, nccl, jaccl"):
        distributed.backend_choice()


def test_one_process_alone_is_a_group_of_one():
    code = "from mlxterp.distributed import world; g = world(); print(g.size(), g.rank())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0"]
