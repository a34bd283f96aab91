"""Keeping the full model whole during elastic training (issue 22, item 4), side by side.

The main job's elastic stage (conf/tiny.yaml: two curriculum stages, router, frozen teacher)
from the same prepared parent, with one change per variant; each budget's final validation loss
(the recipe's validation windows) and greedy answer accuracy (`--accuracy` problems), and the
full budget's gap to the teacher (the parent):

* `recipe`: conf/tiny.yaml as it is;
* `lr/3`: elastic learning rate 1e-3 -> 3.3e-4 (min 3.3e-5);
* `full 0.5 in stage 1`: stage 1 draws the full budget half of the time (the others share);
* `stage 2 full 0.7`: stage 2 probabilities 0.7 / 0.2 / 0.1;
* `all budgets per step`: every budget on every micro-batch (one teacher forward).

    .venv/bin/python bench/bench_full_budget.py --prepared runs/tiny/prepared [--seeds 1]
Writes `full_budget.json` into `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
logger = logging.getLogger("bench_full_budget")


def variants(base) -> dict:
    e = base.elastic
    st1, st2 = e.curriculum
    names = list(e.budgets)
    rep = dataclasses.replace
    share = {n: 0.5 / (len(names) - 1) for n in names[1:]}
    return {
        "recipe": {},
        "lr/3": {"lr": e.lr / 3, "min_lr": e.min_lr / 3},
        "full 0.5 in stage 1": {"curriculum": [rep(st1, budget_probs={names[0]: 0.5, **share}),
                                               st2]},
        "stage 2 full 0.7": {"curriculum": [st1, rep(st2, budget_probs=dict(zip(
            names, [0.7, 0.2, 0.1][:len(names)])))]},
        "all budgets per step": {"budget_sampling": "all"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", default="runs/tiny/prepared")
    p.add_argument("--out", default="runs/bench_full_budget")
    p.add_argument("--only", default=None, help="comma-separated variant names")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--accuracy", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    run(args)


def _final(out: Path, budgets) -> dict:
    from nemo_elastic.training.loop import read_metrics

    hist = [h for h in read_metrics(out, up_to=10**9) if "val_by_budget" in h]
    return {n: hist[-1]["val_by_budget"][n] for n in budgets}


def run(args) -> dict:
    import bench_peers as bp

    from nemo_elastic.checkpoint import resolve_checkpoint
    from nemo_elastic.config import load_config
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.training.train import train

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    prepared = resolve_checkpoint(args.prepared)
    base = load_config("conf/tiny.yaml", ["train.eval_accuracy_samples=0"])
    chosen = variants(base)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    result = {"teacher": None, "variants": {}}
    for name, change in chosen.items():
        per_seed = []
        for seed in range(args.seeds):
            tag = name.replace(" ", "_").replace("/", "_") + f"_s{seed}"
            out = work / tag
            cfg = dataclasses.replace(
                base, train=dataclasses.replace(base.train, seed=base.train.seed + seed),
                elastic=dataclasses.replace(base.elastic, init_checkpoint=str(prepared),
                                            output_dir=str(out), **change))
            start = time.perf_counter()
            res = train(cfg, progress=False)
            seconds = time.perf_counter() - start
            family = {r["name"]: SubNetwork.from_dict(r["subnetwork"]) for r in res.family}
            params = {r["name"]: r["parameters"] for r in res.family}
            acc = bp.final_accuracy(cfg, out, family, args.accuracy)
            final = _final(out, cfg.elastic.budgets)
            result["teacher"] = res.teacher
            per_seed.append({"val": final, "accuracy": acc, "parameters": params,
                             "seconds": round(seconds, 1)})
            logger.info("%s seed %d: %s acc %s (%.0f s)", name, seed,
                        {k: round(v, 4) for k, v in final.items()}, acc, seconds)
        result["variants"][name] = per_seed
        (work / "full_budget.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    from nemo_elastic.report.common import format_table

    rows = []
    for name, per_seed in result["variants"].items():
        budgets = list(per_seed[0]["val"])
        mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
        rows.append((name, *(f"{mean([r['val'][n] for r in per_seed]):.4f}" for n in budgets),
                     *(f"{100 * mean([r['accuracy'][n] for r in per_seed if r['accuracy'].get(n) is not None]):.1f}%"
                       for n in budgets),
                     f"{mean([r['seconds'] for r in per_seed]):.0f}"))
    print(f"teacher: {result['teacher']}")
    print(format_table(("variant", *(f"{n} loss" for n in budgets),
                        *(f"{n} acc." for n in budgets), "s"), rows))


if __name__ == "__main__":
    main()
