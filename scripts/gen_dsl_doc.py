"""Generate docs/dsl.md, the query-language reference, from scripts/dsl.md.in.

Every example query in the reference is run through the query language's
`Session` on a real model, and its rendered output is pasted under it, so the
page shows what `mlxterp run` prints. Re-run after the demo model or a renderer
changes:

    .venv/bin/python scripts/gen_dsl_doc.py demo docs/dsl.md

The first argument is the model to load (as `InterpretableModel` takes it), the
second the output file. The template's {{statements}} and {{errors}} are replaced.
"""

import io, os, sys, tempfile
from rich.console import Console
from mlxterp import InterpretableModel
from mlxterp_repl.dsl import Session, parse, QueryError
from mlxterp_repl.dsl.parser import STATEMENTS

if len(sys.argv) != 3:
    raise SystemExit("usage: gen_dsl_doc.py MODEL OUTPUT.md   (e.g. gen_dsl_doc.py demo docs/dsl.md)")
MODEL = sys.argv[1]
OUTPUT = os.path.abspath(sys.argv[2])  # before the chdir below: `export` examples write files there
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dsl.md.in")
model = InterpretableModel(MODEL)
session = Session(model)
os.chdir(tempfile.mkdtemp())
SETUP = {
    "steer": 'save layers.6 @ -1 in "The capital of France is" as $france\nsave layers.6 @ -1 in "The capital of Japan is" as $japan',
    "export": "save layers.0..3.mlp @ -1 as $mlps",
}
EXAMPLES = {
    "load": ["load demo"],
    "prompt": ['prompt "The capital of France is"'],
    "tokens": ["tokens"],
    "save": ['save layers.8 @ "France"', "save layers.0..3.mlp @ -1 as $mlps"],
    "lens": ["lens layers 10..15", "lens @ -1 top 3 layers 12..15"],
    "predict": ["predict layers.12 @ -1 top 5"],
    "patch": ['patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France"',
              'patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France" @ * '
              'metric logit_diff answers " Paris" " London" layers 0..5'],
    "with": ["with layers.4 zero: lens @ -1 top 3 layers 3..6"],
    "steer": ["let $v = $japan - $france", "steer layers.6 add $v * 1.0", "predict layers.15 @ -1 top 3", "steer clear"],
    "let": ["let $v = $japan - $france", "let $size = norm($v)"],
    "ls": ["ls", "ls layers.0"],
    "stats": ["stats layers.0..3.mlp @ -1"],
    "export": ["export $mlps to acts.safetensors"],
    "info": ["info"],
    "help": ["help patch"],
}
MORE = {
    "load": "Loads the bundled demo model, a local mlx-lm directory (`load ./models/gpt2 layers=h` names the attribute holding the layers) or a hub id (`load mlx-community/Llama-3.2-1B-Instruct`, which needs a network). The prompt and the steering are reset; `$` variables stay.",
    "prompt": "Sets the session's current input, which `tokens`, `save`, `lens`, `predict`, `stats` and `export` use unless given `in \"...\"`.",
    "tokens": "Shows how the tokenizer splits the prompt (or the given text), with the BOS token it adds.",
    "save": "Captures the output of a module or of every module of a pattern, at the positions asked for, and shows shape, norm, mean, std, min, max, a sparkline and the first values. `as $name` keeps it. Equals `with model.trace(prompt): model.layers[8].output.save()[0, position]`.",
    "lens": "The logit lens (`model.logit_lens`): each layer's output decoded through the final norm and the unembedding. Without `@` (or with several positions): the top token per layer and position, coloured by token. With one position: the top `top` tokens (default 5) with their logits. `plot [to FILE]` writes the heatmap as a PNG. Under `with` or `steer`, the same decoding (`model.get_token_predictions`) of the intervened run.",
    "predict": "The tokens a hidden state decodes to (`model.get_token_predictions`), per position; also of a saved `$name`. On `output` it shows the top logits themselves. Default `top 5`.",
    "patch": "Activation patching (`model.activation_patching`): each layer's component (`mlp`, `attn`, `mlp.gate_proj`, `self_attn.q_proj`, or `layer` for the whole block) is patched from the clean run into the corrupted run; the result is the recovery % per layer (100 % restores the clean output, negative moves away from it). `metric` is `l2` (default), `mse` or `cosine` (distances between the last position's logits), or `logit_diff` with `answers \"CLEAN\" \"CORRUPT\"` (two single-token strings such as `\" Paris\" \" London\"`: recovery of the logit difference between them). With `@ POSITION` (any position form; `*` for all) each position is patched on its own and the result is a layer x position grid, coloured by recovery, with the tokens as column headers (a text position may name a token of either prompt). `plot [to FILE]` writes a bar chart, or a heatmap for the grid.",
    "with": "Runs one query (`save`, `lens`, `predict`, `stats`, `export`) under interventions, then forgets them. See [Interventions](#interventions).",
    "steer": "Interventions that stay on for every later query of the session; `steer` alone lists them, `steer clear` removes them.",
    "let": "Arithmetic on saved values: see [let expressions](#let-expressions).",
    "ls": "The module tree from `model.module_info()`: without a path, the modules outside the layers and one line for the layers; with a path or pattern, those modules and everything below them.",
    "stats": "One row of statistics per module of a path or pattern.",
    "export": "Writes a saved value, or a path's activations, to `.npz` or `.safetensors`.",
    "info": "The model, the current prompt, the `$` variables and the steering in force.",
    "help": "All statements with their syntax, or one statement's.",
}
def render(result):
    buf = io.StringIO()
    Console(file=buf, width=100, color_system=None, force_terminal=False).print(result.render())
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip().splitlines())

parts = []
session.execute('prompt "The capital of France is"')
for name, (syntax, does) in STATEMENTS.items():
    if name in SETUP:
        session.execute(SETUP[name])
    parts.append(f"### `{name}`\n\n`{syntax}`\n\n{MORE[name]}\n")
    for query in EXAMPLES[name]:
        text = query.replace("load demo", f"load {MODEL}") if MODEL != "demo" else query
        (result,) = session.execute(text)
        out = render(result)
        if name == "load":
            out = out.replace(MODEL, "demo")
        parts.append(f"```mlxq\n{query}\n```\n```text\n{out}\n```\n")
statements = "\n".join(parts).replace(MODEL, "demo")

errors = []
for query in ["sav layers.8", "save layers.8.mpl @ -1", "save layers.20", 'save layers.8 @ "Germany"', "save layers.8 top 5",
              "steer layers.4 scal 2", "lens @ top", 'patch mlp clean "Paris is"', 'prompt "The capital', "let $v = $paris - $londn"]:
    try:
        session.execute(query)
        raise SystemExit(f"no error for {query}")
    except QueryError as e:
        errors.append(f"```text\n{e.render(query)}\n```\n")
doc = open(TEMPLATE).read()
doc = doc.replace("{{statements}}", statements).replace("{{errors}}", "\n".join(errors))
open(OUTPUT, "w").write(doc)
print("written", OUTPUT)
