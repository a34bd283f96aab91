"""Wrapper around a Hugging Face ``tokenizer.json`` (the `tokenizers` library) with our protocol."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer as _HFTokenizer

from nemo_elastic.errors import DataError

logger = logging.getLogger(__name__)

# Tried in order when eod_token is None.
DEFAULT_EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class HFTokenizer:
    """A ``tokenizer.json`` loaded with ``tokenizers.Tokenizer.from_file``.

    Args:
        path: the tokenizer.json file.
        eod_token: the end-of-document token (e.g. ``"</s>"``, ``"<|endoftext|>"``).  None picks
            the first of ``DEFAULT_EOD_TOKENS`` present.  A token absent from the vocabulary is a
            ValueError naming it.
        bos_token / pad_token: optional; the same rule applies when given.
        add_special_tokens: passed to ``Tokenizer.encode``.  False by default so that documents
            are exactly the text ids and the data layer adds bos/eod itself (Megatron convention).
    """

    def __init__(self, path: str | Path, *, eod_token: Optional[str] = None,
                 bos_token: Optional[str] = None, pad_token: Optional[str] = None,
                 add_special_tokens: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"HFTokenizer path={str(self.path)!r}: no such file; pass the "
                                    "tokenizer.json of a Hugging Face tokenizer")
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"tokenizer {str(self.path)!r} is not a valid Hugging Face "
                            f"tokenizer.json ({reason}); pass the tokenizer.json saved by "
                            "`tokenizers` / `transformers`") from None
        self.add_special_tokens = add_special_tokens
        if eod_token is None:
            present = [t for t in DEFAULT_EOD_TOKENS if self._tok.token_to_id(t) is not None]
            eod_token = present[0] if present else None
            if eod_token is None:
                raise DataError(
                    f"HFTokenizer eod_token=None: none of {DEFAULT_EOD_TOKENS} is in "
                    f"{self.path}; pass eod_token= one of its special tokens "
                    f"{self._special_tokens_hint()}")
        self.eod_token = eod_token
        self.eod_id = self._require_id("eod_token", eod_token)
        self.bos_id = None if bos_token is None else self._require_id("bos_token", bos_token)
        self.pad_id = None if pad_token is None else self._require_id("pad_token", pad_token)
        with open(self.path, "rb") as f:
            digest = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        self.name = f"hf-{self.path.name}-{digest[:12]}"
        logger.info("loaded %s: vocab_size=%d eod=%r(%d)", self.path, self.vocab_size, eod_token,
                    self.eod_id)

    def _special_tokens_hint(self) -> str:
        added = [t.content for t in self._tok.get_added_tokens_decoder().values()]
        return f"(added tokens: {added[:20]})" if added else "(it has no added tokens)"

    def _require_id(self, field_name: str, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(f"HFTokenizer {field_name}={token!r}: token not in the vocabulary of "
                             f"{self.path}; pass one of its special tokens "
                             f"{self._special_tokens_hint()}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in
                self._tok.encode_batch(texts, add_special_tokens=self.add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)
