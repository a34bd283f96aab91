"""Importance order against ModelOpt's, zero-shot, on one trained parent (issue 22, item 3).

The same-shaped prefix sub-networks of one parent, each axis alone and all axes together, under
* this project's importance order (`compute_scores` + `permutations_from_scores`, the two Mamba
  signals: 'output' = what out_proj reads, the default; 'x' = the paper's in_proj x block; Mamba
  head channels ordered per head, the default, or one order shared by every head, as before),
  and as it was before issue 22 (the hidden score also summing the final norm's output, the x
  signal, shared head channels),
* ModelOpt's Minitron order (`mcore_minitron` pruning to the full sizes: every width axis sorted
  by ModelOpt's activation scores, nothing dropped; needs the `peers` extra),
* the parent's original order, and random structure-respecting orders (`--seeds`, mean and
  standard deviation).
Every row uses the same calibration batches (ModelOpt's and ours) and the project's own
validation loss (`validation_loss(..., subnetwork=)`, the first `--val-batches` validation
micro-batches).  Lower is better.  Writes `order.json` into `--out`.

    .venv/bin/python bench/bench_order.py --parent runs/tiny/checkpoints/iter_0001200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)


def shapes(m) -> dict:
    """Columns: all axes at 75 / 50 %, each axis alone at 75 / 50 %, Mamba heads + channels."""
    from nemo_elastic.elastic import SubNetwork
    from nemo_elastic.importance.zero_shot import _scaled, fractional_subnetwork

    cols = {"all 75%": fractional_subnetwork(m, 0.75), "all 50%": fractional_subnetwork(m, 0.5)}
    for f in (0.75, 0.5):
        p = f"{int(f * 100)}%"
        cols[f"hidden {p}"] = SubNetwork.uniform(m, hidden_size=_scaled(m.hidden_size, f))
        cols[f"FFN {p}"] = SubNetwork.uniform(m, ffn_hidden_size=_scaled(m.ffn_hidden_size, f))
        cols[f"M heads {p}"] = SubNetwork.uniform(m, mamba_num_heads=_scaled(
            m.mamba_num_heads, f, m.mamba_num_groups))
        cols[f"M chan {p}"] = SubNetwork.uniform(m, mamba_head_dim=_scaled(m.mamba_head_dim, f))
    cols["attn 50%"] = SubNetwork.uniform(m, num_attention_heads=_scaled(
        m.num_attention_heads, 0.5, m.num_query_groups))
    for f in (0.75, 0.5):
        cols[f"M heads+chan {int(f * 100)}%"] = SubNetwork.uniform(
            m, mamba_num_heads=_scaled(m.mamba_num_heads, f, m.mamba_num_groups),
            mamba_head_dim=_scaled(m.mamba_head_dim, f))
    return {k: s.validate(m) for k, s in cols.items()}


def modelopt_sorted_state(cfg, parent: Path, calib: list) -> dict:
    """The parent's weights sorted by ModelOpt's Minitron importance (prune to full sizes)."""
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.importance.scores import run_batch
    from nemo_elastic.model.build import build_hybrid_model
    from nemo_elastic.peers import modelopt_minitron as mm

    model = build_hybrid_model(cfg, spec_backend="local")
    load_checkpoint(parent, model=model, restore_rng=False)
    m = cfg.model
    full = {"hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
            "num_attention_heads": m.num_attention_heads,
            "mamba_num_heads": m.mamba_num_heads, "mamba_head_dim": m.mamba_head_dim}

    def forward_loop(mdl):
        for b in calib:
            run_batch(mdl, b)

    return mm.prune(model, m, forward_loop, export_config=full).state_dict


def _scores_with_final_norm(model, calib, m, signal):
    """compute_scores as before issue 22: the hidden score also sums decoder.final_norm."""
    from nemo_elastic.importance.aggregate import Aggregation
    from nemo_elastic.importance.hooks import ActivationRecorder
    from nemo_elastic.importance.scores import _finalize, parallel_groups, run_batch

    model.eval()
    agg = Aggregation()
    with torch.no_grad(), ActivationRecorder(model, m, agg, mamba_signal=signal) as rec:
        rec._hook_norm(model.decoder.final_norm, "final_norm")
        for b in calib:
            run_batch(model, b)
            rec.count_batch(b["tokens"])
    dp, tp = parallel_groups()
    return _finalize(rec, m, agg, dp, tp, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", required=True, help="a trained parent checkpoint")
    parser.add_argument("--num-batches", type=int, default=16, help="calibration micro-batches")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="random orders")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_order")
    parser.add_argument("--diagnose", action="store_true",
                        help="rows with one axis left in the original order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args)


def run(args) -> dict:
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint, resolve_checkpoint
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.importance import (compute_scores, permutations_from_scores,
                                         permute_model_, random_permutations)
    from nemo_elastic.importance.prepare import calibration_batches
    from nemo_elastic.report.common import format_table
    from nemo_elastic.training.evaluation import validation_loss

    started = time.perf_counter()
    parent = resolve_checkpoint(args.parent)
    cfg = config_from_checkpoint(parent).single_process()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             eval_iters=args.val_batches))
    m = cfg.model
    cols = shapes(m)
    rows: dict[str, list[float]] = {}
    with runtime.distributed(cfg.parallel) as info:
        data = build_training_data(cfg, info)
        calib = calibration_batches(data, args.num_batches, progress=False)
        model = build_elastic_model(cfg)

        def losses() -> list[float]:
            return [validation_loss(cfg, model, data, 1, info, subnetwork=s)
                    for s in cols.values()]

        def reload() -> None:
            load_checkpoint(parent, model=model, restore_rng=False)

        reload()
        rows["original order"] = losses()
        by_signal = {}
        for signal in ("output", "x"):  # 'output' is the default since issue 22
            reload()
            scores = by_signal[signal] = compute_scores(model, calib, m, mamba_signal=signal,
                                                        progress=False)
            for order in ("per_head", "shared"):  # per-head head channels: the default
                reload()
                permute_model_(model, m, permutations_from_scores(
                    scores, m, mamba_channel_order=order))
                rows[f"project, signal {signal}, {order} channels"
                     + (" (default)" if (signal, order) == ("output", "per_head") else "")
                     ] = losses()
        # before issue 22: the hidden score also summed decoder.final_norm's output
        reload()
        with_final = _scores_with_final_norm(model, calib, m, "x")
        permute_model_(model, m, permutations_from_scores(with_final, m,
                                                          mamba_channel_order="shared"))
        rows["signal x, shared channels, hidden + final norm (before issue 22)"] = losses()
        # diagnosis: Mamba heads ranked on x, head channels on the output signal
        import copy

        mixed = copy.deepcopy(by_signal["output"])
        for i, ls in mixed.layers.items():
            if ls.mamba_heads is not None:
                ls.mamba_heads = by_signal["x"].layers[i].mamba_heads
        reload()
        permute_model_(model, m, permutations_from_scores(mixed, m))
        rows["project, heads x / channels output (per head)"] = losses()
        if args.diagnose:  # which axis's order hurts in combination: one axis left original
            from nemo_elastic.importance.order import identity_permutations

            best = permutations_from_scores(by_signal["output"], m)  # the default
            ident = identity_permutations(m)
            for axis in ("hidden", "ffn", "mamba_heads", "mamba_channels", "attention_heads"):
                perms = dataclasses.replace(best, layers={
                    i: dataclasses.replace(lp, **({axis: getattr(ident.layers[i], axis)}
                                                  if getattr(lp, axis, None) is not None
                                                  else {}))
                    for i, lp in best.layers.items()})
                if axis == "hidden":
                    perms = dataclasses.replace(perms, hidden=ident.hidden)
                reload()
                permute_model_(model, m, perms)
                rows[f"output signal, {axis} original"] = losses()
        try:
            sd = modelopt_sorted_state(cfg, parent, calib)
        except ImportError as e:
            logging.warning("ModelOpt row skipped: %s", e)
        else:
            reload()
            missing, unexpected = model.load_state_dict(sd, strict=False)
            params = {n for n, _ in model.named_parameters()}
            assert not (set(missing) & params) and not unexpected, (missing, unexpected)
            rows["ModelOpt mcore_minitron"] = losses()
        rnd = []
        for seed in range(args.seeds):
            reload()
            permute_model_(model, m, random_permutations(m, torch.Generator().manual_seed(seed)))
            rnd.append(losses())
        rows[f"random (mean of {args.seeds})"] = [statistics.mean(c) for c in zip(*rnd)]
        if args.seeds > 1:
            rows[f"random (sd of {args.seeds})"] = [statistics.stdev(c) for c in zip(*rnd)]

    result = {"parent": str(parent), "columns": {k: s.describe(m) for k, s in cols.items()},
              "rows": rows, "random_seeds": rnd, "num_batches": args.num_batches,
              "val_batches": args.val_batches, "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "order.json").write_text(json.dumps(result, indent=2))
    print(f"\nZero-shot validation loss of same-shaped prefixes ({parent}; "
          f"{args.val_batches} validation batches, {args.num_batches} calibration batches)")
    for k in ("all 75%", "all 50%"):
        print(f"  {k}: {cols[k].describe(m)}")
    names = list(cols)
    print(format_table(("ordering", *names),
                       [(r, *(f"{v:.3f}" for v in vals)) for r, vals in rows.items()]))
    print(f"seconds: {result['seconds']}")
    return result


if __name__ == "__main__":
    main()
