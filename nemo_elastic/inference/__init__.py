"""Stateful decoding: Megatron-Core's `StaticInferenceContext` (attention KV cache, Mamba conv and
SSM states, sized per layer) driven by one batched decoding loop (`decode_batch`)."""

from nemo_elastic.inference.context import static_context
from nemo_elastic.inference.decoder import (
    Completion, cached, decode_batch, generate_ids, sample_next, uncached)

__all__ = ["Completion", "cached", "decode_batch", "generate_ids", "sample_next",
           "static_context", "uncached"]
