"""Which mx.distributed backend mlxterp starts: the env var, NCCL on CUDA when launched for it, else any."""

import subprocess
import sys
import types

import pytest

from mlxterp import distributed


def gpu_with_nccl(monkeypatch, present: bool):
    """Make this MLX look like a CUDA build on an NVIDIA GPU with NCCL (or like none)."""
    cuda = getattr(distributed.mx, "cuda", None)
    if cuda is None:
        monkeypatch.setattr(distributed.mx, "cuda", types.SimpleNamespace(), raising=False)
        cuda = distributed.mx.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: present)
    monkeypatch.setattr(distributed.mx.distributed, "is_available", lambda backend="any": present or backend != "nccl")


def test_backend_defaults_to_any_without_a_gpu(monkeypatch):
    monkeypatch.delenv("MLXTERP_DISTRIBUTED_BACKEND", raising=False)
    monkeypatch.setenv("NCCL_HOST_IP", "127.0.0.1")  # even when launched for NCCL: there is no GPU
    gpu_with_nccl(monkeypatch, False)
    assert distributed.backend_choice() == "any"


def test_backend_is_nccl_on_a_gpu_when_launched_for_it(monkeypatch):
    # (On the H200 machine this held without the stand-ins: its MLX-CUDA build has NCCL.)
    monkeypatch.delenv("MLXTERP_DISTRIBUTED_BACKEND", raising=False)
    gpu_with_nccl(monkeypatch, True)
    monkeypatch.setenv("NCCL_HOST_IP", "127.0.0.1")
    assert distributed.backend_choice() == "nccl"
    monkeypatch.delenv("NCCL_HOST_IP")
    assert distributed.backend_choice() == "any"  # a GPU alone is no launch for NCCL


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
