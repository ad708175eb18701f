"""`mlxterp collect PROMPTS --layers ... --out DIR`: activations of many prompts, saved as safetensors shards.

Run alone it uses one process; run under ``mlx.launch -n N`` (one machine or a
hostfile) the prompts are split over the N processes, each writing its own
shards, and process 0 writes the index (``meta.json``) that
``mlxterp.collect.load_activations(DIR)`` reads as one data set. Running the
same command again on a directory of a stopped run computes only the shards
that are missing. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  mlxterp collect prompts.txt --model demo --layers 3,8 --out acts/
  mlxterp collect prompts.jsonl --model ./my-model --layers 0..15,layers.5.mlp --positions 0,-1 --out acts/
  mlx.launch -n 2 --backend ring -- mlxterp collect prompts.txt --model demo --layers 8 --out acts/

PROMPTS is a text file (one prompt per line), a .jsonl file (one JSON string, {"prompt": ...}
or list of token ids per line) or a .json file holding a list of those."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxterp collect", description="Save the activations of many prompts to safetensors shards.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompts", help="prompt file: .txt (one per line), .jsonl or .json")
    parser.add_argument("--model", default="demo", help="'demo', an mlx-lm model directory or a hub id (default: demo)")
    parser.add_argument("--layers", required=True,
                        help="comma-separated layer indices (8, -1, 0..15) and module names or patterns "
                             "(layers.5.mlp, layers.[1,2].attn)")
    parser.add_argument("--positions", default="-1",
                        help="comma-separated token positions of each prompt (default: -1), or 'all': every token, "
                             "one row per token, as tuned lens and SAE training read (docs/sae.md)")
    parser.add_argument("--out", required=True, help="directory for the shards (created; a stopped run here resumes)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default: 32)")
    parser.add_argument("--shard-size", type=int, default=4096, help="prompts per shard file (default: 4096)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def read_prompts(path: Path) -> list:
    """The prompts of a .txt, .jsonl or .json file; blank lines are skipped, and said so on stderr."""
    from mlxterp.errors import InputError

    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(items, list):
            raise InputError(f"{path} must hold a JSON list of prompts")
    elif path.suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{number} is not valid JSON: {exc}") from None
    else:
        items = [line for line in text.splitlines() if line.strip()]
    blank = sum(1 for line in text.splitlines() if not line.strip())
    if blank and path.suffix != ".json":
        print(f"mlxterp collect: skipped {blank} blank line{'s' if blank > 1 else ''} of {path}", file=sys.stderr)
    prompts = [item["prompt"] if isinstance(item, dict) and "prompt" in item else item for item in items]
    for number, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise InputError(f"prompt {number} of {path} is {prompt!r}: a prompt is a string or a list of token ids")
    if not prompts:
        raise InputError(f"{path} holds no prompts")
    return prompts


def parse_positions(text: str):
    from mlxterp.errors import InputError

    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--positions takes comma-separated integers such as 0,-1; got {text!r}") from None
    if not values:
        raise InputError("--positions is empty; e.g. --positions -1")
    return values[0] if len(values) == 1 else values


def main(args: list[str]) -> int:
    options = build_parser().parse_args(args)
    from mlxterp import InterpretableModel, batch_get_activations
    from mlxterp.errors import MlxterpError

    from mlxterp.distributed import init_world

    group = init_world()
    rank, size = group.rank(), group.size()
    started = time.monotonic()
    try:
        prompts = read_prompts(Path(options.prompts))
        model = InterpretableModel(options.model)
        layers = options.layers  # mlxterp.collect's one layer rule reads the string, lists like [1,2] included
        if options.positions.strip() == "all":
            return _collect_every_token(model, prompts, layers, options, size, started)
        positions = parse_positions(options.positions)
        out = batch_get_activations(
            model, prompts, layers, batch_size=options.batch_size, positions=positions, out=options.out,
            shard_size=options.shard_size, progress=False if options.no_progress else None,
            group=group if size > 1 else None,
        )
    except MlxterpError as exc:
        print(f"mlxterp collect: {exc}", file=sys.stderr)
        return 1
    if rank == 0:
        meta = json.loads((Path(out) / "meta.json").read_text())
        print(f"wrote activations of {meta['n_prompts']} prompts ({', '.join(meta['keys'])}) to {out}: "
              f"{len(meta['shards'])} shards, {size} process{'es' if size > 1 else ''}, "
              f"{time.monotonic() - started:.1f} s")
    return 0


def _collect_every_token(model, prompts, layers, options, size: int, started: float) -> int:
    """``--positions all``: mlxterp.training.collect_tokens, in one process."""
    from mlxterp.errors import MlxterpError
    from mlxterp.training import collect_tokens

    if size > 1:
        print("mlxterp collect: --positions all runs in one process; start it without mlx.launch", file=sys.stderr)
        return 1
    try:
        out = collect_tokens(model, prompts, layers, out=options.out, batch_size=options.batch_size,
                             shard_size=options.shard_size, progress=False if options.no_progress else None)
    except MlxterpError as exc:
        print(f"mlxterp collect: {exc}", file=sys.stderr)
        return 1
    meta = json.loads((Path(out) / "meta.json").read_text())
    keys = [key for key in meta["keys"] if key not in ("token", "prompt", "position")]
    print(f"wrote activations of every token ({meta['n_prompts']} tokens of {len(prompts)} prompts; "
          f"{', '.join(keys)}) to {out}: {len(meta['shards'])} shards, {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
