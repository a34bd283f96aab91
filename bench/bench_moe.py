"""MoE step time: plain Megatron-Core MoE parent vs the elastic one, full budget and 50 % experts.

A hybrid Mamba2 + attention + MoE parent (16 experts, top-2, shared expert).  One training step
= forward + backward of the summed per-token loss on one micro-batch, CPU, fp32:

* plain       - `build_hybrid_model` (Megatron-Core MoELayer, SequentialMLP experts), full model;
* elastic     - `build_elastic_model` at the full sub-network (no masks bound: upstream code);
* masked 50%  - the elastic parent with 8 of 16 experts masked (dropped experts get no tokens);
* sliced 50%  - the elastic parent's sliced execution of the same sub-network (kept weight
  blocks; dropped experts receive no tokens);
* child 50%   - the physically sliced 8-expert plain model (`export.slicing`), for reference;
* and the masked-vs-sliced logit error of the 50 % sub-network.

Run: `.venv/bin/python bench/bench_moe.py [--reps 5]`.  Times vary with the machine's load;
the ratios are what the README quotes.
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
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    from bench._common import median_times
    from nemo_elastic import runtime
    from nemo_elastic.config import Config, ParallelConfig, from_dict
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.export.slicing import slice_model
    from nemo_elastic.model import build_hybrid_model

    h = args.hidden
    cfg = from_dict(Config, {"model": dict(
        hybrid_layer_pattern="ME*EME", hidden_size=h, ffn_hidden_size=4 * h,
        num_attention_heads=8, num_query_groups=4, kv_channels=h // 8, mamba_num_heads=16,
        mamba_head_dim=2 * h // 16, mamba_num_groups=4, mamba_state_dim=64, mamba_chunk_size=64,
        vocab_size=1024, max_sequence_length=args.seq,
        moe=dict(num_moe_experts=16, moe_router_topk=2, moe_ffn_hidden_size=h,
                 moe_shared_expert_intermediate_size=2 * h, moe_router_topk_scaling_factor=2.5))})
    with runtime.distributed(ParallelConfig()):
        torch.manual_seed(0)
        plain = build_hybrid_model(cfg)
        elastic = build_elastic_model(cfg)
        elastic.load_state_dict(plain.state_dict())
        half = SubNetwork.uniform(cfg.model, num_moe_experts=8)
        _, child = slice_model(elastic, cfg, half)
        tokens = torch.randint(0, 1024, (args.batch, args.seq))
        pos = torch.arange(args.seq).expand_as(tokens)

        def step(model, **kw):
            def run():
                model.zero_grad(set_to_none=True)
                model(tokens, pos, None, labels=tokens, **kw).sum().backward()
            return run

        times = median_times({"plain": step(plain), "elastic": step(elastic),
                              "masked50": step(elastic, subnetwork=half),
                              "sliced50": step(elastic, subnetwork=half, execution="sliced"),
                              "child50": step(child)}, args.reps)
        with torch.no_grad():
            masked = elastic(tokens, pos, None, subnetwork=half)
            sliced = child(tokens, pos, None)
        err = ((masked - sliced).norm() / sliced.norm()).item()
    print(f"MoE step (fwd+bwd), pattern ME*EME, hidden {h}, 16 experts top-2, batch {args.batch} x "
          f"{args.seq} tokens, CPU fp32, median of {args.reps}")
    print(f"{'case':<38}{'seconds':>10}{'ratio':>10}")
    rows = [("plain MoE parent (full)", "plain", "plain"),
            ("elastic parent, full budget", "elastic", "plain"),
            ("50% experts, masked", "masked50", "plain"),
            ("50% experts, sliced execution", "sliced50", "plain"),
            ("50% experts, physically sliced model", "child50", "plain"),
            ("sliced / masked at 50% experts", "sliced50", "masked50")]
    for label, a, b in rows:
        print(f"{label:<38}{times[a]:>10.3f}{times[a] / times[b]:>10.2f}")
    print(f"masked vs sliced logits at 50% experts: relative error {err:.2e}")


if __name__ == "__main__":
    main()
