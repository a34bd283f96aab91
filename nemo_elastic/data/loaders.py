"""Training data for a `Config`: the synthetic reasoning corpus or Megatron indexed datasets.

Both sources yield the same batch dicts (`tokens`, `labels`, `loss_mask`, `position_ids`,
each `[b, s]`); the train iterator is resumable (`state_dict()` is stored in checkpoints).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from nemo_elastic.config import Config, ConfigError

if TYPE_CHECKING:
    from nemo_elastic.runtime import RankInfo

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    tokenizer: Any
    train_iter: Any  # nemo_elastic.data.BatchIterator
    val_dataset: Any
    val_problems: Optional[list] = None  # synthetic only: problems for answer accuracy


def build_tokenizer(cfg: Config):
    from nemo_elastic.data import CharTokenizer, HFTokenizer

    if cfg.data.source == "synthetic":
        tokenizer = CharTokenizer()
    else:
        path = cfg.data.indexed.tokenizer
        if not path or not os.path.isfile(path):  # named as the recipe names it
            raise ConfigError(f"data.indexed.tokenizer={path!r}: no such file; pass the "
                              "tokenizer.json given to `nemo-elastic preprocess --tokenizer`")
        tokenizer = HFTokenizer(path, eod_token=cfg.data.indexed.eod_token)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); set model.vocab_size >= {tokenizer.vocab_size} (a multiple "
            "of the tensor-parallel size)")
    return tokenizer


def build_training_data(cfg: Config, info: "RankInfo") -> TrainingData:
    from nemo_elastic.data import BatchIterator, PackedDataset, document_ids, generate_corpus

    d = cfg.data
    tokenizer = build_tokenizer(cfg)
    val_problems = None
    if d.source == "synthetic":
        corpus = generate_corpus(d.synthetic)
        to_ids = lambda problems: [document_ids(tokenizer, p.text) for p in problems]  # noqa: E731
        train = PackedDataset(to_ids(corpus.train), seq_length=d.seq_length, pad_id=tokenizer.pad_id)
        val = PackedDataset(to_ids(corpus.val), seq_length=d.seq_length, pad_id=tokenizer.pad_id)
        val_problems = list(corpus.val)
    else:
        from nemo_elastic.data import IndexedDatasetsConfig, build_indexed_datasets

        from nemo_elastic.data.indexed import IndexedDataset

        idx = d.indexed
        if not idx.prefix or not IndexedDataset.exists(idx.prefix):  # the recipe's names
            raise ConfigError(
                f"data.indexed.prefix={idx.prefix!r}: no {idx.prefix}.bin + {idx.prefix}.idx "
                "pair; pass the --out PREFIX of `nemo-elastic preprocess` (without .bin/.idx)")
        train, val = build_indexed_datasets(
            IndexedDatasetsConfig(prefixes=[idx.prefix], seq_length=d.seq_length, seed=d.seed,
                                  split=idx.split, cache_dir=idx.cache_dir,
                                  train_samples=cfg.train.iters * d.global_batch_size), tokenizer)
        if val is None:
            raise ConfigError(f"data.indexed.split={idx.split!r} gives the validation split no "
                             "weight; use e.g. '98,2,0'")
    logger.info("data: %s, %d train / %d validation samples of %d tokens, vocab %d", d.source,
                len(train), len(val), d.seq_length, tokenizer.vocab_size)
    train_iter = BatchIterator(train, d.micro_batch_size, seed=d.seed, shuffle=True,
                               dp_rank=info.dp_rank, dp_size=info.dp_size)
    return TrainingData(tokenizer=tokenizer, train_iter=train_iter, val_dataset=val,
                        val_problems=val_problems)
