"""Fixed-length training samples from token sequences (documents), by whole-document packing.

Packing rule: documents (each already ``[bos] + text + [eod]``, see ``protocol.document_ids``)
are laid, in the given order, into windows of ``seq_length + 1`` tokens.  A document is never
split: when the next one does not fit, the window is closed and right-padded with ``pad_id``.
So every window starts at a document start (position 0 sees ``bos`` exactly as at evaluation) and
no sample holds a truncated question.  A document longer than ``seq_length + 1`` is an error.

A sample (``__getitem__``) is a dict of 1-D tensors of length ``s = seq_length``:

* ``tokens``       int64   window[:-1]
* ``labels``       int64   window[1:]  (the next token)
* ``loss_mask``    float32 1.0 where the label is a real token (also eod), 0.0 on padding
* ``position_ids`` int64   0..s-1  (positions are not reset at document boundaries, as in
  Megatron's GPTDataset with reset_position_ids=False; attention is causal across the window)

Batches (``iterator.collate``) stack these to ``[b, s]``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class PackedDataset(torch.utils.data.Dataset):
    """Whole-document packing of ``sequences`` into ``seq_length + 1`` token windows."""

    def __init__(self, sequences: Sequence[Sequence[int]], *, seq_length: int, pad_id: int) -> None:
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"PackedDataset seq_length={seq_length!r}: must be an integer >= 1")
        if not sequences:
            raise ValueError("PackedDataset sequences=[]: needs at least one document")
        window = seq_length + 1
        self.seq_length = seq_length
        self.pad_id = pad_id
        rows: list[list[int]] = []
        current: list[int] = []
        for i, seq in enumerate(sequences):
            if len(seq) == 0:
                raise ValueError(f"PackedDataset sequences[{i}] is empty")
            if len(seq) > window:
                raise ValueError(
                    f"PackedDataset sequences[{i}] has {len(seq)} tokens > seq_length + 1 = "
                    f"{window}; raise seq_length to at least {len(seq) - 1} or shorten documents")
            if len(current) + len(seq) > window:
                rows.append(current)
                current = []
            current.extend(int(t) for t in seq)
        rows.append(current)
        # windows: [n, s + 1] token ids; lengths: [n] real (non-pad) tokens at the window start
        self.windows = np.full((len(rows), window), pad_id, dtype=np.int64)
        self.lengths = np.array([len(r) for r in rows], dtype=np.int64)
        for r, row in enumerate(rows):
            self.windows[r, :len(row)] = row
        self.num_documents = len(sequences)
        self.num_real_tokens = int(self.lengths.sum())
        logger.info("packed %d documents into %d windows of %d tokens (%.1f%% real tokens)",
                    self.num_documents, len(rows), window,
                    100.0 * self.num_real_tokens / self.windows.size)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.windows[idx])  # [s + 1]
        s = self.seq_length
        # label t is window[t + 1]; it is real iff t + 1 < length
        loss_mask = (torch.arange(1, s + 1) < int(self.lengths[idx])).to(torch.float32)
        return {
            "tokens": window[:-1].clone(),
            "labels": window[1:].clone(),
            "loss_mask": loss_mask,
            "position_ids": torch.arange(s, dtype=torch.int64),
        }
