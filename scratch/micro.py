import time, gc
import mlx.core as mx, mlx.nn as nn
import mlxterp.trace as T
lin = nn.Linear(4, 4); x = mx.zeros((1, 4)); mx.eval(lin.parameters(), x)
norm = nn.RMSNorm(4); mx.eval(norm.parameters())
def loop(m, n=20000):
    t = time.perf_counter()
    for _ in range(n): m(x)
    return (time.perf_counter() - t) / n * 1e9
gc.disable()
for m in (lin, norm):
    base = min(loop(m) for _ in range(5))
    rec = T.Recorder({id(m): "a"}, {})
    cls = type(m); sub = T.traced_class(cls)
    object.__setattr__(m, "__class__", sub)
    T._active_recorder = rec
    w = min(loop(m) for _ in range(5))
    T._active_recorder = None
    idle = min(loop(m) for _ in range(5))
    object.__setattr__(m, "__class__", cls)
    print(type(m).__name__, f"plain {base:.0f} ns, recorded {w:.0f} ns (+{w-base:.0f}), swapped but idle {idle:.0f} (+{idle-base:.0f})")
