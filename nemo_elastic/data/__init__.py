"""Data layer: synthetic reasoning corpus (default, no download) and Megatron indexed datasets.

Both sources produce the same per-sample dict (tokens/labels/position_ids int64, loss_mask
float32, each ``[s]``) and are batched to ``[b, s]`` by ``BatchIterator`` / ``iterate_once``.
Megatron-dependent modules (``preprocess``, ``indexed``) are imported lazily on first use.
"""

from nemo_elastic.data.dataset import SAMPLE_KEYS, PackedDataset
from nemo_elastic.data.evaluate import answer_accuracy, parse_answer
from nemo_elastic.data.iterator import BatchIterator, collate, iterate_once
from nemo_elastic.data.protocol import TokenizerProtocol, document_ids
from nemo_elastic.data.synthetic import (ReasoningProblem, Step, SyntheticCorpus,
                                         SyntheticReasoningConfig, build_problem, generate_corpus,
                                         write_text_corpus)
from nemo_elastic.data.tokenizer import CharTokenizer

_LAZY = {
    "HFTokenizer": "nemo_elastic.data.hf_tokenizer",
    "preprocess_to_indexed": "nemo_elastic.data.preprocess",
    "smallest_token_dtype": "nemo_elastic.data.preprocess",
    "IndexedDatasetsConfig": "nemo_elastic.data.indexed",
    "IndexedSamples": "nemo_elastic.data.indexed",
    "MegatronTokenizerAdapter": "nemo_elastic.data.indexed",
    "build_indexed_datasets": "nemo_elastic.data.indexed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nemo_elastic.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "SAMPLE_KEYS", "BatchIterator", "CharTokenizer", "PackedDataset", "ReasoningProblem", "Step",
    "SyntheticCorpus", "SyntheticReasoningConfig", "TokenizerProtocol", "answer_accuracy",
    "build_problem", "collate", "document_ids", "generate_corpus", "iterate_once", "parse_answer",
    "write_text_corpus", *_LAZY,
]
