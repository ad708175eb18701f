"""The statement table of the query language (`.mlxq`): every statement, option, intervention,
metric and function, declared once.

Pure Python (standard library only): the language server imports it without MLX. Everything
that knows the language's words is derived from these tables or tested against them: the
parser (`mlxterp_repl.dsl.parser`), completion, the Pygments lexer, the language server's
hover, the evaluator's dispatch and `help`, `docs/dsl.md` (`scripts/gen_dsl_doc.py`) and the
editor grammars (`scripts/gen_grammars.py`). docs/develop.md says how to add a statement.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Option:
    """An option keyword after a statement's argument; it means the same in every statement.

    `reads` names the parser's reader for what follows (see `OPTION_READERS`) and `field` the
    attribute of the statement's syntax node the value goes to."""

    keyword: str
    takes: str  # what follows it, as the syntax line shows it ("" for nothing)
    field: str
    reads: str
    description: str
    grammar: str  # the option in the EBNF of docs/dsl.md

    def syntax(self) -> str:
        return f"{self.keyword} {self.takes}".strip()


# How the parser reads what follows an option keyword (one `Parser` method per reader).
OPTION_READERS = ("position", "string", "new_var", "count", "layers", "plot", "metric", "file", "answers", "flag")

OPTIONS: dict[str, Option] = {o.keyword: o for o in [
    Option("@", "POSITION", "position", "position", "the token positions (default: all)", '"@" position'),
    Option("in", '"TEXT"', "input", "string", "run on this text instead of the session's prompt", '"in" STRING'),
    Option("as", "$NAME", "name", "new_var", "keep the result under a $name", '"as" VAR'),
    Option("top", "K", "top", "count", "how many tokens to show", '"top" INT'),
    Option("layers", "LAYERS", "layers", "layers", "which layers to cover (default: all)", '"layers" layers'),
    Option("plot", "[to FILE]", "plot", "plot", "also write a PNG (to a temporary file unless `to FILE`)",
           "plot"),
    Option("clean", '"TEXT"', "clean", "string", "the clean input", '"clean" STRING'),
    Option("corrupt", '"TEXT"', "corrupt", "string", "the corrupted input", '"corrupt" STRING'),
    Option("metric", "NAME", "metric", "metric", "how recovery is measured (a metric)", '"metric" METRIC'),
    Option("answers", '"A" "B"', "answers", "answers", "the two single-token answers metric logit_diff compares",
           '"answers" STRING STRING'),
    Option("to", "FILE", "file", "file", "the file to write (.npz or .safetensors)", '"to" word_or_string'),
    Option("tuned", "DIR", "tuned", "file", "decode through the tuned lens saved in DIR (demo: the one bundled "
           "for the demo model); each directory is loaded once per session", '"tuned" word_or_string'),
    Option("subject", '"TEXT"', "subject", "string", "the subject's text in the prompt (its tokens are corrupted)",
           '"subject" STRING'),
    Option("answer", '"TEXT"', "answer", "string", "the single-token answer whose probability is traced "
           "(default: the clean run's top token)", '"answer" STRING'),
    Option("overwrite", "", "overwrite", "flag", "replace the file if it exists (without it, an existing file "
           "is an error)", '"overwrite"'),
    Option("force", "", "force", "flag", "run a sweep whose estimated time is long (over a minute)", '"force"'),
    Option("ignore_eos", "", "ignore_eos", "flag", "go on past the end-of-sequence token (exactly N tokens)",
           '"ignore_eos"'),
]}

# What may follow a statement's keyword before its options (the parser has one reader each),
# and its EBNF in docs/dsl.md.
ARGUMENT_READERS = {"nothing": "", "path": "path", "optional_path": "[ path ]", "path_or_var": "( path | VAR )",
                    "string": "STRING", "optional_string": "[ STRING ]", "count": "INT"}


@dataclass(frozen=True)
class Statement:
    """One statement of the language.

    `argument` is what follows the keyword, as the syntax line shows it, read by the parser's
    `reads` reader into the node's `field` (statements of a special shape name their own
    `parser` method instead). `options` are keys of `OPTIONS`, in the order the syntax line
    and completion show them; `required` of them must be given. `handler` is the evaluator's
    `Session` method that runs the statement and `result` the `kind` of what it returns.
    `help` and `examples` make the statement's section of docs/dsl.md (`setup` runs before
    the examples there, unshown)."""

    name: str
    summary: str  # one line, for `help` and completion
    argument: str = ""
    reads: str = "nothing"
    field: str = ""
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()  # other words of its own shape (steer clear, load layers=)
    with_body: bool = False  # may follow `with ...:` (runs the model on an input)
    parser: str | None = None  # a Parser method for a special shape; None: argument then options
    grammar: str = ""  # EBNF of a special shape (after the keyword); others derive it
    check: str | None = None  # a Parser method checking combinations after the options
    handler: str = ""  # the evaluator's Session method; default do_NAME
    node: str = ""  # the syntax-tree class in mlxterp_repl.dsl.ast; default Name
    result: str = ""  # the result's kind; default the statement's name
    help: str = ""
    examples: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    def __post_init__(self):
        for name, default in (("handler", "do_" + self.name), ("node", self.name.capitalize()),
                              ("result", self.name)):
            if not getattr(self, name):
                object.__setattr__(self, name, default)

    @property
    def syntax(self) -> str:
        """The syntax line: `save PATH [@ POSITION] [in "TEXT"] [as $NAME]`."""
        parts = [self.name] + ([self.argument] if self.argument else [])
        for keyword in self.options:
            text = OPTIONS[keyword].syntax()
            parts.append(text if keyword in self.required else f"[{text}]")
        return " ".join(parts)

    @property
    def ebnf(self) -> str:
        """The right-hand side of its EBNF rule: `"save" path { "@" position | "in" STRING | "as" VAR }`."""
        parts = [f'"{self.name}"', self.grammar or ARGUMENT_READERS[self.reads]]
        if self.options:
            parts.append("{ " + " | ".join(OPTIONS[k].grammar for k in self.options) + " }")
        return " ".join(p for p in parts if p)


STATEMENTS: dict[str, Statement] = {s.name: s for s in [
    Statement(
        "load", "load a model: demo, a local mlx-lm directory or a hub id",
        argument="SOURCE [layers=ATTR]", keywords=("layers",), parser="statement_load",
        grammar='word_or_string { "layers" "=" word_or_string }',
        help="Loads the bundled demo model, a local mlx-lm directory (`load ./models/gpt2 layers=h` names the "
             "attribute holding the layers) or a hub id (`load mlx-community/Llama-3.2-1B-Instruct`, which needs a "
             "network). The prompt and the steering are reset; `$` variables stay.",
        examples=("load demo",)),
    Statement(
        "prompt", "set the session's current input", argument='"TEXT"', reads="string", field="prompt",
        help="Sets the session's current input, which `tokens`, `save`, `lens`, `predict`, `stats` and `export` "
             "use unless given `in \"...\"`.",
        examples=('prompt "The capital of France is"',)),
    Statement(
        "tokens", "table of position, id and text of each token", argument='["TEXT"]', reads="optional_string",
        field="input",
        help="Shows how the tokenizer splits the prompt (or the given text), with the BOS token it adds.",
        examples=("tokens",)),
    Statement(
        "save", "capture activations and summarise them", argument="PATH", reads="path", field="target",
        options=("@", "in", "as"), with_body=True,
        help="Captures the output of a module or of every module of a pattern, at the positions asked for, and "
             "shows shape, norm, mean, std, min, max, a sparkline and the first values. `as $name` keeps it. Equals "
             "`with model.trace(prompt): model.layers[8].output.save()[0, position]`.",
        examples=('save layers.8 @ "France"', "save layers.0..3.mlp @ -1 as $mlps")),
    Statement(
        "lens", "logit lens", options=("@", "top", "layers", "in", "tuned", "plot", "overwrite"), with_body=True,
        help="The logit lens (`model.logit_lens`): each layer's output decoded through the final norm and the "
             "unembedding. Without `@` (or with several positions): the top `top` tokens (default 1) per layer "
             "and position, coloured by token. With one position: the top `top` tokens (default 5) with their "
             "logits. `top` is at most the vocabulary size; the terminal draws 3 per cell (10 for one position) "
             "and says so, the result's data holds all. `plot [to FILE]` writes the heatmap as a PNG. It decodes "
             "the same run `save` reads (the trace cache's, interventions of `with` and `steer` included). "
             "`tuned DIR` decodes each layer through the tuned lens saved in DIR first (`logit_lens(..., "
             "lens=\"tuned\", translators=...)`; `tuned demo` is the one bundled for the demo model); a directory "
             "is loaded once per session.",
        examples=("lens layers 10..15", "lens @ -1 top 3 layers 12..15", "lens tuned demo @ -1 top 3 layers 0..3")),
    Statement(
        "predict", "top tokens a hidden state decodes to", argument="PATH|$NAME", reads="path_or_var",
        field="target", options=("@", "top", "in"), with_body=True,
        help="The tokens a hidden state decodes to (`model.get_token_predictions`), per position; also of a saved "
             "`$name`. On `output` it shows the top logits themselves. Default `top 5`.",
        examples=("predict layers.12 @ -1 top 5",)),
    Statement(
        "patch", "activation-patching sweep over layers (and positions, with @): recovery %",
        argument="COMPONENT", reads="path", field="component",
        options=("clean", "corrupt", "@", "metric", "answers", "layers", "plot", "overwrite", "force"),
        required=("clean", "corrupt"),
        check="check_patch",
        help="Activation patching (`model.activation_patching`): each layer's component (`mlp`, `attn`, "
             "`mlp.gate_proj`, `self_attn.q_proj`, or `layer` for the whole block) is patched from the clean run "
             "into the corrupted run; the result is the recovery % per layer (100 % restores the clean output, "
             "negative moves away from it). `metric` is `l2` (default), `mse` or `cosine` (distances between the "
             "last position's logits), or `logit_diff` with `answers \"CLEAN\" \"CORRUPT\"` (two single-token "
             "strings such as `\" Paris\" \" London\"`: recovery of the logit difference between them). With "
             "`@ POSITION` (any position form; `*` for all) each position is patched on its own and the result is a "
             "layer x position grid, coloured by recovery, with the tokens as column headers (a text position may "
             "name a token of either prompt). `plot [to FILE]` writes a bar chart, or a heatmap for the grid. "
             "`patch heads ...` patches each attention head's `z` instead (`model.head_patching`): recovery % per "
             "layer and head, or per layer, head and position with `@`.",
        examples=('patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France"',
                  'patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France" @ * '
                  'metric logit_diff answers " Paris" " London" layers 0..5')),
    Statement(
        "sae", "load a sparse autoencoder for the module it reads; alone: list the loaded ones",
        argument="[load DIR]", keywords=("load",), parser="statement_sae", grammar='[ "load" word_or_string ]',
        help="Loads a sparse autoencoder saved with `sae.save(DIR)` (`mlxterp.sae.load_sae`; `sae load demo` is the "
             "one bundled for the demo model's `layers.8`) for the module it was trained on. Then `features MODULE` "
             "lists its most active features, and the interventions `ablate F`, `amplify F K` and `inject F A` on "
             "that module act on its feature F (see [Interventions](#interventions)). Another SAE for the same "
             "module replaces it; `sae` alone lists the loaded SAEs; `load` (another model) forgets them.",
        examples=("sae load demo",)),
    Statement(
        "features", "the most active features of a module's SAE at one position", argument="PATH", reads="path",
        field="target", options=("@", "top", "in"), with_body=True, result="active_features",
        help="The `top` (default 10) features of the SAE loaded for the module (`sae load`) most active at one "
             "position (default `@ -1`) of the prompt, with their activations (`mlxterp.sae.active_features`). "
             "Under `with` or `steer`, the features of the intervened run.",
        examples=("features layers.8 @ -1 top 5", "with layers.8 ablate 487: features layers.8 @ -1 top 3"),
        setup=("sae load demo",)),
    Statement(
        "heads", "head-type scores of every attention head: induction, previous-token, first-token",
        argument="[induction|previous|first]", keywords=("induction", "previous", "first"),
        options=("layers", "in", "plot", "overwrite"), parser="statement_heads", grammar='[ "induction" | "previous" | "first" ]',
        help="Mean attention of every head of the layers asked for (`mlxterp.heads.head_scores`): `induction` "
             "on sequences of random tokens repeated twice (from each token of the second copy to the token after "
             "its first occurrence), `previous` (to the token before) and `first` (to the first token, where BOS "
             "sits) on the same sequences, or on the text of `in \"TEXT\"`; without a kind, all three. Scores of "
             "0.4 and more are bold; `plot [to FILE]` writes the layer x head heatmaps as a PNG.",
        examples=("heads induction layers 0..3", 'heads previous in "The capital of France is" layers 0..1')),
    Statement(
        "causal", "causal tracing (ROME): restore each state of a run whose subject is corrupted",
        argument='["TEXT"]', reads="optional_string", field="input",
        options=("subject", "answer", "layers", "plot", "overwrite"), required=("subject",), result="causal_trace",
        help="Causal tracing (`mlxterp.causal_tracing.causal_trace`) of the prompt (or the text given): the "
             "subject's token embeddings get Gaussian noise (3 x the embedding's standard deviation, 10 seeded "
             "draws), then each state of the corrupted run is restored to its clean value in turn: the residual "
             "stream at each (layer, position), and the MLP and the attention outputs of a window of 10 layers "
             "around the layer. The result: three heatmaps of the answer's probability per layer and position "
             "(the subject's tokens starred), the best layer of each position drawn in the terminal. `answer` "
             "defaults to the clean run's top token; `plot [to FILE]` writes the heatmaps as a PNG.",
        examples=('causal "The capital of France is" subject "France" answer " Paris" layers 6..9',)),
    Statement(
        "generate", "generate N tokens after the prompt (streamed), under the steering in force",
        argument="N", reads="count", field="count", options=("in", "ignore_eos"), with_body=True, result="generation",
        help="Generates up to N tokens greedily after the prompt (or `in \"...\"`) with mlx-lm's KV cache "
             "(`model.generate`), streaming each token as it comes. `steer` and `with ...:` interventions apply at "
             "every step. It ends at the end-of-sequence token unless `ignore_eos`. Interrupting (Ctrl-C, `interrupt`) "
             "stops between tokens; the reply says interrupted and what was generated by then.",
        examples=('generate 5 in "The capital of France is"',)),
    Statement(
        "dla", "direct logit attribution: what each layer's attention and MLP, and each head, add to a logit",
        argument='["TEXT"]', reads="optional_string", field="input",
        options=("answer", "answers", "layers", "plot", "overwrite"), with_body=True, check="check_dla",
        help="Direct logit attribution (`model.direct_logit_attribution`) at the last position of the prompt (or "
             "the text given): what the embedding, each layer's attention (`attn_out`) and MLP (`mlp_out`) and each "
             "head (its `z` through the output projection) add to the logit of `answer` (default: the top "
             "prediction), or to the difference of `answers \"A\" \"B\"`, through the final norm with its scale "
             "frozen. The parts sum to the model's logit (difference). It attributes the run with the steering and "
             "`with` interventions in force. `layers` chooses the rows shown; `plot [to FILE]` writes the layer x "
             "head heatmap as a PNG.",
        examples=('dla "The capital of France is" answers " Paris" " London" layers 9..12',)),
    Statement(
        "attribute", "attribution patching: the gradient estimate of patching every layer, component, position "
        "and head", options=("clean", "corrupt", "answers", "layers", "plot", "overwrite"),
        required=("clean", "corrupt", "answers"), result="attribution",
        help="Attribution patching (`model.attribution_patching`): for every layer, component (`resid_pre`, "
             "`attn_out`, `mlp_out`), position and head, `(clean - corrupted) . gradient` of the logit difference "
             "of `answers` at the corrupted run, as recovery % (one forward and one backward pass; exact "
             "patching is `patch`). Shows a layer x position heatmap per component and the strongest estimates; "
             "`plot [to FILE]` writes the resid_pre heatmap as a PNG.",
        examples=('attribute clean "The capital of France is" corrupt "The capital of Japan is" '
                  'answers " Paris" " Tokyo" layers 8..15',)),
    Statement(
        "attention", "attention pattern of each head of a layer, as heatmaps",
        argument="PATH", reads="path", field="target", options=("in", "plot", "overwrite"),
        result="head_attention",
        help="The attention pattern (query x key) of every head of a layer (`attention layers.2`) or of some heads "
             "(`attention layers.2.attn.pattern.head[1,3]`), on the prompt or `in \"TEXT\"`, drawn as compact "
             "heatmaps (`model.head_attention`); `plot [to FILE]` writes them as a PNG.",
        examples=('attention layers.2.attn.pattern.head[0,1] in "The capital of France is"',)),
    Statement(
        "with", "run one query under interventions", argument="INTERVENTION {, INTERVENTION}: STATEMENT",
        parser="statement_with", result="the query's", grammar='intervention { "," intervention } ":" query',
        help="Runs one query ({bodies}) under interventions, then forgets them. A target may be a hook point "
             "(`layers.4.mlp_out zero` ablates what layer 4's MLP adds, where `layers.4 zero` wipes the residual "
             "stream) and an intervention may end with `@ POSITION`. See [Interventions](#interventions).",
        examples=("with layers.4 zero: lens @ -1 top 3 layers 3..6",
                  "with layers.4.mlp_out zero @ -1: lens @ -1 top 3 layers 3..6")),
    Statement(
        "steer", "interventions kept on until cleared", argument="[INTERVENTION {, INTERVENTION} | clear]",
        keywords=("clear",), parser="statement_steer", grammar='[ "clear" | intervention { "," intervention } ]',
        help="Interventions that stay on for every later query of the session; `steer` alone lists them, "
             "`steer clear` removes them.",
        examples=("let $v = $japan - $france", "steer layers.6 add $v * 1.0", "predict layers.15 @ -1 top 3",
                  "steer clear"),
        setup=('save layers.6 @ -1 in "The capital of France is" as $france',
               'save layers.6 @ -1 in "The capital of Japan is" as $japan')),
    Statement(
        "let", "arithmetic on saved results: + - * /, mean(), norm()", argument="$NAME = EXPRESSION",
        parser="statement_let", grammar='VAR "=" expression',
        help="Arithmetic on saved values: see [let expressions](#let-expressions).",
        examples=("let $v = $japan - $france", "let $size = norm($v)")),
    Statement(
        "ls", "module tree: names, types, parameter counts", argument="[PATH]", reads="optional_path", field="path",
        help="The module tree from `model.module_info()`: without a path, the modules outside the layers and one "
             "line for the layers; with a path or pattern, those modules and everything below them.",
        examples=("ls", "ls layers.0")),
    Statement(
        "stats", "one row of statistics per module", argument="PATH", reads="path", field="target",
        options=("@", "in"), with_body=True,
        help="One row of statistics per module of a path or pattern.",
        examples=("stats layers.0..3.mlp @ -1",)),
    Statement(
        "export", "write arrays to .npz or .safetensors", argument="$NAME|PATH", reads="path_or_var",
        field="source", options=("@", "in", "to", "overwrite"), required=("to",), with_body=True,
        check="check_export",
        help="Writes a saved value, or a path's activations, to `.npz` or `.safetensors`, through a temporary "
             "file renamed over the target (a crash or a full disk never leaves half a file). An existing file "
             "is replaced only with `overwrite`. Under the daemon the name is relative to the client's "
             "directory and may not leave it (docs/security.md).",
        examples=("export $mlps to acts.safetensors",), setup=("save layers.0..3.mlp @ -1 as $mlps",)),
    Statement(
        "info", "model summary",
        help="The model, the current prompt, the `$` variables and the steering in force.",
        examples=("info",)),
    Statement(
        "help", "this list, or help for one statement", argument="[STATEMENT]", parser="statement_help",
        grammar="[ NAME ]",
        help="All statements with their syntax, or one statement's.",
        examples=("help patch",)),
]}


@dataclass(frozen=True)
class Intervention:
    """`TARGET NAME ARGUMENTS [TAIL]` in `with` and `steer`: one `mlxterp.interventions` function.

    `arguments` are (placeholder, reader, what) with reader "number" (appended to the node's
    numbers), "var" (its $name) or "integer" (its seed); `tail` is an optional
    (keyword, placeholder, reader, what) after them."""

    name: str
    arguments: tuple[tuple[str, str, str], ...] = ()
    tail: tuple[str, str, str, str] | None = None
    library: str = ""
    effect: str = ""

    @property
    def syntax(self) -> str:
        parts = [self.name] + [placeholder for placeholder, _, _ in self.arguments]
        if self.tail is not None:
            parts.append(f"[{self.tail[0]} {self.tail[1]}]")
        return " ".join(parts)


INTERVENTIONS: dict[str, Intervention] = {i.name: i for i in [
    Intervention("zero", library="iv.zero_out", effect="replaced by zeros"),
    Intervention("scale", (("K", "number", "a number"),), library="iv.scale(K)", effect="multiplied by K"),
    Intervention("clamp", (("LO", "number", "the lower bound"), ("HI", "number", "the upper bound")),
                 library="iv.clamp(LO, HI)", effect="clipped to [LO, HI]"),
    Intervention("noise", (("STD", "number", "a number"),), tail=("seed", "N", "integer", "a seed"),
                 library="iv.noise(STD, seed=N)",
                 effect="Gaussian noise added (with a seed, the same noise every run)"),
    Intervention("add", (("$v", "var", "a $name"),), tail=("*", "K", "number", "a scale factor"),
                 library="iv.add_vector(v * K)", effect="a vector added at every position (a steering vector)"),
    Intervention("replace", (("$x", "var", "a $name"),), library="iv.replace_with(x)",
                 effect="replaced by a saved activation (save it `@ *` from a prompt of the same length; a single "
                        "vector replaces every position)"),
    Intervention("ablate", (("F", "number", "a feature index"),), library="sae.ablate(F)",
                 effect="feature F of the SAE loaded for the target (`sae load`) removed: its activation times its "
                        "direction subtracted"),
    Intervention("amplify", (("F", "number", "a feature index"), ("K", "number", "a factor")),
                 library="sae.scale(F, K)", effect="feature F's contribution (of the target's SAE) multiplied by K"),
    Intervention("inject", (("F", "number", "a feature index"), ("A", "number", "an amount")),
                 library="sae.steer(F, A)",
                 effect="A times the direction of feature F (of the target's SAE) added at every position"),
]}

# metric of `patch ... metric NAME` -> what it measures
METRICS: dict[str, str] = {
    "l2": "L2 distance between the last position's logits (the default)",
    "mse": "mean squared error between the last position's logits",
    "cosine": "cosine distance between the last position's logits",
    "logit_diff": 'logit difference between the two answers (needs answers "A" "B")',
}

# function of `let` expressions -> what it does
FUNCTIONS: dict[str, str] = {
    "mean": "of a value holding several arrays (a pattern such as `layers.*.mlp`), their element-wise average; "
            "of one array, the average over its first axis (the positions)",
    "norm": "the L2 norm over the last axis of each array",
}


def with_bodies() -> list[str]:
    """Statements that may follow `with ...:`, in table order."""
    return [s.name for s in STATEMENTS.values() if s.with_body]


def option_keywords() -> list[str]:
    """Every word that is a keyword after a statement's keyword: option keywords, the words of
    special shapes (`clear`, `layers=`) and intervention tails (`seed`), sorted; `@` and `*`
    (punctuation) are left out."""
    words = set(OPTIONS) | {w for s in STATEMENTS.values() for w in s.keywords}
    words |= {i.tail[0] for i in INTERVENTIONS.values() if i.tail is not None}
    return sorted(w for w in words if w.isidentifier())


def usage(name: str) -> str:
    """Plain-text help of one statement: syntax, summary, its options, an example (`help NAME`)."""
    spec = STATEMENTS[name]
    lines = [spec.syntax, "  " + spec.summary]
    if spec.options:
        width = max(len(OPTIONS[k].syntax()) for k in spec.options)
        lines.append("options:")
        lines += [f"  {OPTIONS[k].syntax():<{width}}  {OPTIONS[k].description}" for k in spec.options]
    if spec.examples:
        lines += ["example:", "  " + spec.examples[0]]
    return "\n".join(lines)


def statement_help(name: str) -> str:
    """The statement's help paragraph, with `{bodies}` filled in."""
    return STATEMENTS[name].help.replace("{bodies}", ", ".join(f"`{b}`" for b in with_bodies()))
