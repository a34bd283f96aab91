"""A tiny fixed-alphabet character tokenizer for the synthetic corpus (vocab 54, no files)."""

from __future__ import annotations

import hashlib
import string
from typing import Iterable

# Ids 0..2 are the special tokens; characters follow in this fixed order.
PAD, BOS, EOD = "<pad>", "<bos>", "<eod>"
SPECIAL_TOKENS = (PAD, BOS, EOD)
ALPHABET = string.digits + "\n +-*/%()=?;:,." + string.ascii_uppercase


class CharTokenizer:
    """Character-level tokenizer over ``ALPHABET`` with pad (0), bos (1) and eod (2).

    ``encode`` raises ValueError on a character outside the alphabet (naming it and its
    position); ``decode`` drops special tokens unless ``skip_special=False``.
    """

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"CharTokenizer alphabet={alphabet!r}: characters must be unique")
        self.alphabet = alphabet
        self._tokens = list(SPECIAL_TOKENS) + list(alphabet)
        self._char_to_id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}
        self.pad_id, self.bos_id, self.eod_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.bos_id, self.eod_id)

    @property
    def name(self) -> str:
        """A stable identity (used in dataset cache keys)."""
        digest = hashlib.md5(self.alphabet.encode("utf-8"), usedforsecurity=False).hexdigest()
        return f"char-{self.vocab_size}-{digest[:8]}"

    def encode(self, text: str) -> list[int]:
        try:
            return [self._char_to_id[c] for c in text]
        except KeyError as err:
            pos = next(i for i, c in enumerate(text) if c not in self._char_to_id)
            raise ValueError(
                f"CharTokenizer.encode: character {text[pos]!r} at position {pos} of "
                f"{text[max(0, pos - 10):pos + 10]!r} is not in the alphabet {self.alphabet!r}; "
                "use only those characters or pass a larger alphabet") from err

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._tokens):
                raise ValueError(f"CharTokenizer.decode: id {i} outside [0, {len(self._tokens)})")
            if i < len(SPECIAL_TOKENS):
                if not skip_special:
                    out.append(self._tokens[i])
                continue
            out.append(self._tokens[i])
        return "".join(out)
