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
parameters (issue 22, item 5); `fixed=search` takes, per budget, the cut of whichever axes
has the lowest zero-shot loss on TRAINING batches (`--search-fixed` prints that search);
`fixed=run:DIR` holds fixed the family the finished run DIR deployed (its `family.json`):
the router's training against its own final choice.
A seed changes elastic.seed and data.seed (batch order; `--same-data` keeps the recipe's).
`--accuracy N`: greedy answers on the first N validation problems, the teacher's too.
`--trajectory RUN...`: accuracy at every saved checkpoint; `--report-only`: tables only.
Writes `family_seeds.json` into `--out`; finished runs are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
logger = logging.getLogger("bench_family_seeds")
DATA_SEED = True  # --same-data: every seed trains on the recipe's batch order


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
    # the seed moves the router's init and budget draws (elastic.seed) and the order of the
    # training batches (data.seed; the validation set and problems do not depend on it)
    data_seed = load_config("conf/tiny.yaml").data.seed + seed if DATA_SEED else None
    cfg = load_config("conf/tiny.yaml", ["train.eval_accuracy_samples=0",
                                         f"elastic.init_checkpoint={prepared}",
                                         f"elastic.output_dir={out}", f"elastic.seed={seed}",
                                         *([f"data.seed={data_seed}"] if DATA_SEED else []),
                                         *(o for o in overrides if not o.startswith("fixed=")),
                                         *(["elastic.router.family_choice=argmax"]
                                           if fixed_axes else [])])
    fixed = fixed_family(cfg, fixed_axes[0], out.parent, prepared) if fixed_axes else None
    start = time.perf_counter()
    with fixed_router(fixed) if fixed else contextlib.nullcontext():
        res = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    family = {r["name"]: SubNetwork.from_dict(r["subnetwork"]) for r in res.family}
    result = {"seed": seed, "data_seed": data_seed, "seconds": round(seconds, 1),
              "fraction": {r["name"]: r["parameter_fraction"] for r in res.family},
              "target": {r["name"]: r["target"] for r in res.family},
              "tolerance": cfg.elastic.loss.tolerance,
              "val": _final_val(out, cfg.elastic.budgets),
              "teacher": res.teacher.get("val_loss") if isinstance(res.teacher, dict) else None,
              "accuracy": bp.final_accuracy(cfg, out, family, accuracy)}
    _write_json(done, result)
    return result


def teacher_accuracy(prepared: str, work: Path, samples: int):
    """Greedy answer accuracy of the parent itself (the teacher) on the same problems."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint, resolve_checkpoint
    from nemo_elastic.config import load_config
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.training.evaluation import answer_accuracy_of

    if samples <= 0:
        return None
    cache = work / f"teacher_accuracy_{samples}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["accuracy"]
    cfg = load_config("conf/tiny.yaml", [f"train.eval_accuracy_samples={samples}",
                                         f"elastic.init_checkpoint={prepared}"]).single_process()
    with runtime.distributed(cfg.parallel) as info:
        data = build_training_data(cfg, info)
        model = build_elastic_model(cfg)
        load_checkpoint(resolve_checkpoint(prepared), model=model, restore_rng=False)
        acc = answer_accuracy_of(cfg, model, data, info, subnetwork=SubNetwork.full(cfg.model))
    _write_json(cache, {"accuracy": acc["accuracy"], "n": acc["n"]})
    return acc["accuracy"]


def accuracy_trajectory(run: Path, samples: int) -> dict:
    """{iteration: {budget: accuracy}}: each saved checkpoint of a finished run, every budget
    at its FINAL sub-network, on the first `samples` validation problems (when accuracy is
    won or lost along the curriculum)."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.config import load_config
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.training.evaluation import answer_accuracy_of

    cache = run / f"accuracy_trajectory_{samples}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = json.loads((run / "family.json").read_text())
    rows = rows["family"] if isinstance(rows, dict) else rows
    family = {r["name"]: SubNetwork.from_dict(r["subnetwork"]) for r in rows}
    cfg = load_config(str(run / "config.json"), [f"train.eval_accuracy_samples={samples}"])
    cfg = cfg.single_process()
    out = {}
    with runtime.distributed(cfg.parallel) as info:
        data = build_training_data(cfg, info)
        model = build_elastic_model(cfg)
        for ckpt in sorted((run / "checkpoints").glob("iter_*")):
            load_checkpoint(ckpt, model=model, restore_rng=False)
            out[int(ckpt.name[5:])] = {
                n: answer_accuracy_of(cfg, model, data, info, subnetwork=sub)["accuracy"]
                for n, sub in family.items()}
            logger.info("%s %s: %s", run.name, ckpt.name, out[int(ckpt.name[5:])])
    _write_json(cache, out)
    return out


def _write_json(path: Path, obj) -> None:
    """Atomically (several bench processes may share `--out`)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def fixed_family(cfg, axes: str, work: Optional[Path] = None,
                 prepared: Optional[str] = None) -> dict:
    """{budget: SubNetwork}: the full model for a full budget, else the uniform cut of `axes`
    (others whole) closest to the budget's parameter target.  `axes="search"`: per budget, the
    cut of whichever axes has the lowest zero-shot loss on training batches (`search_fixed`,
    cached in `work`) among the cuts inside the budget's band."""
    if axes.startswith("run:"):  # the family a finished run deployed, held fixed
        from nemo_elastic.elastic.subnet import SubNetwork

        rows = json.loads((Path(axes[4:]) / "family.json").read_text())
        rows = rows["family"] if isinstance(rows, dict) else rows
        family = {r["name"]: SubNetwork.from_dict(r["subnetwork"]) for r in rows}
        logger.info("fixed family of the run %s: %s", axes[4:],
                    {n: s.describe(cfg.model) for n, s in family.items()})
        return family
    if axes == "search":
        rows = search_fixed(prepared, work)
        best = {}
        for name in cfg.elastic.budgets:
            scored = [(r["loss"][name], r["axes"]) for r in rows
                      if r["loss"].get(name) is not None]
            best[name] = min(scored)[1] if scored else None
        family = {name: (fixed_family(cfg, ax)[name] if ax else None)
                  for name, ax in best.items()}
        full = fixed_family(cfg, "all")
        family = {n: s if s is not None else full[n] for n, s in family.items()}
        logger.info("fixed family by zero-shot search on training batches: %s", best)
        return family
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


def search_fixed(prepared: str, work: Path, microbatches: int = 16) -> list[dict]:
    """Zero-shot loss on TRAINING batches (the first `microbatches` of the training set, in
    order; never the validation set) of every fixed family `fixed=AXES` can name: for each
    non-empty subset of the router's axes, each smaller budget's closest uniform cut of those
    axes (skipped where no cut is inside the budget's band).  Picks which fixed families to
    train against the router's."""
    import itertools

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint, resolve_checkpoint
    from nemo_elastic.config import load_config
    from nemo_elastic.cost_model import count_parameters, subnetwork_parameters
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.training.evaluation import validation_loss

    cache = work / f"search_fixed_{microbatches}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = load_config("conf/tiny.yaml", [f"elastic.init_checkpoint={prepared}",
                                         f"train.eval_iters={microbatches}"]).single_process()
    m, e = cfg.model, cfg.elastic
    full = count_parameters(m)
    rows = []
    with runtime.distributed(cfg.parallel) as info:
        data = build_training_data(cfg, info)
        train_data = dataclasses.replace(data, val_dataset=data.train_iter.dataset)
        model = build_elastic_model(cfg)
        load_checkpoint(resolve_checkpoint(prepared), model=model, restore_rng=False)
        for k in range(1, len(e.axes) + 1):
            for subset in itertools.combinations(e.axes, k):
                axes = ",".join(subset)
                row = {"axes": axes, "fraction": {}, "loss": {}}
                for name, sub in fixed_family(cfg, axes).items():
                    if e.budgets[name] >= 1.0:
                        continue
                    frac = subnetwork_parameters(m, sub) / full
                    row["fraction"][name] = frac
                    inside = abs(frac / e.budgets[name] - 1) <= e.loss.tolerance + 1e-9
                    row["loss"][name] = validation_loss(cfg, model, train_data, 1, info,
                                                        subnetwork=sub) if inside else None
                rows.append(row)
                logger.info("zero-shot on training batches, %s: %s", axes, row)
    _write_json(cache, rows)
    return rows


def summarize(results: dict, teacher_acc=None) -> None:
    """Three tables: quality (mean ± sd over seeds), sizes (per seed, inside the band?), and
    each variant minus the first one, paired by seed (same data order and router init)."""
    from nemo_elastic.report.common import format_table

    # sample sd (n - 1), as bench_peers reports; 0 for one seed
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    ms = lambda xs: (f"{statistics.mean(xs):.4f} ± {sd(xs):.4f}"  # noqa: E731
                     if xs else "-")
    pct = lambda xs: (f"{100 * statistics.mean(xs):.1f} ± {100 * sd(xs):.1f}%"  # noqa: E731
                      if xs else "-")
    results = {k: v for k, v in results.items() if v}
    if not results:
        return
    budgets = max((list(v[0]["fraction"]) for v in results.values()), key=len)
    quality, sizes, paired = [], [], []
    base_name, base = next(iter(results.items()))
    for name, runs in results.items():
        have = [b for b in budgets if b in runs[0]["fraction"]]
        vals = [ms([r["val"][b] for r in runs]) if b in have else "-" for b in budgets]
        gaps = [100 * (r["val"][budgets[0]] / r["teacher"] - 1) for r in runs if r["teacher"]]
        acc = [pct([r["accuracy"][b] for r in runs if r["accuracy"].get(b) is not None])
               if b in have else "-" for b in budgets]
        points = [100 * (r["accuracy"][budgets[0]] - teacher_acc) for r in runs
                  if teacher_acc is not None and r["accuracy"].get(budgets[0]) is not None]
        quality.append((name, len(runs), *vals,
                        f"{statistics.mean(gaps):+.2f}% [{', '.join(f'{g:+.2f}' for g in gaps)}]"
                        if gaps else "-", *acc,
                        f"{statistics.mean(points):+.1f} [{', '.join(f'{g:+.1f}' for g in points)}]"
                        if points else "-",
                        f"{statistics.mean(r['seconds'] for r in runs):.0f}"))
        cells = []
        for b in budgets:
            if b not in have:
                cells.append("-")
                continue
            fr = [r["fraction"][b] for r in runs]
            inside = sum(abs(r["fraction"][b] / r["target"][b] - 1) <= r["tolerance"] + 1e-9
                         for r in runs)
            cells.append(f"{100 * statistics.mean(fr):.1f}% [{', '.join(f'{100 * f:.1f}' for f in fr)}] "
                         f"{inside}/{len(runs)} in")
        sizes.append((name, *cells))
        by_seed = {r["seed"]: r for r in base}
        pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
        paired.append((name, len(pairs), *(
            ms([r["val"][b] - q["val"][b] for r, q in pairs]) if b in have else "-"
            for b in budgets), *(
            pct([r["accuracy"][b] - q["accuracy"][b] for r, q in pairs
                 if r["accuracy"].get(b) is not None and q["accuracy"].get(b) is not None])
            if b in have else "-" for b in budgets)))
    print(format_table(("variant", "seeds", *(f"{b} val" for b in budgets), "full vs teacher",
                        *(f"{b} acc" for b in budgets), "full acc - teacher (points)", "s"),
                       quality))
    if teacher_acc is not None:
        print(f"teacher answer accuracy: {100 * teacher_acc:.1f}%")
    print(format_table(("variant", *(f"{b} size" for b in budgets)), sizes))
    print(f"paired by seed, variant - {base_name}:")
    print(format_table(("variant", "seeds", *(f"{b} val" for b in budgets),
                        *(f"{b} acc" for b in budgets)), paired))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", default="runs/tiny/prepared")
    p.add_argument("--out", default="runs/bench_family_seeds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=OVERRIDE[;OVERRIDE...]; default: the recipe as it is")
    p.add_argument("--accuracy", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--search-fixed", action="store_true",
                   help="print the zero-shot training-batch loss of every fixed= family; no run")
    p.add_argument("--trajectory", nargs="+", default=None, metavar="RUN",
                   help="accuracy of every saved checkpoint of these finished runs; no run")
    p.add_argument("--report-only", action="store_true",
                   help="summarize the finished runs only; start none")
    p.add_argument("--same-data", action="store_true",
                   help="every seed trains on the recipe's batch order (data.seed unchanged)")
    args = p.parse_args()
    global DATA_SEED
    DATA_SEED = not args.same_data
    if args.trajectory:
        teacher = teacher_accuracy(args.prepared, Path(args.out), args.accuracy)
        for run in args.trajectory:
            traj = accuracy_trajectory(Path(run), args.accuracy)
            print(f"{run}: teacher {100 * teacher:.1f}%; " + "; ".join(
                f"it {it}: " + " / ".join(f"{n} {100 * a:.1f}%" for n, a in acc.items())
                for it, acc in traj.items()))
        return
    if args.search_fixed:
        from nemo_elastic.report.common import format_table

        Path(args.out).mkdir(parents=True, exist_ok=True)
        rows = search_fixed(args.prepared, Path(args.out))
        names = [n for n in rows[0]["fraction"]]
        print(format_table(("fixed=", *(f"{n} size / train loss" for n in names)), [
            (r["axes"], *(f"{100 * r['fraction'][n]:.1f}% / "
                          + ("-" if r["loss"][n] is None else f"{r['loss'][n]:.4f}")
                          for n in names)) for r in rows]))
        return
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
            if args.report_only and not (work / tag / "result.json").is_file():
                continue
            r = run_one(overrides, args.prepared, work / tag, seed, args.accuracy)
            r["overrides"] = overrides
            runs = [x for x in results.get(name, []) if x["seed"] != seed] + [r]
            results[name] = sorted(runs, key=lambda x: x["seed"])
            logger.info("%s seed %d: sizes %s val %s teacher %s acc %s (%.0f s)", name, seed,
                        {k: round(v, 4) for k, v in r["fraction"].items()},
                        {k: round(v, 4) for k, v in r["val"].items()}, r["teacher"],
                        r["accuracy"], r["seconds"])
            if not args.report_only:
                _write_json(work / "family_seeds.json", results)
    teacher = teacher_accuracy(args.prepared, work, args.accuracy)
    summarize({k: results[k] for k in variants if k in results}, teacher)


if __name__ == "__main__":
    main()
