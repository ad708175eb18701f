"""Timing the benchmarks share: interleaved medians with peak memory, and this process's CPU seconds.

    from timing import cpu_seconds, measure
    results = measure({"plain forward": plain, "default trace": traced}, repeats=10, warmup=2)
    seconds, peak_mib = results["plain forward"]

Import it after ``reexec_with_openblas()``: it loads mlx.
"""

import resource
import statistics
import time

import mlx.core as mx


def measure(runs, repeats, warmup):
    """Median seconds and peak MiB of each run, interleaved so machine noise hits all alike."""
    times = {name: [] for name in runs}
    peaks = {name: 0.0 for name in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            mx.synchronize()
            mx.reset_peak_memory()
            start = time.perf_counter()
            fn()
            mx.synchronize()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mx.get_peak_memory() / 2**20)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


def cpu_seconds() -> float:
    """User and system CPU time of this process so far: less disturbed than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
