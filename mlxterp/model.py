"""InterpretableModel: any MLX model, with names a person can type and traces of its activations."""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import distributed, loading
from .errors import LayerIndexError, TraceError, UnknownModuleError
from .naming import OUTPUT, ModuleNames
from .tokens import TokenizerHelpers
from .trace import Trace


class InterpretableModel(TokenizerHelpers):
    """Wrap an ``nn.Module``, ``"demo"``, a local mlx-lm directory or a hub id for tracing.

    >>> model = InterpretableModel("demo")
    >>> with model.trace("The capital of France is"):
    ...     hidden = model.layers[8].output.save()
    """

    def __init__(self, model_or_path, tokenizer=None, layer_attr: str = "layers"):
        if isinstance(model_or_path, nn.Module):
            self.model = model_or_path
            self.source = type(model_or_path).__name__
        elif isinstance(model_or_path, str):
            self.model, loaded_tokenizer, self.source = loading.load(model_or_path)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            raise TypeError(
                f"InterpretableModel takes an mlx.nn.Module, 'demo', a model directory or a hub id; "
                f"got {type(model_or_path).__name__}"
            )
        self.tokenizer = tokenizer
        self.names = ModuleNames(self.model, layer_attr)
        # A model split with mlx-lm's pipeline(): names cover every process's layers (mlxterp.distributed).
        self.pipeline_group = None
        if distributed.pipeline_size(self.model) > 1:
            self.pipeline_group = distributed.world()
            distributed.complete_pipeline_names(self.names, self.pipeline_group)
        # Pipeline or tensor parallel: traces evaluate the forward pass at once, on every process alike.
        self.distributed_group = self.pipeline_group or distributed.tensor_group(self.model)
        self.layers = LayerList(self)
        self.forward_count = 0
        # Modules a forward pass calls more than once (RoPE on queries and on keys): {full name: calls}.
        # A trace keeps the last call's output; traces fill this in as they meet such modules.
        self.repeated_calls: dict[str, int] = {}
        self._active_trace: Trace | None = None

    # -- structure -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.names.n_layers

    @property
    def hidden_size(self) -> int | None:
        args = getattr(self.model, "args", None)
        for attr in ("hidden_size", "n_embd", "d_model", "dim", "model_dim"):
            if hasattr(args, attr):
                return int(getattr(args, attr))
        embed = self.names.find("embed")
        if embed:
            weight = self.names.modules[embed].get("weight")
            return int(weight.shape[-1]) if weight is not None and weight.ndim == 2 else None
        return None

    @property
    def device(self) -> str:
        """Where forward passes run (MLX's default device): ``"gpu (cuda: NVIDIA H200)"``,
        ``"gpu (metal: Apple M2 Max)"``, ``"cpu (x86_64: ...)"``."""
        device = mx.default_device()
        if device.type == mx.gpu:
            backend = "cuda" if hasattr(mx, "cuda") and mx.cuda.is_available() else "metal"
        else:
            backend = None
        try:
            info = mx.device_info(device)
        except Exception:  # an MLX without device_info, or a backend that cannot say
            info = {}
        name = info.get("device_name")
        kind = "gpu" if device.type == mx.gpu else "cpu"
        where = backend or info.get("architecture")
        detail = ": ".join(str(x) for x in (where, name) if x)
        return f"{kind} ({detail})" if detail else kind

    @functools.cached_property
    def embedding_rows(self) -> int | None:
        """Rows of the input embedding (the valid token ids), or None for non-language models."""
        embed = self.names.find("embed")
        if embed is None:
            return None
        module = self.names.modules[embed]
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            return int(module["weight"].shape[0])
        return None

    @functools.cached_property
    def recorded_by_default(self) -> frozenset[str]:
        """What a plain trace records: modules holding other modules (the layers, their attention
        and MLP blocks, the base model) and the embedding, final norm and unembedding. Leaves
        inside the blocks are recorded on demand (see ``Trace``)."""
        modules = self.names.modules
        chosen = {full.rpartition(".")[0] for full in modules} & set(modules)
        chosen |= set(self.names.layer_names)
        chosen |= {self.names.find(role) for role in ("embed", "norm", "lm_head")} - {None}
        return frozenset(chosen - {"model"})

    def resolve(self, name: str) -> str:
        """Full name for any module name: full, short (``layers.6.mlp``), alias (``attn``)."""
        return self.names.resolve(name)

    def expand(self, pattern: str) -> list[str]:
        """Full names for a pattern (``layers.*.mlp``, ``layers.0..5``, ``layers.[1,3].attn``)."""
        return self.names.expand(pattern)

    def short_name(self, full_name: str) -> str:
        return self.names.short(full_name)

    def module(self, name: str) -> nn.Module:
        full = self.resolve(name)
        if full == OUTPUT:
            raise UnknownModuleError(name, [], "'output' is the logits, not a module")
        return self.names.modules[full]

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        return list(self.names.modules.items())

    def parameters(self) -> dict[str, mx.array]:
        """The model's real parameter arrays, flat, by dotted name."""
        return dict(tree_flatten(self.model.parameters()))

    def module_info(self) -> list[dict]:
        """Every module as plain data: short and full name, type, parameter count, children."""
        info = []
        for full, module in self.names.modules.items():
            children = [n for n in self.names.modules if n.startswith(full + ".") and "." not in n[len(full) + 1:]]
            info.append({
                "name": self.short_name(full),
                "full_name": full,
                "type": type(module).__name__,
                "params": getattr(module, "remote_params", None) or sum(v.size for _, v in tree_flatten(module.parameters())),
                "layer": self.names.layer_index(full),
                "children": [self.short_name(c) for c in children],
            })
        return info

    # -- tracing ---------------------------------------------------------------
    def trace(self, inputs, interventions=None, capture=None, should_stop=None, keep=None) -> Trace:
        """Run one forward pass; inside the block read ``.output.save()`` of any module.

        ``keep``: what ``trace.activations`` holds after the block: ``"saved"`` (what was saved
        or read in the block), ``"all"`` (every recorded output), or ``None``: everything when
        the outputs fit ``mlxterp.trace.keep_budget_mib`` (256 MiB unless set, or
        ``MLXTERP_KEEP_BUDGET_MIB``), otherwise what was saved, with a one-time notice.

        On a model split across processes (mlx.launch) every process runs the same trace, and
        with ``should_stop`` every process must pass one (``lambda: False`` where it has nothing
        to say): they agree on stopping together (see docs/scale.md).
        """
        return Trace(self, inputs, interventions=interventions, capture=capture, should_stop=should_stop,
                     keep=keep)

    @property
    def output(self) -> "ValueProxy":
        """The model's output (logits for a language model) in the active trace."""
        return ValueProxy(self, OUTPUT, "output")

    def active_trace(self) -> Trace:
        if self._active_trace is None:
            raise TraceError(
                ".save() and .output read the active trace: use them inside `with model.trace(inputs):`"
            )
        return self._active_trace

    def __call__(self, inputs, *args, **kwargs):
        """The logits ``(batch, tokens, vocab)`` of ``inputs``, taken and checked as ``trace`` takes
        them: a string, a list of strings, a list of token ids or an array of ids.

        >>> model("The capital of France is").shape  # (1, 6, vocab)
        >>> model([1, 267, 275])

        With more arguments (``cache=``, a mask) the call goes to the wrapped model unchanged."""
        if args or kwargs:
            return self.model(inputs, *args, **kwargs)
        with self.trace(inputs, capture=[], keep="saved") as trace:
            return trace.save(OUTPUT)

    # -- analysis (mlxterp.analysis) ---------------------------------------------
    def get_token_predictions(self, hidden, top_k: int = 10, return_scores: bool = False):
        from . import analysis
        return analysis.get_token_predictions(self, hidden, top_k=top_k, return_scores=return_scores)

    def logit_lens(self, text, layers=None, top_k: int = 1, position=None, plot: bool = False, **plot_options):
        from . import analysis
        return analysis.logit_lens(self, text, layers=layers, top_k=top_k, position=position, plot=plot, **plot_options)

    def activation_patching(self, clean_text, corrupted_text, component: str = "mlp", layers=None,
                            metric: str = "l2", plot: bool = False, **options):
        from . import analysis
        return analysis.activation_patching(self, clean_text, corrupted_text, component=component, layers=layers,
                                            metric=metric, plot=plot, **options)

    def get_attention_patterns(self, text, layers=None):
        from . import attention
        return attention.get_attention_patterns(self, text, layers=layers)

    # -- TransformerLens conveniences (docs/coming-from.md) ---------------------------
    def run_with_cache(self, inputs, names=None, interventions=None):
        """``(logits, cache)``: one forward pass and the values of ``names`` (TransformerLens'
        ``run_with_cache``). ``names`` is a name or pattern (``"layers.*.resid_post"``), a list of
        them, a function of a short name returning True for those to keep (``names_filter``), or
        None: every module output and every layer's residual hook points and ``attn.z``.

        >>> logits, cache = model.run_with_cache("The capital of France is", names="layers.*.resid_post")
        >>> cache["layers.8.resid_post"].shape, cache["resid_post", 8].shape  # (1, 6, hidden) twice
        """
        from . import hooks
        return hooks.run_with_cache(self, inputs, names, interventions)

    def hook_names(self) -> list[str]:
        """Short names of every hook point of every layer (``layers.0.resid_pre``, ...)."""
        modules = set(self.names.table.short_names())
        return [name for name in self.names.table.path_names() if name not in modules]

    def embed(self, inputs) -> mx.array:
        """Token embeddings ``(batch, tokens, hidden)``: the embedding module's output for a text,
        a list of token ids or an array of ids (before any scaling the model applies after it)."""
        name = self.names.find("embed")
        if name is None:
            raise UnknownModuleError("embed", self.names.suggest("embed"), "this model has no token embedding")
        if isinstance(inputs, str):
            inputs = self.encode(inputs)
        ids = mx.array(inputs)
        return self.names.modules[name](ids[None] if ids.ndim == 1 else ids)

    def final_norm(self, hidden: mx.array) -> mx.array:
        """The final norm applied to hidden states ``(..., hidden)`` (what the unembedding reads)."""
        name = self.names.find("norm")
        if name is None:
            raise UnknownModuleError("norm", self.names.suggest("norm"), "this model has no final norm")
        return self.names.modules[name](hidden)

    def unembed(self, hidden: mx.array, norm: bool = False) -> mx.array:
        """Logits (float32) of hidden states ``(..., hidden)`` through the unembedding (``lm_head``
        or the tied embedding, with the model's final softcap). Like TransformerLens it does not
        apply the final norm unless ``norm=True``: ``model.unembed(model.final_norm(h))`` equals
        ``model.unembed(h, norm=True)``, which is the logit lens."""
        from . import analysis
        return analysis.unembed(self, hidden, norm=norm)

    # -- generation (mlxterp.generate) ------------------------------------------------
    def generate(self, prompt, max_tokens: int = 20, interventions=None, capture=None, temperature: float = 0.0,
                 steps=None, **options):
        """Generate after ``prompt`` on mlx-lm's KV cache, with ``interventions`` at every step (or at
        ``steps``) and the outputs of ``capture`` per step; returns a ``Generation`` (see mlxterp.generate)."""
        from . import generate
        return generate.generate(self, prompt, max_tokens, interventions=interventions, capture=capture,
                                 temperature=temperature, steps=steps, **options)

    def stream_generate(self, prompt, max_tokens: int = 20, **options):
        """Each generated token as it is chosen (``Step``: step, token, text, activations)."""
        from . import generate
        return generate.stream_generate(self, prompt, max_tokens, **options)

    # -- heads and components (mlxterp.attribution) --------------------------------------
    def direct_logit_attribution(self, text, answer=None, wrong=None, position: int = -1, **options):
        """What the embedding, each layer's attention and MLP, and each head add to the logit of ``answer``
        (minus ``wrong``'s) at ``position``: a ``LogitAttribution``."""
        from . import attribution
        return attribution.direct_logit_attribution(self, text, answer, wrong, position=position, **options)

    def head_patching(self, clean_text, corrupted_text, **options):
        """Activation patching of each head's z, per layer and head (and position): a ``HeadPatching``."""
        from . import attribution
        return attribution.head_patching(self, clean_text, corrupted_text, **options)

    def attribution_patching(self, clean_text, corrupted_text, answers, **options):
        """The gradient approximation of activation patching for every layer, component, position and head."""
        from . import attribution
        return attribution.attribution_patching(self, clean_text, corrupted_text, answers, **options)

    def head_attention(self, text, layer: int, heads=None):
        """The attention pattern of ``heads`` of ``layer``: a compact heatmap in a terminal, ``save_plot()`` a PNG."""
        from . import attribution
        return attribution.head_attention(self, text, layer, heads)

    def __repr__(self) -> str:
        n_params = sum(p.size for p in self.parameters().values())
        hidden = self.hidden_size
        return (
            f"InterpretableModel({self.source}: {type(self.model).__name__}, {self.n_layers} layers"
            + (f", hidden {hidden}" if hidden else "")
            + f", {n_params:,} parameters"
            + (f", layers at {self.names.layers_prefix}" if self.names.layers_prefix else "")
            + ")"
        )


class LayerList:
    """``model.layers``: indexable, iterable proxies of the transformer blocks."""

    def __init__(self, model: InterpretableModel):
        self._model = model

    def __len__(self) -> int:
        return self._model.n_layers

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(n))]
        if not isinstance(index, int):
            raise TypeError(f"layers are indexed by int or slice, not {type(index).__name__}")
        if not -n <= index < n:
            raise LayerIndexError(index, n)
        return ModuleProxy(self._model, self._model.names.layer_names[index % n])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"<{len(self)} layers at {self._model.names.layers_prefix}>"


class ModuleProxy:
    """A module by name: ``.output``, ``.input``, sub-modules (``.attn``, ``.mlp.gate_proj``)."""

    __slots__ = ("_model", "_name")

    def __init__(self, model: InterpretableModel, full_name: str):
        self._model = model
        self._name = full_name

    @property
    def output(self) -> "ValueProxy":
        return ValueProxy(self._model, self._name, "output")

    @property
    def input(self) -> "ValueProxy":
        return ValueProxy(self._model, self._name, "input")

    @property
    def module(self) -> nn.Module:
        return self._model.names.modules[self._name]

    @property
    def name(self) -> str:
        return self._name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        try:
            full = self._model.resolve(f"{self._name}.{attr}")
            if full not in self._model.names.modules:  # a hook point: layers[8].resid_pre, layers[8].attn.z
                return HookProxy(self._model, full)
            return ModuleProxy(self._model, full)
        except UnknownModuleError as exc:
            module = self._model.names.modules[self._name]
            if attr in module or hasattr(module, attr):
                return getattr(module, attr)
            raise AttributeError(f"{self._model.short_name(self._name)} has no sub-module or attribute {attr!r}: {exc}") from None

    def __getitem__(self, index):
        return ModuleProxy(self._model, self._model.resolve(f"{self._name}.{index}"))

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._model.short_name(self._name)}: {type(self.module).__name__}>"


class HookProxy:
    """A hook point by name (``model.layers[8].resid_pre``, ``model.layers[8].attn.z``):
    ``.save()`` inside a trace; ``.head[3]`` selects heads of ``q``, ``k``, ``v``, ``z`` and ``pattern``."""

    __slots__ = ("_model", "_name")

    def __init__(self, model: InterpretableModel, full_name: str):
        self._model = model
        self._name = full_name

    @property
    def name(self) -> str:
        return self._name

    @property
    def head(self) -> "_Heads":
        return _Heads(self)

    @property
    def output(self) -> "ValueProxy":
        return ValueProxy(self._model, self._name, "output")

    def save(self) -> mx.array:
        """Keep this value after the block; returns it."""
        return self.output.save()

    @property
    def value(self) -> mx.array:
        return self.save()

    def __repr__(self) -> str:
        return f"<hook point {self._model.short_name(self._name)}>"


class _Heads:
    __slots__ = ("_hook",)

    def __init__(self, hook: HookProxy):
        self._hook = hook

    def __getitem__(self, index) -> HookProxy:
        if isinstance(index, (list, tuple)):
            text = ",".join(str(int(i)) for i in index)
        elif isinstance(index, slice) and index.step is None and index.start is not None and index.stop is not None:
            text = f"{index.start}..{index.stop - 1}"
        else:
            text = str(int(index))
        model = self._hook._model
        return HookProxy(model, model.resolve(f"{self._hook._name}.head[{text}]"))


class ValueProxy:
    """The output (or input) of one module in the active trace."""

    __slots__ = ("_model", "_name", "_what")

    def __init__(self, model, full_name, what):
        self._model, self._name, self._what = model, full_name, what

    def save(self) -> mx.array:
        """Keep this value after the block; returns it (an evaluated mx.array once the block ends)."""
        if self._model._active_trace is None:
            raise TraceError(
                f"{self._model.short_name(self._name)}.{self._what}.save() must be called inside "
                "`with model.trace(inputs):` — outside a trace there is no activation to save"
            )
        return self._model._active_trace.save(self._name, self._what)

    @property
    def value(self) -> mx.array:
        return self.save()

    def __repr__(self) -> str:
        return f"<{self._what} of {self._model.short_name(self._name)}>"
