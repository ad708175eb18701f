import sys, gc, time
sys.path.insert(0, "bench")
import mlx.core as mx
from trace_python_cost import build, best
from mlxterp import InterpretableModel
from mlxterp.trace import record_plan, run_forward
base = build(); model = InterpretableModel(base)
ids = mx.random.randint(0, 128256, (1, 32)); mx.eval(ids)
pids = mx.array(ids.tolist())
record, ordered, names_by_id, _ = record_plan(model, None, False)
mx.eval = lambda *a, **k: None
set_class = object.__setattr__
from mlxterp.trace import traced_class
pairs = [(m, type(m), traced_class(type(m))) for _, m in ordered]
def swaps():
    for m, c, s in pairs: set_class(m, "__class__", s)
    for m, c, s in pairs: set_class(m, "__class__", c)
def plain(): base(pids)
def rf(): run_forward(model, lambda: base(pids), ordered, {}, names_by_id=names_by_id)
def tr():
    with model.trace(ids, keep="all"): pass
gc.disable()
fns = dict(plain=plain, swaps=swaps, run_forward=rf, trace_all=tr)
for f in fns.values():
    for _ in range(30): f()
for rnd in range(2):
    res = {k: best(f, 1000) * 1e6 for k, f in fns.items()}
    print(" ".join(f"{k}={v:.1f}" for k, v in res.items()), "| rf-plain", round(res["run_forward"] - res["plain"], 1), "trace-rf", round(res["trace_all"] - res["run_forward"], 1))
print(len(ordered))
import mlxterp.trace as T
def idle():
    for m, c, s in pairs: set_class(m, "__class__", s)
    try:
        base(pids)
    finally:
        for m, c, s in pairs: set_class(m, "__class__", c)
def rec_nohold():
    out, r = run_forward(model, lambda: base(pids), ordered, {}, names_by_id=names_by_id)
    return out
fns = dict(plain=plain, idle_swapped=idle, run_forward=rf)
for rnd in range(3):
    res = {k: best(f, 1000) * 1e6 for k, f in fns.items()}
    print(" ".join(f"{k}={v:.1f}" for k, v in res.items()))
