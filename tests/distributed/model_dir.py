"""A tiny random-initialised mlx-lm model directory (qwen2, byte-level tokenizer adding BOS) for command-line tests.

    python model_dir.py DIR        (or make_model_dir(DIR) from a test)
"""

import json
import sys
from pathlib import Path

BOS = "<s>"


def make_model_dir(directory, n_layers: int = 4, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE without merges: one token per byte, then BOS.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[BOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS).save_pretrained(str(directory))

    config = dict(
        model_type="qwen2", hidden_size=32, num_hidden_layers=n_layers, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab), rms_norm_eps=1e-5,
        max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=vocab[BOS],
    )
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    # mlx-lm's sharded_load reads the index to pick each pipeline stage's files.
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in weights}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


if __name__ == "__main__":
    make_model_dir(sys.argv[1])
