"""Tokenizer wrapper: chat template, padded batch encoding, decoding, the set of stop ids.

`transformers.AutoTokenizer` over the model directory's tokenizer files (never remote code). The
chat template is rendered by `transformers`, which needs `jinja2` (a declared dependency).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


class TokenizerError(ValueError):
    pass


def bucket(n: int, buckets: Sequence[int] | None = None, *, minimum: int = 1) -> int:
    """Smallest bucket >= n; default buckets are powers of two (>= minimum)."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b)
        raise TokenizerError(f"length {n} exceeds the largest bucket {max(buckets)}; add a larger bucket")
    b = max(1, minimum)
    while b < n:
        b *= 2
    return b


def length_bucket(n: int, minimum: int = 16) -> int:
    """Smallest of minimum * {1, 1.5, 2, 3, 4, 6, 8, ...} (powers of two and their midpoints) >= n.

    At most a third of a row is padding, and a run compiles few update programs (a few prompt
    buckets times a few completion buckets)."""
    b = int(minimum)
    while True:
        if b >= n:
            return b
        if b + b // 2 >= n:
            return b + b // 2
        b *= 2


class Tokenizer:
    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen = {}
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
        from transformers import AutoTokenizer

        if not any(os.path.isfile(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer.model / vocab.json)")
        self._tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.vocab_size = len(self._tok)
        eos = {self._tok.eos_token_id} if self._tok.eos_token_id is not None else set()
        pad = self._tok.pad_token_id
        self.bos_id = self._tok.bos_token_id
        self.chat_template = self._tok.chat_template
        g = gen.get("eos_token_id")
        if g is not None:
            eos |= set(g if isinstance(g, list) else [g])
        self.eos_ids: frozenset[int] = frozenset(int(e) for e in eos if e is not None)
        if pad is None:
            pad = gen.get("pad_token_id")
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        self.pad_id = int(pad)

    # ------------------------------------------------------------------ API
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError(f"{self.model_dir}: the tokenizer has no chat template; add 'chat_template' to tokenizer_config.json")
        import jinja2

        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise TokenizerError(
                f"{self.model_dir}: the chat template cannot be rendered ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                "fix or replace 'chat_template' in tokenizer_config.json"
            ) from None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [list(x) for x in self._tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def pad(self, seqs: Sequence[Sequence[int]], *, side: str = "left", length: int | None = None,
            length_buckets: Sequence[int] | None = None, batch: int | None = None):
        """Pad id lists into (tokens [B, T] int32, mask [B, T] int32).

        `length`: exact T (error if a sequence is longer); otherwise T = the bucket of the longest
        sequence. `batch`: pad the batch with empty rows up to this size (bucketed batches).
        """
        if side not in ("left", "right"):
            raise TokenizerError(f"padding side {side!r}: use 'left' or 'right'")
        longest = max((len(s) for s in seqs), default=0)
        T = length if length is not None else bucket(longest, length_buckets, minimum=8)
        if longest > T:
            raise TokenizerError(f"a sequence has {longest} tokens but the padded length is {T}")
        B = max(batch or 0, len(seqs))
        tokens = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        for i, s in enumerate(seqs):
            n = len(s)
            if n == 0:
                continue
            if side == "left":
                tokens[i, T - n:] = s
                mask[i, T - n:] = 1
            else:
                tokens[i, :n] = s
                mask[i, :n] = 1
        return tokens, mask

    def encode_chat_batch(self, conversations: Sequence[list[dict]], **pad_kw):
        texts = [self.apply_chat_template(m) for m in conversations]
        return self.pad(self.encode_batch(texts), **pad_kw)
