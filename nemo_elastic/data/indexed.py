"""Train/valid samples from Megatron-Core indexed datasets via Megatron's own ``GPTDataset``.

``build_indexed_datasets`` runs ``BlendedMegatronDatasetBuilder(GPTDataset, ...)`` in the current
process.  It needs no torch.distributed: every collective in the builder is guarded by
``torch.distributed.is_initialized()``.  When torch.distributed *is* initialised the builder
builds (and caches) on rank 0 first, barriers, then builds on the other ranks (cache hits), so it
must then be called on every rank.  Without torch.distributed, processes sharing a cache dir
must not build the same new dataset concurrently (build once first).

GPTDataset semantics (Megatron, not ours): documents of the split are shuffled (seed
``random_seed``), concatenated into one stream and cut into windows of ``seq_length + 1`` tokens
that *do* cross document boundaries; the windows are shuffled again.  ``split="98,2,0"`` assigns
contiguous document ranges to train/valid/test.  ``num_samples=None`` means exactly one epoch;
more samples repeat the documents in new shuffles.

Each item is converted to the same sample dict as ``PackedDataset`` (tokens/labels int64,
loss_mask float32, position_ids int64, all ``[s]``); ``iterator.BatchIterator`` batches either.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from nemo_elastic.data.dataset import SAMPLE_KEYS
from nemo_elastic.data.protocol import TokenizerProtocol
from nemo_elastic.errors import DataError

logger = logging.getLogger(__name__)


class MegatronTokenizerAdapter:
    """The subset of Megatron's tokenizer interface that GPTDataset reads.

    GPTDatasetConfig reads ``vocab_size`` (to pick a token dtype code, only used with
    ``sequences_per_dataset``); GPTDataset reads ``eod`` (position/mask resets) and, if present,
    ``pad`` (padding of a short last validation window); MegatronDataset hashes
    ``unique_identifiers`` into the cache file names.  ``pad`` is absent on purpose: Megatron
    then pads with -1 (never a real id) and maps it to token 0 with loss_mask 0.
    """

    def __init__(self, tokenizer: TokenizerProtocol) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = int(tokenizer.eod_id)
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        self.unique_identifiers = OrderedDict(
            [("class", f"{type(self).__qualname__}"), ("tokenizer", str(name)),
             ("vocab_size", self.vocab_size), ("eod", self.eod)])


@dataclass(kw_only=True)
class IndexedDatasetsConfig:
    """What ``build_indexed_datasets`` needs; validated in ``__post_init__``."""

    prefixes: Sequence[str]  # one or more ``.bin/.idx`` prefixes (a blend)
    seq_length: int
    seed: int = 1234
    split: str = "98,2,0"  # train,valid,test weights over contiguous document ranges
    weights: Optional[Sequence[float]] = None  # blend weights; None = proportional to size
    train_samples: Optional[int] = None  # None = one epoch of the train split
    valid_samples: Optional[int] = None  # None = one epoch of the valid split
    # indices go to "<cache_dir>/<data_fingerprint>/"; None = "<dir of first prefix>/megatron_cache"
    cache_dir: Optional[str] = None
    reset_position_ids: bool = False  # restart position ids after every eod
    eod_mask_loss: bool = False  # loss_mask 0 where the *input* token is eod

    def __post_init__(self) -> None:
        if isinstance(self.prefixes, (str, os.PathLike)):
            self.prefixes = [self.prefixes]
        self.prefixes = [str(p) for p in self.prefixes]
        if not self.prefixes:
            raise ValueError("IndexedDatasetsConfig.prefixes=[]: pass at least one prefix written "
                             "by preprocess_to_indexed")
        for p in self.prefixes:
            if not IndexedDataset.exists(p):
                raise FileNotFoundError(
                    f"IndexedDatasetsConfig.prefixes: {p!r} has no {p}.bin + {p}.idx pair; pass "
                    "the output_prefix given to preprocess_to_indexed (without .bin/.idx)")
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise ValueError(f"IndexedDatasetsConfig.seq_length={self.seq_length!r}: must be >= 1")
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise ValueError(f"IndexedDatasetsConfig.weights={list(self.weights)!r}: needs one "
                             f"weight per prefix ({len(self.prefixes)})")
        for name in ("train_samples", "valid_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"IndexedDatasetsConfig.{name}={value!r}: must be None or >= 1")
        if self.weights is not None and (self.train_samples is None or self.valid_samples is None):
            raise ValueError("IndexedDatasetsConfig.weights: Megatron needs train_samples and "
                             "valid_samples when blend weights are given; set both or weights=None")
        if self.cache_dir is None:
            self.cache_dir = os.path.join(os.path.dirname(os.path.abspath(self.prefixes[0])),
                                          "megatron_cache")


def data_fingerprint(prefixes: Sequence[str]) -> str:
    """Identity of the ``.bin/.idx`` files (path, sizes, modification times).

    Megatron's cache key covers the path, seed, split and sequence length but not the file
    contents, so re-running ``preprocess_to_indexed`` on the same prefix would silently reuse
    stale indices.  We therefore keep each data version's indices in its own cache subdirectory.
    """
    h = hashlib.md5(usedforsecurity=False)
    for prefix in prefixes:
        for path in (prefix + ".idx", prefix + ".bin"):
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class IndexedSamples(torch.utils.data.Dataset):
    """A Megatron GPTDataset (or BlendedDataset) seen through our sample-dict format."""

    def __init__(self, megatron_dataset: torch.utils.data.Dataset) -> None:
        self.megatron_dataset = megatron_dataset

    def __len__(self) -> int:
        return len(self.megatron_dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = self.megatron_dataset[idx]  # tokens/labels/loss_mask/position_ids: [s]
        sample = {key: item[key] for key in SAMPLE_KEYS}
        sample["tokens"] = sample["tokens"].to(torch.int64)
        sample["labels"] = sample["labels"].to(torch.int64)
        sample["loss_mask"] = sample["loss_mask"].to(torch.float32)
        sample["position_ids"] = sample["position_ids"].to(torch.int64)
        return sample


def build_indexed_datasets(config: IndexedDatasetsConfig, tokenizer: TokenizerProtocol
                           ) -> tuple[IndexedSamples, Optional[IndexedSamples]]:
    """Build (train, valid) from ``config``; valid is None when the split gives it no weight."""
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=(list(config.prefixes), None if config.weights is None else list(config.weights)),
        split=config.split,
        path_to_cache=os.path.join(config.cache_dir, data_fingerprint(config.prefixes)),
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=False,  # only affects the mask, which we do not build
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=False,  # no per-sample [1, s, s] bool mask; kernels are causal
    )
    # Megatron requires a size for every split once blend weights are given; we never use test.
    sizes = [config.train_samples, config.valid_samples, None if config.weights is None else 0]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_config)
    train, valid, _ = builder.build()
    if train is None or len(train) == 0:
        raise DataError(f"data.indexed.split={config.split!r}: the train split of "
                        f"{list(config.prefixes)} at seq_length={config.seq_length} holds no "
                        "sample; give train more weight, lower seq_length or add data")
    if valid is not None and len(valid) == 0:
        raise DataError(f"data.indexed.split={config.split!r}: the validation split of "
                        f"{list(config.prefixes)} at seq_length={config.seq_length} holds no "
                        "sample; give it more weight, lower seq_length or add data")
    logger.info("indexed datasets: %d train samples, %s valid samples (cache %s)", len(train),
                "no" if valid is None else len(valid), config.cache_dir)
    return IndexedSamples(train), None if valid is None else IndexedSamples(valid)
