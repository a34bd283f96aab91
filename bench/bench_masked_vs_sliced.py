"""Maximum relative error, masked elastic logits vs the physically sliced model, per axis.

For each axis alone (and all together), `--samples` random sub-networks of a small parent with
several Mamba / query groups; fp32 logits, error = ||masked - sliced|| / ||sliced||.
Run: `.venv/bin/python bench/bench_masked_vs_sliced.py [--samples 20]`.
"""

from __future__ import annotations

import argparse
import logging
import random
import warnings

import torch

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--pattern", default="M-*M-*-")
    args = parser.parse_args()

    from nemo_elastic import runtime
    from nemo_elastic.config import Config, ParallelConfig, from_dict
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.elastic.subnet import AXES, sample_subnetwork
    from nemo_elastic.export.slicing import slice_model
    from nemo_elastic.report.common import format_table

    cfg = from_dict(Config, {"model": dict(
        hybrid_layer_pattern=args.pattern, hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=8, num_query_groups=2, kv_channels=8, mamba_num_heads=8,
        mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=16, mamba_chunk_size=16,
        vocab_size=64, max_sequence_length=128)})
    rows = []
    with runtime.distributed(ParallelConfig()):
        elastic = build_elastic_model(cfg)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in elastic.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        tokens = torch.randint(0, 64, (2, 50), generator=gen)
        pos = torch.arange(50).expand_as(tokens)
        rng = random.Random(0)
        for axes in [(a,) for a in AXES] + [AXES]:
            errors = []
            for _ in range(args.samples):
                subnet = sample_subnetwork(cfg.model, rng, axes=axes)
                _, child = slice_model(elastic, cfg, subnet)
                with torch.no_grad():
                    masked = elastic(tokens, pos, None, subnetwork=subnet)
                    sliced = child(tokens, pos, None)
                errors.append(((masked - sliced).norm() / sliced.norm()).item())
            rows.append(("all" if len(axes) > 1 else axes[0], len(errors), f"{max(errors):.2e}",
                         f"{sum(errors) / len(errors):.2e}"))
    print(f"masked vs sliced, pattern {args.pattern}, fp32, {args.samples} random sub-networks per row")
    print(format_table(("axis", "samples", "max rel error", "mean rel error"), rows))


if __name__ == "__main__":
    main()
