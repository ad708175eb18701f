"""Shared fixtures: the bundled demo model (loaded once) and tiny random models built from configs."""

import os

# MLX's CUDA backend runs float32 matrix products in TF32 (10-bit mantissa) unless told otherwise;
# the tests compare float32 results to 1e-5 and need full float32. Set before the first MLX op (MLX
# reads it then); it changes nothing on the CPU or Metal. An explicit value in the environment wins.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

from mlxterp import InterpretableModel  # noqa: E402


@pytest.fixture(scope="session")
def demo_model():
    return InterpretableModel("demo")


def tiny_llama(n_layers=4, hidden=64, vocab=100, tie=True, seed=0):
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=n_layers, intermediate_size=2 * hidden,
        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=vocab, num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    base = llama.Model(args)
    mx.eval(base.parameters())
    return base


@pytest.fixture
def llama_base():
    return tiny_llama()
