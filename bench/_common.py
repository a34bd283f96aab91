"""Shared by the benchmarks: the benchmark-sized hybrid model (bigger than the tiny recipe, so
that compute, not Python overhead, dominates a step) and a timing loop."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def bench_config(hidden: int, pattern: str, seq: int, **sections):
    """A `Config` of a hybrid model of width `hidden` (+ extra recipe sections, e.g. elastic)."""
    from nemo_elastic.config import Config, from_dict

    h = hidden
    return from_dict(Config, {"model": dict(
        hybrid_layer_pattern=pattern, hidden_size=h, ffn_hidden_size=4 * h,
        num_attention_heads=8, num_query_groups=4, kv_channels=h // 8, mamba_num_heads=16,
        mamba_head_dim=2 * h // 16, mamba_num_groups=4, mamba_state_dim=64, mamba_chunk_size=64,
        vocab_size=1024, max_sequence_length=seq), **sections})


def median_times(cases: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median seconds of each case; one warm-up call each, then `reps` interleaved rounds (so
    drift of the machine's speed hits every case alike)."""
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
