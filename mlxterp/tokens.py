"""Tokenizer helpers: text to token ids and back, one place for every entry point.

A token whose bytes are not valid UTF-8 on their own (one byte of "ü" in a byte-level BPE
vocabulary, a sentencepiece byte-fallback token) is shown with those bytes as ``<0xC3>``,
not as the replacement character "�" that decoding it alone gives; ``mlxterp.core.positions``
reads such text back into bytes, so ``@ "Zürich"`` finds the tokens that spell it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .core.positions import show_bytes
from .errors import InputError


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the character a byte-level BPE vocabulary
    writes for each byte -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


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
        """The text of one token, special tokens included (``'<s>'``, ``' Paris'``); bytes that are
        not valid UTF-8 alone as ``<0xC3>``. Raises InputError for an id outside the vocabulary."""
        if isinstance(token_id, (mx.array, np.ndarray)):
            token_id = int(np.array(token_id).reshape(-1)[0])
        tokenizer = self._require_tokenizer()
        token_id = int(token_id)
        size = self.token_count
        if not 0 <= token_id < size:
            raise InputError(f"token id {token_id} is outside the vocabulary (valid ids: 0..{size - 1})")
        text = tokenizer.decode([token_id])
        if "\ufffd" in text:
            raw = self._token_bytes(token_id)
            if raw is not None:
                return show_bytes(raw)
        return text

    @property
    def token_count(self) -> int:
        """How many token ids there are: the input embedding's rows when larger than the tokenizer's
        vocabulary (padded vocabularies), else the vocabulary."""
        rows = getattr(self, "embedding_rows", None)
        try:  # added tokens (specials) can lie beyond vocab_size
            added = len(getattr(self.tokenizer, "_tokenizer", self.tokenizer))
        except TypeError:
            added = 0
        return max(self.vocab_size, rows or 0, added)

    def _token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes of a token from its vocabulary entry (byte-level BPE or byte fallback), or None."""
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        if convert is None:
            return None
        try:
            piece = convert(token_id)
        except Exception:  # a tokenizer that cannot say
            return None
        if not isinstance(piece, str):
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        if piece and all(ch in BYTE_DECODER for ch in piece):
            return bytes(BYTE_DECODER[ch] for ch in piece)
        return None

    def token_strings(self, tokens) -> list[str]:
        return [self.token_to_str(t) for t in as_id_list(tokens)]

    @property
    def vocab_size(self) -> int:
        tokenizer = self._require_tokenizer()
        size = getattr(tokenizer, "vocab_size", None)
        return int(size) if size is not None else len(tokenizer.get_vocab())
