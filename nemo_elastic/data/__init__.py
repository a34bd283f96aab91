"""Data layer: synthetic reasoning corpus (default, no download) and Megatron indexed datasets.

Both sources produce the same per-sample dict (tokens/labels/position_ids int64, loss_mask
float32, each ``[s]``) and are batched to ``[b, s]`` by ``BatchIterator`` / ``iterate_once``.
Every name is imported lazily on first use, so ``nemo_elastic.config`` can use
``nemo_elastic.data.synthetic`` (pure Python) without importing torch or Megatron.
"""

import importlib

_LAZY = {
    "SAMPLE_KEYS": "dataset", "PackedDataset": "dataset",
    "answer_accuracy": "evaluate", "parse_answer": "evaluate",
    "BatchIterator": "iterator", "collate": "iterator", "iterate_once": "iterator",
    "Tokenizer": "protocol", "document_ids": "protocol",
    "ReasoningProblem": "synthetic", "Step": "synthetic", "SyntheticCorpus": "synthetic",
    "SyntheticReasoningConfig": "synthetic", "build_problem": "synthetic",
    "generate_corpus": "synthetic", "write_text_corpus": "synthetic",
    "CharTokenizer": "tokenizer",
    "HFTokenizer": "hf_tokenizer",
    "preprocess_to_indexed": "preprocess", "smallest_token_dtype": "preprocess",
    "TrainingData": "loaders", "build_tokenizer": "loaders", "build_training_data": "loaders",
    "IndexedDatasetsConfig": "indexed", "IndexedSamples": "indexed",
    "MegatronTokenizerAdapter": "indexed", "build_indexed_datasets": "indexed",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"nemo_elastic.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'nemo_elastic.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
