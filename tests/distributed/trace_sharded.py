"""Run under `mlx.launch -n 2`: tiny models split across the processes, compared with the unsplit model.

    python trace_sharded.py OUT_DIR

For each case (qwen2 split with mlx-lm's ``model.model.pipeline(group)``,
deepseek_v2 with ``model.shard(group)``) every process builds the same
random-initialised 4-layer model (same seed), traces it whole (the
reference), splits it, traces it again and writes
``OUT_DIR/<mode>-rank-R.json``: the largest difference of each compared value
and the names it saw. ``OUT_DIR/collect-rank-R.json`` compares
``batch_get_activations(..., group=group)`` (prompts split over the
processes, results gathered in memory) with a one-process call.
``OUT_DIR/interrupt-<mode>-rank-R.json``: where each process stopped when
process 0 alone asked to stop, and the trace after that.
"""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from architectures import BASE, CONFIGS  # noqa: E402
from mlx_lm.utils import MODEL_REMAPPING  # noqa: E402

from mlxterp import InterpretableModel, batch_get_activations, get_activations  # noqa: E402

N_LAYERS = 4
PROMPTS = [[1, 5, 9, 20, 3, 7], [4, 8, 2]]  # two lengths: the left-padded batch path


def build(arch):
    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(arch, arch)}")
    config = {**BASE, **CONFIGS[arch], "model_type": arch, "num_hidden_layers": N_LAYERS}
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def observe(model):
    """Everything compared between the whole and the split model, as numpy arrays."""
    seen = {}
    with model.trace(PROMPTS) as tr:
        for i in range(N_LAYERS):
            seen[f"layers.{i}"] = model.layers[i].output.save()
        seen["layers.2.mlp"] = tr.activations["layers.2.mlp"]
        seen["layers.0.attn"] = tr.activations["layers.0.attn"]
        seen["layers.3.input"] = model.layers[3].input.save()
        seen["logits"] = model.output.save()
    kept = sorted(model.short_name(n) for n in tr.activations)
    with model.trace(PROMPTS, interventions={"layers.1.mlp": lambda a: a * 0.0}):
        seen["logits with layers.1.mlp zeroed"] = model.output.save()
    acts = get_activations(model, PROMPTS, layers=[0, 3], positions=[0, -1])
    seen.update({f"get_activations {k}": v for k, v in acts.items()})
    patching = model.activation_patching(PROMPTS[0], [2, 2, 2, 2, 2, 2], component="mlp")
    seen["activation_patching"] = mx.array([patching[i] for i in range(N_LAYERS)])
    return {k: np.array(v.astype(mx.float32)) for k, v in seen.items()}, kept


def compare(reference, split):
    return {k: float(np.max(np.abs(reference[k] - split[k]))) if reference[k].shape == split[k].shape
            else f"shape {split[k].shape} != {reference[k].shape}" for k in reference}


def split_model(base, mode, group):
    if mode == "pipeline":
        base.model.pipeline(group)
    else:
        base.shard(group)
    mx.eval(base.parameters())
    return InterpretableModel(base)


def check_interrupt(mode, arch, group, out):
    """A stop asked on process 0 only, at its 4th check: where each process stopped, then a trace after it."""
    from mlxterp.errors import Interrupted

    model = split_model(build(arch), mode, group)
    with model.trace(PROMPTS[0]):
        before = model.output.save()
    checks = []

    def should_stop():
        checks.append(1)
        return group.rank() == 0 and len(checks) >= 4

    report = {"rank": group.rank(), "interrupted": None}
    try:
        # Pipeline: asked before each forward pass (the 4th trace stops); tensor: at each layer boundary.
        for _ in range(6 if mode == "pipeline" else 1):
            with model.trace(PROMPTS[0], should_stop=should_stop):
                pass
    except Interrupted as exc:
        report["interrupted"] = str(exc)
    report["checks"] = len(checks)
    with model.trace(PROMPTS[0], should_stop=lambda: False):
        after = model.output.save()
    report["after_differs_by"] = float(mx.max(mx.abs(after - before)).item())
    (out / f"interrupt-{mode}-rank-{group.rank()}.json").write_text(json.dumps(report, indent=1))


def check_split(mode, arch, group, out):
    base = build(arch)
    whole = InterpretableModel(base)
    reference, _ = observe(whole)
    reference_names = [name for name, _ in whole.named_modules()]
    reference_info = [(m["name"], m["type"], m["params"]) for m in whole.module_info() if m["layer"] is not None]
    model = split_model(base, mode, group)
    split, kept = observe(model)
    report = {
        "rank": group.rank(), "size": group.size(), "diffs": compare(reference, split), "kept": kept,
        "n_layers": model.n_layers, "same_names": [name for name, _ in model.named_modules()] == reference_names,
        "same_layer_info": [(m["name"], m["type"], m["params"]) for m in model.module_info()
                            if m["layer"] is not None] == reference_info,
        "mlp_names": [model.short_name(n) for n in model.expand("layers.*.mlp")],
        "local_layers": sum(1 for layer in base.model.layers if layer is not None),
    }
    (out / f"{mode}-rank-{group.rank()}.json").write_text(json.dumps(report, indent=1))


def check_collect(group, out):
    model = InterpretableModel(build("qwen2"))
    prompts = [[1 + i, 2 + i % 5, 3, 4 + i % 3][: 2 + i % 3] for i in range(11)]
    alone = batch_get_activations(model, prompts, layers=[1, "layers.2.mlp"], batch_size=2, shard_size=4)
    together = batch_get_activations(model, prompts, layers=[1, "layers.2.mlp"], batch_size=2, shard_size=4,
                                     group=group)
    report = {"rank": group.rank(), "keys": sorted(together),
              "equal": {k: bool(np.array_equal(np.array(alone[k]), np.array(together[k]))) for k in alone}}
    (out / f"collect-rank-{group.rank()}.json").write_text(json.dumps(report, indent=1))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    group = mx.distributed.init()
    check_collect(group, out)
    check_split("pipeline", "qwen2", group, out)
    check_split("tensor", "deepseek_v2", group, out)
    check_interrupt("pipeline", "qwen2", group, out)
    check_interrupt("tensor", "deepseek_v2", group, out)


if __name__ == "__main__":
    main()
