"""Tokenizer helpers: text to token ids and back, one place for every entry point."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import InputError


def as_id_list(tokens) -> list[int]:
    """A flat list of ints from a list, a 1-D mx/numpy array, or a (1, L) array."""
    if isinstance(tokens, (mx.array, np.ndarray)):
        array = np.array(tokens)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1:
            raise InputError(f"expected one sequence of token ids, got an array of shape {tuple(array.shape)}")
        return [int(t) for t in array.tolist()]
    if isinstance(tokens, int):
        return [tokens]
    return [int(t) for t in tokens]


class TokenizerHelpers:
    """The tokenizer part of InterpretableModel (encode, decode, token_to_str ...)."""

    tokenizer = None

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; pass tokenizer= to InterpretableModel or trace arrays")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with BOS when the tokenizer adds one."""
        if not isinstance(text, str):
            raise InputError(f"encode takes a string, got {type(text).__name__}")
        return list(self._require_tokenizer().encode(text))

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, tokens) -> str:
        return self._require_tokenizer().decode(as_id_list(tokens))

    def token_to_str(self, token_id) -> str:
        """The text of one token, special tokens included (``'<s>'``, ``' Paris'``)."""
        if isinstance(token_id, (mx.array, np.ndarray)):
            token_id = int(np.array(token_id).reshape(-1)[0])
        return self._require_tokenizer().decode([int(token_id)])

    def token_strings(self, tokens) -> list[str]:
        return [self.token_to_str(t) for t in as_id_list(tokens)]

    @property
    def vocab_size(self) -> int:
        tokenizer = self._require_tokenizer()
        size = getattr(tokenizer, "vocab_size", None)
        return int(size) if size is not None else len(tokenizer.get_vocab())
