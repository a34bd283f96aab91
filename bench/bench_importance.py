"""Zero-shot value of importance reordering on the tiny model, side by side in one run.

1. pretrain `conf/tiny.yaml` briefly (`--iters`, default 300) into a temporary folder;
2. `prepare` it (width scores + depth rankings + reordering; timed = the calibration cost);
3. validation loss of the prefix sub-networks at 100% / 75% / 50% of every width axis
   (hidden, Mamba heads per group and head channels, attention heads per query group, FFN),
   and of each axis alone at 50%, for
   * importance order (the prepared checkpoint, default aggregation mean/l2),
   * importance order with other aggregations (scores recomputed in-process),
   * importance order with Mamba heads/channels scored on the out_proj input (`mamba_signal`),
   * the parent's original order (an arbitrary order after training),
   * random structure-respecting permutations (`--seeds` of them, mean);
   ratio = random / importance (> 1: importance prefixes lose less).

Run: `.venv/bin/python bench/bench_importance.py [--iters 300 --num-batches 16 --seeds 3]`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)

FRACTIONS = (1.0, 0.75, 0.5)
FAST = ["data.synthetic.num_train=4000", "data.synthetic.num_val=200", "train.eval_iters=2",
        "train.eval_accuracy_samples=0", "train.log_interval=50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--num-batches", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth-batches", type=int, default=None,
                        help="calibration batches for the depth rankings (default: all)")
    parser.add_argument("--parent", default=None,
                        help="an already trained parent checkpoint (skips pretraining)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_importance_"))
    run(args, work)


def run(args, work: Path) -> None:
    from nemo_elastic.checkpoint import config_from_checkpoint, resolve_checkpoint
    from nemo_elastic.config import load_config
    from nemo_elastic.importance.prepare import prepare
    from nemo_elastic.training.pretrain import pretrain

    started = time.perf_counter()
    if args.parent:
        parent = resolve_checkpoint(args.parent)
        cfg, parent_val = config_from_checkpoint(parent), float("nan")
    else:
        cfg = load_config("conf/tiny.yaml", [*FAST, f"output_dir={work / 'parent'}",
                                             f"train.iters={args.iters}",
                                             f"train.eval_interval={args.iters}",
                                             f"train.save_interval={args.iters}"])
        result = pretrain(cfg, progress=False)
        parent, parent_val = Path(result.checkpoint), result.final_val_loss
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    prepared = prepare(parent, work / "prepared", num_batches=args.num_batches, overwrite=True,
                       depth_batches=args.depth_batches, progress=False)
    prepare_s = time.perf_counter() - started
    evaluate(args, cfg, parent, prepared, train_s, prepare_s, parent_val)


def budgets(m) -> dict:
    """Columns: every width axis at 100 / 75 / 50 %, then one axis alone at 50 %."""
    from nemo_elastic.elastic import SubNetwork
    from nemo_elastic.importance.zero_shot import fractional_subnetwork

    half = lambda n, groups=1: max(groups, (n // 2) // groups * groups)  # noqa: E731
    cols = {f"all {int(f * 100)}%": fractional_subnetwork(m, f) for f in FRACTIONS}
    cols.update({
        "hidden 50%": SubNetwork.uniform(m, hidden_size=half(m.hidden_size)),
        "M heads 50%": SubNetwork.uniform(m, mamba_num_heads=half(m.mamba_num_heads,
                                                                  m.mamba_num_groups)),
        "M chan 50%": SubNetwork.uniform(m, mamba_head_dim=half(m.mamba_head_dim)),
        "attn 50%": SubNetwork.uniform(m, num_attention_heads=half(m.num_attention_heads,
                                                                   m.num_query_groups)),
        "FFN 50%": SubNetwork.uniform(m, ffn_hidden_size=half(m.ffn_hidden_size)),
    })
    return {name: s.validate(m) for name, s in cols.items()}


def evaluate(args, cfg, parent: Path, prepared: Path, train_s: float, prepare_s: float,
             parent_val: float) -> None:
    import dataclasses

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint, read_meta
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.importance import (Aggregation, compute_scores, permutations_from_scores,
                                         permute_model_, random_permutations)
    from nemo_elastic.importance.prepare import calibration_batches
    from nemo_elastic.report.common import format_table
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.training.evaluation import validation_loss

    m = cfg.model
    cols = budgets(m)
    meta = read_meta(prepared)["importance"]
    # validation_loss reads `train.eval_iters * num_microbatches` micro-batches from the start of
    # the validation set: eval_iters=--val-batches with one micro-batch each is the first
    # `--val-batches` micro-batches, the set this table has always been computed on.
    eval_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                  eval_iters=args.val_batches))
    with runtime.distributed(cfg.parallel) as info:
        data = build_training_data(cfg, info)
        calib = calibration_batches(data, args.num_batches, progress=False)
        model = build_elastic_model(cfg)

        def losses() -> list[float]:
            return [validation_loss(eval_cfg, model, data, 1, info, subnetwork=s)
                    for s in cols.values()]

        def reload(ckpt) -> None:
            load_checkpoint(ckpt, model=model, restore_rng=False)

        rows: dict[str, list[float]] = {}
        reload(prepared)
        rows["importance mean/l2 (prepared)"] = losses()
        warm_seconds = []
        for agg in ("sum/sum", "l2/l2", "l2/mean"):  # sum/sum ranks as mean/mean (equal lengths)
            reload(parent)
            scores = compute_scores(model, calib, m, Aggregation.parse(agg), progress=False)
            warm_seconds.append(scores.seconds)
            permute_model_(model, m, permutations_from_scores(scores, m))
            rows[f"importance {agg}"] = losses()
        reload(parent)  # Mamba heads/channels scored on what out_proj reads instead of x
        scores = compute_scores(model, calib, m, mamba_signal="output", progress=False)
        permute_model_(model, m, permutations_from_scores(scores, m))
        rows["importance mean/l2, Mamba output signal"] = losses()
        reload(parent)
        rows["parent order (unsorted)"] = losses()
        random_rows = []
        for seed in range(args.seeds):
            reload(parent)
            permute_model_(model, m, random_permutations(m, torch.Generator().manual_seed(seed)))
            random_rows.append(losses())
            rows[f"random order (seed {seed})"] = random_rows[-1]
        rnd = [statistics.mean(c) for c in zip(*random_rows)]
        rows[f"random order (mean of {args.seeds})"] = rnd

    imp = rows["importance mean/l2 (prepared)"]
    table = [(name, *(f"{v:.3f}" for v in vals)) for name, vals in rows.items()]
    table.append(("ratio random / importance", *(f"{r / i:.2f}" for r, i in zip(rnd, imp))))
    known = "" if parent_val != parent_val else f", final val loss in training {parent_val:.4f}"
    print(f"\nZero-shot validation loss of prefix sub-networks (tiny model, "
          f"{read_meta(parent)['iteration']} pretraining iterations{known}; uniform guess "
          f"{torch.log(torch.tensor(float(data.tokenizer.vocab_size))):.4f}; "
          f"{args.val_batches} validation batches)")
    for name in ("all 75%", "all 50%"):
        print(f"  {name}: {cols[name].describe(m)}")
    print(format_table(("ordering", *cols), table))
    print(f"\ncalibration: {meta['num_batches']} batches x {cfg.data.micro_batch_size} x "
          f"{cfg.data.seq_length} tokens ({meta['tokens']} tokens); width scores "
          f"{meta['seconds']:.2f} s in prepare (in-process repeats: "
          f"{', '.join(f'{t:.2f}' for t in warm_seconds)} s), depth rankings "
          f"{meta['depth_seconds']:.2f} s, whole prepare "
          f"(load, score, rank, permute, save) {prepare_s:.1f} s; pretraining {train_s:.0f} s")
    print(f"depth ranking (iterative nMSE, least important first): "
          f"{read_meta(prepared)['layer_ranking']} (pattern {m.hybrid_layer_pattern})")


if __name__ == "__main__":
    main()
