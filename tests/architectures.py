"""Tiny random-initialised mlx-lm models of many architectures, for tests that must hold for any of them.

``tiny_model("qwen3_moe")`` builds ``mlx_lm.models.qwen3_moe.Model`` from the
smallest sensible config (hidden 32, 2 layers, vocab 96, 4 heads over 2
key/value heads, 4 experts choosing 2), with a fixed seed and its parameters
evaluated. ``ARCHITECTURES`` lists every name it builds (``TRANSFORMERS`` those
with softmax attention in every layer). Each config is the
shared ``BASE`` plus the fields that architecture names differently or needs
in addition; ``ModelArgs.from_dict`` drops the fields an architecture does not
have, exactly as mlx-lm does when it reads a ``config.json``.
"""

import importlib

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import MODEL_REMAPPING

HIDDEN = 32
N_LAYERS = 2
VOCAB = 96

BASE = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=N_LAYERS,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=HIDDEN // 4,
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
    layer_norm_eps=1e-5,
    max_position_embeddings=128,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)

# A small mixture of experts, in the field names the MoE architectures use.
MOE = dict(
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)

GPT2_STYLE = dict(
    n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_ctx=128, n_positions=128, n_inner=64,
    layer_norm_epsilon=1e-5, num_key_value_heads=None,
)

# Per architecture: what differs from BASE. Windows of 4 tokens and
# alternating window/global layers make the sliding-window code paths run.
CONFIGS = {
    "llama": {},
    "mistral": {},  # mlx-lm runs mistral checkpoints with llama.py
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {},
    "qwen3_moe": {**MOE, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 32},
    "gemma": {},
    "gemma2": {"query_pre_attn_scalar": 8.0},
    "gemma3_text": {"query_pre_attn_scalar": 8, "sliding_window": 4, "sliding_window_pattern": 2},
    "phi": {"partial_rotary_factor": 0.5},
    "phi3": {},
    "phimoe": {**MOE},
    "gpt2": GPT2_STYLE,
    "gpt_bigcode": GPT2_STYLE,
    "gpt_neox": {"rotary_emb_base": 10000, "rotary_pct": 0.5, "num_key_value_heads": None},
    "starcoder2": {"norm_epsilon": 1e-5},
    "stablelm": {"use_qkv_bias": False, "partial_rotary_factor": 0.5},
    "olmo2": {},
    "olmo3": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "olmoe": {**MOE},
    "mixtral": {**MOE},
    "deepseek_v2": {
        **MOE, "n_shared_experts": 1, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 8, "v_head_dim": 8, "first_k_dense_replace": 1,
        "rope_scaling": {"type": "yarn", "factor": 1.0},  # deepseek_v2.py reads it unconditionally
    },
    "deepseek_v3": {
        **MOE, "n_shared_experts": 1, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 8, "v_head_dim": 8, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    },
    "cohere": {"use_qk_norm": False},
    "cohere2": {"sliding_window": 4, "sliding_window_pattern": 2},
    "internlm2": {},
    "internlm3": {},
    "granite": {
        "logits_scaling": 2.0, "attention_multiplier": 0.125, "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
    },
    "granitemoe": {
        **MOE, "logits_scaling": 2.0, "attention_multiplier": 0.125, "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
    },
    "minicpm": {"dim_model_base": HIDDEN, "scale_depth": 1.4, "scale_emb": 2.0},
    "exaone": {"num_layers": N_LAYERS, "layer_norm_epsilon": 1e-5},
    "glm4": {"partial_rotary_factor": 0.5},
    "helium": {},
    "smollm3": {"no_rope_layer_interval": 2},
    "ernie4_5": {"use_bias": False},
    "seed_oss": {},
    "nemotron": {"hidden_act": "relu2", "norm_eps": 1e-5},
    "hunyuan_v1_dense": {},
    "apertus": {"post_norm": False, "qk_norm": True},
    "gptj": {**GPT2_STYLE, "rotary_dim": 4},
    "gpt_oss": {**MOE, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "llama4_text": {"intermediate_size_mlp": 64, "no_rope_layers": [1, 0], "use_qk_norm": True},
    "glm4_moe": {
        **MOE, "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
        "routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "rope_scaling": None, "use_qk_norm": True,
        "partial_rotary_factor": 0.5,
    },
    "dots1": {
        **MOE, "first_k_dense_replace": 1, "n_shared_experts": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
    },
    "minicpm3": {
        "dim_model_base": HIDDEN, "scale_depth": 1.4, "scale_emb": 2.0, "q_lora_rank": 24,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "kv_lora_rank": 16,
        "rope_scaling": {"original_max_position_embeddings": 128},  # minicpm3.py reads it unconditionally
    },
    "ernie4_5_moe": {"use_bias": False, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32},
    "openelm": {
        "num_transformer_layers": N_LAYERS, "model_dim": HIDDEN, "ffn_dim_divisor": 8, "num_query_heads": [4, 4],
        "num_kv_heads": [2, 2], "ffn_multipliers": [2.0, 2.0],
    },
    "qwen3_next": {
        **MOE, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4, "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 32, "mlp_only_layers": [], "partial_rotary_factor": 0.5,
        "full_attention_interval": 2,
    },
    "lfm2": {
        "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": HIDDEN, "block_multiple_of": 8,
        "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False, "block_ff_dim": 64,
        "layer_types": ["conv", "full_attention"],
    },
    "mamba": {
        "state_size": 4, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "time_step_rank": 4,
    },
}

ARCHITECTURES = list(CONFIGS)
# Layers that mix tokens without softmax attention (linear attention, convolution, state space):
# tests of attention patterns or KV caches use TRANSFORMERS.
RECURRENT_MIXERS = ("qwen3_next", "lfm2", "mamba")
TRANSFORMERS = [arch for arch in ARCHITECTURES if arch not in RECURRENT_MIXERS]


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A random-initialised 2-layer ``mlx_lm.models.<arch>.Model`` (parameters evaluated)."""
    if arch not in CONFIGS:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(ARCHITECTURES)}")
    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(arch, arch)}")
    args = module.ModelArgs.from_dict({**BASE, **CONFIGS[arch], "model_type": arch})
    mx.random.seed(seed)
    model = module.Model(args)
    mx.eval(model.parameters())
    return model


# Architectures the battery also runs 4-bit quantized (mlx-lm's quantize_model, as `mlx_lm.convert -q`
# does): untied and tied unembeddings (a tied one becomes a QuantizedEmbedding, decoded with as_linear),
# scaled embeddings, fused projections, mixtures of experts (quantized SwitchLinear).
QUANTIZED = ["llama", "qwen2", "qwen3", "gemma", "gemma3_text", "gpt2", "phi3", "qwen3_moe", "mixtral"]
QUANTIZED_GROUP = 32  # HIDDEN is 32: every projection's input width is a multiple of it


def tiny_quantized(arch: str, seed: int = 0) -> nn.Module:
    """``tiny_model(arch)`` with its linear layers and embedding quantized to 4 bits."""
    from mlx_lm.utils import quantize_model

    model = tiny_model(arch, seed)
    # One setting for every layer (a model's own predicate may ask 8 bits in groups of 64 for its router).
    model, _ = quantize_model(model, {}, group_size=QUANTIZED_GROUP, bits=4,
                              quant_predicate=lambda path, module: module.weight.shape[-1] % QUANTIZED_GROUP == 0)
    mx.eval(model.parameters())
    return model
