"""The main job's elastic stage over seeds and recipe variants, from one prepared parent.

Issue 21 item 3 (every budget inside its band) and issue 22 item 4 (the full model kept whole)
are judged on the family the main job trains (conf/tiny.yaml).  This runs its elastic stage
(`nemo-elastic train`) once per (variant, elastic.seed) from the same prepared parent, so
pretraining and `prepare` are not repeated, and prints per variant, mean and spread over seeds:
each budget's parameter fraction (and how many seeds land inside the band), its final
validation loss, the full budget's gap to the teacher (same validation protocol) and the
stage's wall time.

    .venv/bin/python bench/bench_family_seeds.py --prepared runs/tiny/prepared --seeds 0,1,2 \
        --variant recipe= --variant hard=elastic.loss.cost=hard
A variant is NAME=OVERRIDE[;OVERRIDE...] (OmegaConf key=value overrides of conf/tiny.yaml);
the pseudo-override `fixed=AXES` (`all` or comma-separated router axes) trains a fixed family
instead of the router's: each smaller budget is the uniform cut of AXES (the others kept
whole) whose parameter count is closest to its target, trained by the same loop, loss, teacher
and data (`bench_claims.fixed_router`) - the router against fixed configurations at equal
parameters (issue 22, item 5).
Writes `family_seeds.json` into `--out`; finished runs are reused.
"""

from __future__ import annotations

import argparse
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
logger = logging.getLogger("bench_family_seeds")


def _final_val(out: Path, budgets) -> dict:
    from nemo_elastic.training.loop import read_metrics

    hist = [h for h in read_metrics(out, up_to=10**9) if "val_by_budget" in h]
    return {n: hist[-1]["val_by_budget"][n] for n in budgets}


def run_one(overrides: list[str], prepared: str, out: Path, seed: int, accuracy: int) -> dict:
    import bench_peers as bp

    from nemo_elastic.config import load_config
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.training.train import train

    import contextlib

    from bench_claims import fixed_router

    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    fixed_axes = [o.partition("=")[2] for o in overrides if o.startswith("fixed=")]
    cfg = load_config("conf/tiny.yaml", ["train.eval_accuracy_samples=0",
                                         f"elastic.init_checkpoint={prepared}",
                                         f"elastic.output_dir={out}", f"elastic.seed={seed}",
                                         *(o for o in overrides if not o.startswith("fixed=")),
                                         *(["elastic.router.family_choice=argmax"]
                                           if fixed_axes else [])])
    fixed = fixed_family(cfg, fixed_axes[0]) if fixed_axes else None
    start = time.perf_counter()
    with fixed_router(fixed) if fixed else contextlib.nullcontext():
        res = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    family = {r["name"]: SubNetwork.from_dict(r["subnetwork"]) for r in res.family}
    result = {"seed": seed, "seconds": round(seconds, 1),
              "fraction": {r["name"]: r["parameter_fraction"] for r in res.family},
              "target": {r["name"]: r["target"] for r in res.family},
              "tolerance": cfg.elastic.loss.tolerance,
              "val": _final_val(out, cfg.elastic.budgets),
              "teacher": res.teacher.get("val_loss") if isinstance(res.teacher, dict) else None,
              "accuracy": bp.final_accuracy(cfg, out, family, accuracy)}
    done.write_text(json.dumps(result, indent=2))
    return result


def fixed_family(cfg, axes: str) -> dict:
    """{budget: SubNetwork}: the full model for a full budget, else the uniform cut of `axes`
    (others whole) closest to the budget's parameter target."""
    from nemo_elastic.cost_model import count_parameters, subnetwork_parameters
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.importance.zero_shot import _scaled
    from nemo_elastic.sizes import ELASTIC_AXES, GROUPED

    m, e = cfg.model, cfg.elastic
    cut_axes = list(e.axes) if axes == "all" else axes.split(",")
    full = count_parameters(m)

    def cut(f):
        kw = {}
        for a in cut_axes:
            fld = ELASTIC_AXES[a][1]
            kw[fld] = _scaled(getattr(m, fld), f, getattr(m, GROUPED[fld]) if fld in GROUPED else 1)
        return SubNetwork.uniform(m, **kw)

    family = {}
    for name, target in e.budgets.items():
        if target >= 1.0:
            family[name] = SubNetwork.full(m)
            continue
        family[name] = min((cut(k / 1000) for k in range(100, 1001)),
                           key=lambda s: abs(subnetwork_parameters(m, s) / full - target))
        logger.info("fixed %s (%s): %s", name, axes, family[name].describe(m))
    return family


def summarize(results: dict) -> None:
    from nemo_elastic.report.common import format_table

    ms = lambda xs: (f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs):.4f}"  # noqa: E731
                     if xs else "-")
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        budgets = list(runs[0]["fraction"])
        cells = []
        for b in budgets:
            fr = [r["fraction"][b] for r in runs]
            inside = sum(abs(r["fraction"][b] / r["target"][b] - 1) <= r["tolerance"] + 1e-9
                         for r in runs)
            cells.append(f"{100 * statistics.mean(fr):.1f}% [{', '.join(f'{100 * f:.1f}' for f in fr)}] "
                         f"{inside}/{len(runs)} in")
        vals = [ms([r["val"][b] for r in runs]) for b in budgets]
        gaps = [100 * (r["val"][budgets[0]] / r["teacher"] - 1) for r in runs if r["teacher"]]
        acc = [ms([r["accuracy"][b] for r in runs if r["accuracy"].get(b) is not None])
               for b in budgets]
        rows.append((name, len(runs), *cells, *vals,
                     f"{statistics.mean(gaps):+.2f}% [{', '.join(f'{g:+.2f}' for g in gaps)}]"
                     if gaps else "-", *acc,
                     f"{statistics.mean(r['seconds'] for r in runs):.0f}"))
    budgets = list(next(iter(results.values()))[0]["fraction"])
    print(format_table(("variant", "seeds", *(f"{b} size" for b in budgets),
                        *(f"{b} val" for b in budgets), "full vs teacher",
                        *(f"{b} acc" for b in budgets), "s"), rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", default="runs/tiny/prepared")
    p.add_argument("--out", default="runs/bench_family_seeds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=OVERRIDE[;OVERRIDE...]; default: the recipe as it is")
    p.add_argument("--accuracy", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {}
    for v in args.variant or ["recipe="]:
        name, _, spec = v.partition("=")
        variants[name] = [o for o in spec.split(";") if o]
    results = json.loads((work / "family_seeds.json").read_text()) \
        if (work / "family_seeds.json").is_file() else {}
    for seed in seeds:  # seed-major: every variant has a first seed early
        for name, overrides in variants.items():
            tag = "".join(c if c.isalnum() else "_" for c in name) + f"_s{seed}"
            r = run_one(overrides, args.prepared, work / tag, seed, args.accuracy)
            r["overrides"] = overrides
            runs = [x for x in results.get(name, []) if x["seed"] != seed] + [r]
            results[name] = sorted(runs, key=lambda x: x["seed"])
            logger.info("%s seed %d: sizes %s val %s teacher %s acc %s (%.0f s)", name, seed,
                        {k: round(v, 4) for k, v in r["fraction"].items()},
                        {k: round(v, 4) for k, v in r["val"].items()}, r["teacher"],
                        r["accuracy"], r["seconds"])
            (work / "family_seeds.json").write_text(json.dumps(results, indent=2))
    summarize({k: v for k, v in results.items() if k in variants})


if __name__ == "__main__":
    main()
