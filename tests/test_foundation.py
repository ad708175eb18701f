"""The `mlxterp` command's foundation: --version, the BLAS switch, the subcommand table, the Makefile."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxterp_repl import blas, cli

REPO = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


def mlxterp_script():
    """The installed console script (next to this Python), not an import of the module."""
    script = shutil.which("mlxterp", path=str(Path(sys.executable).parent))
    assert script, f"the mlxterp console script is not installed next to {sys.executable}"
    return script


def clean_env(**extra):
    """Environment without any BLAS preload or mlxterp switches, plus extra."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MLXTERP_")}
    env.update(extra)
    return env


def version_output(env):
    done = subprocess.run([mlxterp_script(), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_version_names_versions_and_a_blas():
    out = version_output(clean_env())
    assert out.startswith("mlxterp ")
    assert "mlx " in out
    blas_lines = [line for line in out.splitlines() if line.startswith("BLAS: ")]
    assert len(blas_lines) == 1, out
    assert any(name in blas_lines[0] for name in ("OpenBLAS", "reference BLAS bundled with MLX", "Accelerate")), out


@pytest.mark.skipif(not LINUX, reason="the OpenBLAS switch is for Linux")
def test_command_restarts_with_system_openblas():
    if blas.find_openblas() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have OpenBLAS (.ci/run installs libopenblas0-pthread)")
        pytest.skip("no system OpenBLAS on this machine")
    out = version_output(clean_env())
    assert "BLAS: OpenBLAS (" in out, out


def mlx_cpu_wheel() -> bool:
    """MLX's Linux CPU wheel (it bundles a reference BLAS), not its CUDA build."""
    import importlib.metadata

    try:
        importlib.metadata.version("mlx-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not LINUX, reason="the bundled reference BLAS is the Linux CPU wheel's")
def test_opt_out_keeps_mlx_bundled_blas():
    out = version_output(clean_env(MLXTERP_NO_OPENBLAS="1"))
    if mlx_cpu_wheel():
        assert "BLAS: reference BLAS bundled with MLX" in out, out
    else:  # MLX's CUDA build: matrix products run on the GPU (on the H200 machine: libcublas mapped)
        assert "BLAS: " in out and "cuBLAS" in out, out
    assert "libopenblas" not in out


def test_restarted_process_does_not_restart_again():
    assert blas.should_reexec({blas.REEXEC_GUARD_VAR: "1"}) is None


def test_opt_out_values():
    assert blas.opted_out({"MLXTERP_NO_OPENBLAS": "1"})
    assert blas.opted_out({"MLXTERP_NO_OPENBLAS": "yes"})
    assert not blas.opted_out({"MLXTERP_NO_OPENBLAS": "0"})
    assert not blas.opted_out({})


def test_no_restart_when_openblas_already_preloaded():
    assert blas.should_reexec({"LD_PRELOAD": "/opt/lib/libopenblas.so.0"}) is None


def test_preload_keeps_existing_preloads_and_sets_guard():
    env = blas.preload_environment("/x/libopenblas.so.0", {"LD_PRELOAD": "/y/libfoo.so", "HOME": "/h"})
    assert env["LD_PRELOAD"] == "/x/libopenblas.so.0 /y/libfoo.so"
    assert env[blas.REEXEC_GUARD_VAR] == "1"
    assert env["HOME"] == "/h"


WRITTEN = [(name, target) for name, _summary, target in cli.COMMANDS if target is not None]


@pytest.mark.parametrize("name,target", WRITTEN)
def test_subcommand_target_is_importable(name, target):
    module_name, function_name = target.split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name)), target


def test_every_planned_subcommand_is_registered():
    names = [name for name, _summary, _target in cli.COMMANDS]
    assert names == ["run", "serve", "status", "stop", "repl", "lsp", "collect"]


def test_unknown_subcommand_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'evaluate'" in err and "'run'" in err and "'repl'" in err


def make_dry_run(*args):
    assert shutil.which("make"), "make is needed for the two commands"
    done = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_targets_run_the_tour_the_suite_and_the_docs():
    assert "mlxterp run examples/tour.mlxq" in make_dry_run("demo")
    assert "-m pytest" in make_dry_run("test")
    assert "mkdocs build --strict" in make_dry_run("docs")


def test_make_reinstalls_venv_when_pyproject_changes():
    # -W pretends pyproject.toml was just edited: the stamp is stale, so the install runs first.
    out = make_dry_run("-W", "pyproject.toml", "test")
    assert 'pip install -e ".[cpu,viz,docs,dev,train]"' in out  # cpu: MLX's backend on Linux
    assert out.index("pip install -e") < out.index("-m pytest")


def test_ci_script_is_strict_bash_running_make_test():
    script = REPO / ".ci" / "run"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert text.rstrip().endswith("make test")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_mlx_backends_on_linux_are_extras_one_per_environment():
    """MLX's Linux wheels (mlx-cpu, mlx-cuda-12, mlx-cuda-13) all provide mlx/lib/libmlx.so: with two
    installed, whichever pip wrote last runs (seen here: mlx[cpu] and mlx[cuda13] together left the
    CPU library or the CUDA one depending on how they were named). So no Linux backend is a base
    dependency, and each extra brings exactly one."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0].strip()
        if name.startswith("mlx") and not name.startswith("mlx-lm"):
            assert "sys_platform == 'darwin'" in requirement, requirement
    extras = project["optional-dependencies"]
    backends = {}
    for extra in ("cpu", "cuda", "cuda12", "cuda13"):
        mlx = [r.split(";")[0].strip() for r in extras[extra] if r.startswith("mlx[")]
        assert len(mlx) == 1, (extra, extras[extra])
        backends[extra] = mlx[0]
    assert backends == {"cpu": "mlx[cpu]", "cuda": "mlx[cuda12]", "cuda12": "mlx[cuda12]", "cuda13": "mlx[cuda13]"}
    assert not any(r.startswith("mlx[") for extra in ("viz", "docs", "dev", "train") for r in extras[extra])


def test_a_missing_mlx_names_the_extras_to_install():
    code = ("import importlib.abc, sys\n"  # as if no backend extra had been installed: no mlx package
            "class NoMLX(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'mlx' or name.startswith('mlx.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoMLX())\n"
            "import mlxterp\n"
            "try:\n    mlxterp.InterpretableModel\nexcept ImportError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'pip install "mlxterp[cpu]", "mlxterp[cuda]" (CUDA 12) or "mlxterp[cuda13]"' in done.stdout, done.stdout
