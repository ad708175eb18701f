import cProfile, pstats, sys
sys.path.insert(0, "bench")
import mlx.core as mx
from trace_python_cost import build
from mlxterp import InterpretableModel
base = build(); model = InterpretableModel(base)
ids = mx.random.randint(0, 128256, (1, 32)); mx.eval(ids)
mx.eval = lambda *a, **k: None
import mlxterp.trace as T
def everything():
    with model.trace(ids, keep="all"): pass
def restricted():
    with model.trace(ids, capture=["layers.4", "layers.8", "layers.14"]):
        for i in (4, 8, 14): model.layers[i].output.save()
        model.output.save()
fn = {"all": everything, "r": restricted}[sys.argv[1]]
for _ in range(50): fn()
pr = cProfile.Profile(); pr.enable()
for _ in range(300): fn()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
