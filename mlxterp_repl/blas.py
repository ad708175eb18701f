"""Which BLAS MLX uses on the CPU, and switching the `mlxterp` command to a fast one.

MLX's Linux wheels bundle the reference BLAS (`mlx_cpu.libs/libblas-*.so`), about five
times slower at matmuls than an optimized OpenBLAS. When the system has OpenBLAS, the
`mlxterp` command re-executes itself once with it in LD_PRELOAD, so the daemon, the REPL and
scripts all get the fast one. Set MLXTERP_NO_OPENBLAS=1 to opt out.

Only the command does this; the library (`mlxterp`) never touches the process environment.
"""

from __future__ import annotations

import os
import platform
import sys

OPT_OUT_VAR = "MLXTERP_NO_OPENBLAS"
# Set in the environment of the re-executed process, so it never re-executes again.
REEXEC_GUARD_VAR = "MLXTERP_BLAS_REEXECUTED"


def _debian_multiarch() -> str | None:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64-linux-gnu"
    if machine in ("aarch64", "arm64"):
        return "aarch64-linux-gnu"
    return None


def openblas_candidates() -> list[str]:
    """Usual places of a system OpenBLAS, most preferred first (Debian/Ubuntu, then Fedora)."""
    paths = []
    multiarch = _debian_multiarch()
    if multiarch:
        base = f"/usr/lib/{multiarch}"
        paths += [
            f"{base}/openblas-pthread/libopenblas.so.0",
            f"{base}/openblas-openmp/libopenblas.so.0",
            f"{base}/libopenblas.so.0",
            f"{base}/openblas-serial/libopenblas.so.0",
        ]
    paths += ["/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblas.so.0"]
    return paths


def find_openblas() -> str | None:
    """Path of the system's OpenBLAS, or None when there is none (or not on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    for path in openblas_candidates():
        if os.path.isfile(path):
            return path
    return None


def opted_out(environ=os.environ) -> bool:
    return environ.get(OPT_OUT_VAR, "").strip().lower() not in ("", "0", "false", "no")


def preload_environment(openblas: str, environ=os.environ) -> dict[str, str]:
    """A copy of environ with openblas first in LD_PRELOAD and the re-exec guard set."""
    env = dict(environ)
    existing = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{openblas} {existing}".strip() if existing else openblas
    env[REEXEC_GUARD_VAR] = "1"
    return env


def should_reexec(environ=os.environ) -> str | None:
    """The OpenBLAS path to preload, or None when the process should stay as it is."""
    if opted_out(environ) or environ.get(REEXEC_GUARD_VAR):
        return None
    openblas = find_openblas()
    if openblas is None:
        return None
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if any("libopenblas" in os.path.basename(p) for p in preloaded):
        return None
    return openblas


def reexec_with_openblas() -> None:
    """Replace this process by the same command with OpenBLAS preloaded, when that helps.

    Call it first thing in the command's main, before anything imports mlx. Returns only
    when no re-exec is wanted, or when exec failed (then the command goes on as it is).
    """
    openblas = should_reexec()
    if openblas is None:
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    try:
        os.execve(sys.executable, argv, preload_environment(openblas))
    except OSError:
        return


def blas_in_use() -> str:
    """One line naming the BLAS that MLX's CPU backend uses in this process.

    Imports mlx.core so that its libraries are mapped, then reads /proc/self/maps.
    """
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        import mlx.core  # noqa: F401  (loads MLX's BLAS into the process)
    except ImportError as err:
        return f"unknown (mlx cannot be imported: {err})"
    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return "unknown (/proc/self/maps is not readable)"
    # MLX's CUDA build multiplies on the GPU with cuBLAS; its CPU backend still has a BLAS of its own.
    cublas = next((p for p in sorted(libraries) if os.path.basename(p).startswith("libcublas")), None)
    on_gpu = f"; cuBLAS on the GPU ({cublas})" if cublas else ""
    for path in sorted(libraries):
        if "libopenblas" in os.path.basename(path):
            return f"OpenBLAS ({path}){on_gpu}"
    for path in sorted(libraries):
        folder = os.path.basename(os.path.dirname(path))  # mlx_cpu.libs, mlx_cuda_13.libs, ...
        if folder.startswith("mlx_") and folder.endswith(".libs") and os.path.basename(path).startswith("libblas"):
            hint = ""
            if opted_out():
                hint = f"; {OPT_OUT_VAR} is set"
            elif find_openblas() is None:
                hint = "; install OpenBLAS (apt-get install libopenblas0-pthread) for ~5x faster CPU matmuls"
            return f"reference BLAS bundled with MLX ({path}){hint}{on_gpu}"
    if cublas:
        return f"cuBLAS, on the GPU ({cublas})"
    return "unknown (no BLAS library mapped)"
