"""The tokenizer protocol shared by the character tokenizer and the Hugging Face wrapper."""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable


@runtime_checkable
class TokenizerProtocol(Protocol):
    """What the data layer needs from a tokenizer.

    ``bos_id`` (optional, may be None) is not part of the check: a tokenizer without it simply
    has no beginning-of-document token.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def document_ids(tokenizer: TokenizerProtocol, text: str, *,
                 append_eod: bool = True) -> list[int]:
    """Token ids of one training document: ``[bos] + encode(text) + [eod]``.

    bos is prepended only if the tokenizer defines ``bos_id`` (not None); eod only if
    ``append_eod``.  The evaluator builds its prompts the same way (without the eod).
    """
    bos: Optional[int] = getattr(tokenizer, "bos_id", None)
    ids = ([bos] if bos is not None else []) + list(tokenizer.encode(text))
    if append_eod:
        ids.append(tokenizer.eod_id)
    return ids
