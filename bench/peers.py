"""Capturing every module's output, here and in two PyTorch peers, on the same weights (CPU).

    python bench/peers.py                     # 1b-small shape (4 layers x 512, vocab 128256), float32
    python bench/peers.py --shape tiny        # a smoke run

Measures, each against its own framework's plain forward pass (median of ``--repeats`` after
warm-up, interleaved), at 1 x 32 and 4 x 128 tokens:

- mlxterp: ``model.trace(ids, keep="all")`` (every module output kept) and the default trace;
- TransformerLens: ``run_with_cache(ids)`` (its TransformerBridge over the Hugging Face model);
- nnsight: ``with model.trace(ids):`` saving every module's output.

The peers (``torch``, ``transformer-lens``, ``nnsight``, ``transformers``) are not dependencies of
this project: the script makes its own virtual environment for them under
``~/.cache/mlxterp-bench-peers`` (``--venv`` to choose), installs them there with pip on the first
run, writes the MLX model's weights in Hugging Face's Llama format to a temporary directory, and
runs itself inside that environment for the peer half. The logits of both sides are compared
(max |difference| printed) so the figures are of the same model.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VENV = os.path.expanduser("~/.cache/mlxterp-bench-peers")
PEER_PACKAGES = ["torch", "transformers", "transformer-lens", "nnsight"]
INPUTS = [(1, 32), (4, 128)]


def median_times(runs, repeats, warmup=2):
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def token_ids(vocab, batch, length, seed=0):
    import random

    rng = random.Random(seed + batch * 1000 + length)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


# -- the mlxterp half (the project's environment) --------------------------------------------

def write_hf_checkpoint(base, shape, directory):
    """The MLX model's weights and config in Hugging Face's Llama layout (float32 safetensors)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import models

    weights = {name: value.astype(mx.float32) for name, value in tree_flatten(base.parameters())}
    mx.save_safetensors(os.path.join(directory, "model.safetensors"), weights, metadata={"format": "pt"})
    config = {**models.config(shape), "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
              "eos_token_id": 2}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


def mlxterp_side(opts):
    sys.path.insert(0, HERE)
    from mlxterp_repl.blas import blas_in_use

    import mlx.core as mx
    import models
    from mlxterp import InterpretableModel

    base = models.build(opts.shape, "float32")
    model = InterpretableModel(base)
    vocab = models.SHAPES[opts.shape][5]
    rows = {}
    logits = {}
    for batch, length in INPUTS:
        ids = mx.array(token_ids(vocab, batch, length))

        def plain():
            mx.eval(base(ids))

        def default():
            with model.trace(ids):
                model.output.save()

        def everything():
            with model.trace(ids, keep="all"):
                model.output.save()

        times = median_times({"plain": plain, "default": default, "all": everything}, opts.repeats)
        rows[f"{batch}x{length}"] = times
        logits[f"{batch}x{length}"] = base(ids)[:, -1].astype(mx.float32).tolist()
    return {"rows": rows, "logits": logits, "blas": blas_in_use(), "device": model.device}


# -- the peer half (its own environment) -----------------------------------------------------

def peer_side(opts):
    import torch
    from nnsight import LanguageModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(opts.threads)
    hf = LlamaForCausalLM.from_pretrained(opts.checkpoint, torch_dtype=torch.float32).eval()
    # Both libraries want a tokenizer (TransformerLens reloads it from the checkpoint); ids are fed here.
    stand_in_tokenizer().save_pretrained(opts.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(opts.checkpoint)
    bridge = TransformerBridge.boot_transformers(opts.checkpoint, hf_model=hf, dtype=torch.float32, tokenizer=tokenizer)
    nn_model = LanguageModel(hf, tokenizer=tokenizer, dispatch=True)
    modules = finishing_order(hf, torch.tensor([[1, 2, 3]]))  # nnsight wants outputs in the order they come
    vocab = hf.config.vocab_size
    rows, logits = {}, {}
    for batch, length in INPUTS:
        ids = torch.tensor(token_ids(vocab, batch, length))

        @torch.no_grad()
        def plain():
            hf(ids)

        @torch.no_grad()
        def lens_cache():
            bridge.run_with_cache(ids)

        @torch.no_grad()
        def nnsight_all():
            saved = []
            with nn_model.trace(ids):
                for name in modules:
                    envoy = nn_model
                    for part in name.split("."):
                        envoy = getattr(envoy, part) if not part.isdigit() else envoy[int(part)]
                    saved.append(envoy.output.save())

        times = median_times({"plain": plain, "transformer-lens": lens_cache, "nnsight": nnsight_all}, opts.repeats)
        rows[f"{batch}x{length}"] = times
        with torch.no_grad():
            logits[f"{batch}x{length}"] = hf(ids).logits[:, -1].float().tolist()
    from importlib.metadata import version

    versions = {name: version(name) for name in PEER_PACKAGES}
    versions["modules"] = len(modules)
    json.dump({"rows": rows, "logits": logits, "versions": versions}, sys.stdout)


def finishing_order(model, ids):
    """Names of the modules that run, in the order their outputs are produced."""
    import torch

    order, hooks = [], []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return list(dict.fromkeys(order))


def stand_in_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def ensure_venv(path):
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        print(f"making the peers' environment in {path} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
    probe = subprocess.run([python, "-c", "import torch, transformers, transformer_lens, nnsight"],
                           capture_output=True)
    if probe.returncode != 0:
        print(f"installing {' '.join(PEER_PACKAGES)} into {path} ...", file=sys.stderr)
        subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b-small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (MLX uses what OpenBLAS does)")
    parser.add_argument("--venv", default=DEFAULT_VENV)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.peer:
        peer_side(opts)
        return

    from mlxterp_repl.blas import reexec_with_openblas

    reexec_with_openblas()
    python = ensure_venv(opts.venv)
    ours = mlxterp_side(opts)
    sys.path.insert(0, HERE)
    import models

    with tempfile.TemporaryDirectory() as directory:
        write_hf_checkpoint(models.build(opts.shape, "float32"), opts.shape, directory)
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        env["OMP_NUM_THREADS"] = str(opts.threads)
        done = subprocess.run([python, os.path.abspath(__file__), "--peer", "--checkpoint", directory,
                               "--shape", opts.shape, "--repeats", str(opts.repeats), "--threads", str(opts.threads)],
                              capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"the peers' run failed:\n{done.stderr[-3000:]}")
    peers = json.loads(done.stdout)

    import numpy as np

    print(f"shape {opts.shape!r} (float32, random weights, same on both sides), CPU, {opts.threads} threads; "
          f"median of {opts.repeats}; mlxterp on {ours['device']}, BLAS {ours['blas']}")
    print(f"peers: {peers['versions']}")
    print(f"{'input':<8}{'library: run':<40}{'ms':>9}{'x its forward':>15}")
    for key in ours["rows"]:
        gap = float(np.max(np.abs(np.array(ours["logits"][key]) - np.array(peers["logits"][key]))))
        mine, theirs = ours["rows"][key], peers["rows"][key]
        table = [("mlxterp: plain forward", mine["plain"], mine["plain"]),
                 ("mlxterp: default trace", mine["default"], mine["plain"]),
                 ("mlxterp: trace keep='all'", mine["all"], mine["plain"]),
                 ("PyTorch (HF): plain forward", theirs["plain"], theirs["plain"]),
                 ("TransformerLens: run_with_cache", theirs["transformer-lens"], theirs["plain"]),
                 ("nnsight: trace, every module saved", theirs["nnsight"], theirs["plain"])]
        for name, seconds, base in table:
            print(f"{key:<8}{name:<40}{seconds * 1e3:>9.1f}{seconds / base:>15.2f}")
        print(f"{key:<8}(last-position logits, MLX vs PyTorch: max |difference| {gap:.1e})")


if __name__ == "__main__":
    main()
