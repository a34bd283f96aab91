"""Cost of the elastic (masked) forward+backward relative to the plain Megatron-Core HybridModel.

Side by side in one process, same weights, same inputs, interleaved repetitions (median):

  plain          HybridModel (local spec), no elastic code
  elastic/none   ElasticHybridModel, no sub-network (upstream path)
  elastic/full   ElasticHybridModel, hard full-budget SubNetwork (masks resolve to identity)
  elastic/soft   full budget as a soft one-hot mixture: every mask multiplies (worst case)
  elastic/50%    hard sub-network at ~half width on every axis (masked, same FLOPs as full)

Run: `.venv/bin/python bench/bench_elastic.py [--hidden 256 --layers 8 --seq 256 --batch 4]`.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pattern", default="M-M*-M-M-")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from _common import bench_config, median_times
    from nemo_elastic import runtime
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.elastic import SubNetwork
    from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.report.common import format_table

    h = args.hidden
    cfg = bench_config(h, args.pattern, args.seq)
    m = cfg.model
    with runtime.distributed(ParallelConfig()):
        plain = build_hybrid_model(cfg)
        elastic = build_elastic_model(cfg)
        elastic.load_state_dict(plain.state_dict())
        tokens = torch.randint(0, m.vocab_size, (args.batch, args.seq))
        pos = torch.arange(args.seq).expand_as(tokens)

        def one_hot(full):
            return SoftAxis(choices=[full, full // 2], probs=torch.tensor([1.0, 0.0]))

        soft_full = SoftSubNetwork(hidden_size=one_hot(h), layers=[
            SoftLayer(mamba_num_heads=one_hot(m.mamba_num_heads), mamba_head_dim=one_hot(m.mamba_head_dim))
            if s == "M" else SoftLayer(num_attention_heads=one_hot(m.num_attention_heads)) if s == "*"
            else SoftLayer(ffn_hidden_size=one_hot(m.ffn_hidden_size)) for s in m.layer_symbols])
        half = SubNetwork.uniform(m, hidden_size=h // 2, mamba_num_heads=m.mamba_num_heads // 2,
                                  num_attention_heads=m.num_attention_heads // 2,
                                  ffn_hidden_size=m.ffn_hidden_size // 2)
        cases = {
            "plain HybridModel": (plain, {}),
            "elastic, no sub-network": (elastic, {}),
            "elastic, hard full budget": (elastic, {"subnetwork": SubNetwork.full(m)}),
            "elastic, soft one-hot full budget": (elastic, {"subnetwork": soft_full}),
            "elastic, hard ~50% on every axis": (elastic, {"subnetwork": half}),
        }

        def step(model, kwargs):
            model.zero_grad(set_to_none=True)
            model(tokens, pos, None, labels=tokens, **kwargs).mean().backward()

        med = median_times({name: (lambda m=model, k=kwargs: step(m, k))
                            for name, (model, kwargs) in cases.items()}, args.reps)
        base = med["plain HybridModel"]
        rows = [(name, f"{t * 1e3:.1f}", f"{t / base:.3f}") for name, t in med.items()]
    print(f"forward+backward, pattern {m.hybrid_layer_pattern}, hidden {h}, batch {args.batch} x "
          f"seq {args.seq}, {args.threads} threads, median of {args.reps}")
    print(format_table(("case", "ms", "ratio vs plain"), rows))


if __name__ == "__main__":
    main()
