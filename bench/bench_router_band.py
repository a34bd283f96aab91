"""How often does the router's family land inside its bands, in the order of its targets?

Router-only simulation of `nemo-elastic train` (no model, seconds per run): the recipe's
schedules (router LR warmup + cosine, tau and logit-scale annealing over the run), `micro`
micro-batches per iteration, each with one budget drawn uniformly, gradients summed over the
micro-batches, one AdamW step per iteration; the loss is the budget loss plus a pull toward
larger sub-networks (`kd_pull` x E[cost] / full cost, standing in for the distillation loss,
which falls as the student grows).  At the end the deployed family (noiseless argmax) is
checked with `family_check`.  Side by side: elastic.loss.cost = expected (E[cost] under the
router's probabilities, the default) or hard (the argmax's cost, straight-through), and the
choice lattice: width_fractions in 1/8 steps (coarse) or 1/16 steps (fine).

    PYTHONPATH=. python bench/bench_router_band.py [--seeds 10] [--iters 200]
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch

from nemo_elastic.config import Config, from_dict
from nemo_elastic.family_check import check_family
from nemo_elastic.router import ElasticRouter
from nemo_elastic.training.elastic.schedule import lr_factor

MODEL = dict(hybrid_layer_pattern="M-M*-M-", hidden_size=64, ffn_hidden_size=192,
             num_attention_heads=4, num_query_groups=2, kv_channels=16, mamba_num_heads=8,
             mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=16, mamba_chunk_size=32,
             vocab_size=64, max_sequence_length=256)
BUDGETS = {"full": 1.0, "80pct": 0.8, "60pct": 0.6, "50pct": 0.5, "45pct": 0.45, "40pct": 0.4}
SETUPS = {
    "4 axes": dict(axes=["hidden", "mamba_heads", "attention_heads", "ffn"]),
    "heterogeneous ffn+mamba": dict(axes=["hidden", "mamba_heads", "attention_heads", "ffn"],
                                    heterogeneous=["ffn", "mamba_heads"]),
    "depth + 2 axes": dict(axes=["hidden", "ffn"], depth_choices=[7, 6, 5]),
}


FRACTIONS = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375]  # 1/8 steps (conf/tiny.yaml before issue 21)
FINE = [1 - i / 16 for i in range(11)]  # 1/16 steps, 1.0 .. 0.375


def run(setup: dict, cost: str, seed: int, iters: int, micro: int, kd_pull: float,
        router: dict, fractions=FRACTIONS, train_tolerance: float = 0.05):
    el = dict(iters=iters, warmup_iters=0, budgets=BUDGETS, seed=seed, lr=1e-3,
              width_fractions=fractions, loss={"cost": cost, "tolerance": train_tolerance},
              router=router, **setup)
    cfg = from_dict(Config, {"model": MODEL, "elastic": el})
    e = cfg.elastic
    ranking = torch.randperm(cfg.model.num_layers,
                             generator=torch.Generator().manual_seed(seed)).tolist()
    router = ElasticRouter(cfg.model, e, total_iters=iters, layer_ranking=ranking)
    opt = torch.optim.AdamW(router.parameters(), lr=e.router.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        lr_factor, warmup=e.router.warmup_iters, total=iters, style="cosine",
        min_ratio=0.1))
    gen = torch.Generator().manual_seed(seed + 1)
    for it in range(iters):
        opt.zero_grad()
        for mb in range(micro):
            b = int(torch.randint(len(BUDGETS), (1,), generator=gen))
            out = router(b, iteration=it, micro_batch=mb)
            loss = router.budget_loss(out, b) - kd_pull * router.expected_cost(
                out.subnetwork) / router.full_cost
            (loss / micro).backward()
        torch.nn.utils.clip_grad_norm_(router.parameters(), e.router.clip_grad)
        opt.step()
        sched.step()
    return check_family(router.family_table(), tolerance=0.05)  # judged at +-5 % always


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--kd-pull", type=float, default=0.05)
    ap.add_argument("--tau-end", type=float, default=0.05)
    ap.add_argument("--scale-end", type=float, default=10.0)
    ap.add_argument("--costs", default="expected")
    ap.add_argument("--lattices", default="coarse,fine",
                    help="width_fractions: coarse (1/8 steps) and/or fine (1/16 steps)")
    ap.add_argument("--setups", default=",".join(SETUPS))
    args = ap.parse_args()
    router = {"tau_end": args.tau_end, "scale_end": args.scale_end}
    print(f"{args.seeds} seeds x {len(BUDGETS)} budgets, {args.iters} iterations x "
          f"{args.micro} micro-batches, kd_pull {args.kd_pull}")
    print(f"{'setup':26s} | {'cost':8s} | lattice | in band | families in order | worst |deviation|")
    print(f"router: tau_end {args.tau_end}, scale_end {args.scale_end}")
    for name in args.setups.split(","):
        setup = SETUPS[name]
        for cost, lattice in [(c, f) for c in args.costs.split(",")
                              for f in args.lattices.split(",")]:
            fractions = FINE if lattice == "fine" else FRACTIONS
            inside = ordered = total = 0
            worst = 0.0
            for seed in range(args.seeds):
                check = run(setup, cost, seed, args.iters, args.micro, args.kd_pull, router,
                            fractions)
                inside += sum(b.inside for b in check.budgets)
                total += len(check.budgets)
                ordered += check.in_order
                worst = max(worst, max(abs(b.deviation) for b in check.budgets))
            print(f"{name:26s} | {cost:8s} | {lattice:7s} | {inside / total:6.0%}  | {ordered:2d}/{args.seeds}"
                  f"              | {100 * worst:5.1f} %")
    assert math.isfinite(worst)


if __name__ == "__main__":
    main()
