"""The paper's claims at toy scale: one elastic run vs the alternatives, on the tiny recipe.

Everything runs on the same data (the tiny recipe's synthetic corpus, 96-token windows), the
same validation protocol (the first `train.eval_iters` x 16 validation sequences; each run's
own periodic validation, which reads exactly those sequences) and the same tokens per
iteration (16 x 96).  It reuses the project's functions: `pretrain`, `prepare`, `train`
(elastic distillation) and the evaluation path.

1. **cost of a family** - deriving the 75 % and 50 % budgets of a pretrained parent by
   * elastic distillation: ONE run, every budget at once (the recipe's two curriculum stages);
   * Minitron-style: prune the prepared parent to one size (the elastic run's sub-network of
     that budget) and distill it alone from the same teacher, once per size;
   * training each size from scratch (random init, the parent's pretraining recipe);
   * zero-shot slicing of the prepared parent (0 tokens);
   -> validation loss of each budget against the tokens spent, and the tokens each method needs
   to reach the elastic model's quality (linear interpolation between evaluations);
2. **curriculum**: stage 2 with budget probabilities 0.5/0.3/0.2 vs uniform (full and smallest
   budget's validation loss);
3. **nesting order**: elastic training from the importance-ordered parent vs from a randomly
   permuted one (same function, different prefixes);
4. **router vs fixed**: the router's sub-networks vs the uniform fraction of every axis at the
   closest parameter count, both trained the same way (the fixed family replaces the router by
   one that always returns its sub-network: same loop, loss, data and teacher).

Writes `claims.json`, `claims_cost.png`, `claims_ablations.png` into `--out` (default
`runs/bench_claims`, resumable: finished runs are reused) and prints the tables and ratios.

    .venv/bin/python bench/bench_claims.py            # ~25 min on 2 CPU cores
    .venv/bin/python bench/bench_claims.py --quick    # a few minutes: tiny step counts
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from nemo_elastic.config import Config

warnings.filterwarnings("ignore")
logger = logging.getLogger("bench_claims")

BUDGETS = {"full": 1.0, "75pct": 0.75, "50pct": 0.5}
DERIVED = ("75pct", "50pct")  # the sizes a family run must produce besides the parent


@dataclasses.dataclass
class Settings:
    parent_iters: int = 1200  # the parent's pretraining (and each from-scratch run)
    stage1_iters: int = 150
    stage2_iters: int = 50
    elastic_eval: int = 25
    scratch_iters: int = 1200
    scratch_eval: int = 100
    eval_iters: int = 8  # x 16 validation sequences of 96 tokens
    seq_length: int = 96
    global_batch: int = 16

    @classmethod
    def quick(cls) -> "Settings":
        return cls(parent_iters=200, stage1_iters=20, stage2_iters=10, elastic_eval=10,
                   scratch_iters=200, scratch_eval=50, eval_iters=4)

    def scaled(self, factor: float) -> "Settings":
        """Every iteration count (and evaluation interval) times `factor` (a busy machine)."""
        if factor == 1.0:
            return self
        f = lambda n: max(2, int(round(n * factor)))  # noqa: E731
        return dataclasses.replace(
            self, parent_iters=self.parent_iters, stage1_iters=f(self.stage1_iters),
            stage2_iters=f(self.stage2_iters), elastic_eval=f(self.elastic_eval),
            scratch_iters=f(self.scratch_iters), scratch_eval=f(self.scratch_eval))

    @property
    def tokens_per_iter(self) -> int:
        return self.global_batch * self.seq_length

    @property
    def elastic_iters(self) -> int:
        return self.stage1_iters + self.stage2_iters


# ----------------------------------------------------------------------------- configs

def recipe(s: Settings, out: Path, **elastic) -> "Config":
    """The tiny recipe at the bench's sizes, KD only; `elastic` replaces fields of its elastic
    section."""
    from nemo_elastic.config import load_config, to_dict

    base = to_dict(load_config("conf/tiny.yaml", [
        f"train.iters={s.parent_iters}", f"train.eval_interval={s.scratch_eval}",
        f"train.save_interval={s.parent_iters}", f"train.eval_iters={s.eval_iters}",
        "train.eval_accuracy_samples=0", "train.log_interval=50",
        f"train.warmup_iters={min(20, s.parent_iters // 10)}"]))
    e = base["elastic"]
    e.update(budgets=dict(BUDGETS), eval_interval=s.elastic_eval, save_interval=s.elastic_iters,
             log_interval=5, curriculum=[
                 {"name": "stage1", "iters": s.stage1_iters, "seq_length": s.seq_length,
                  "global_batch_size": s.global_batch, "micro_batch_size": 4},
                 {"name": "stage2", "iters": s.stage2_iters, "seq_length": s.seq_length,
                  "global_batch_size": s.global_batch, "micro_batch_size": 4,
                  "budget_probs": {"full": 0.5, "75pct": 0.3, "50pct": 0.2}}])
    # every arm of the benchmarks on the paper's KD-only loss (their tables were measured so);
    # the tiny recipe adds label CE for its full model (issue 22 item 4): pass distill= for it
    e["distill"]["ce_weight"] = 0.0
    e.update(elastic)
    base["output_dir"] = str(out)
    return load_config(base=base)


# ----------------------------------------------------------------------------- fixed router

def _axis_size(model_cfg, subnet, axis: str, layers: list[int]) -> int:
    from nemo_elastic.sizes import ELASTIC_AXES

    _, field = ELASTIC_AXES[axis]
    if axis == "hidden":
        return subnet.hidden_size
    sizes = {getattr(subnet.layers[i], field) for i in layers}
    if len(sizes) != 1:
        raise ValueError(f"fixed sub-networks must be homogeneous; {axis}: {sorted(sizes)}")
    return sizes.pop()


@contextlib.contextmanager
def fixed_router(fixed: dict):
    """`train()` with a router that always returns `fixed[budget]` (a hard SubNetwork, as
    one-hot probabilities over sizes): the same loop, loss, teacher and data, no choice."""
    import nemo_elastic.router as router_mod

    base = router_mod.ElasticRouter

    class FixedRouter(base):
        def __init__(self, model, config, **kwargs):
            # no zero-shot search (router.init): the family is given
            config = dataclasses.replace(config, router=dataclasses.replace(config.router,
                                                                            init="random"))
            super().__init__(model, config, **kwargs)
            for axis in list(self.choices):
                sizes = {_axis_size(model, s, axis, self.layers_of[axis]) for s in fixed.values()}
                self.choices[axis] = sorted(set(self.choices[axis]) | sizes, reverse=True)

        def forward(self, budget_index, *, iteration=0, micro_batch=0, noise=True):
            subnet = fixed[self.names[budget_index]]
            dtype = next(self.parameters()).dtype
            probs = {}
            for axis, choices in self.choices.items():
                one = torch.zeros(1, len(choices), dtype=dtype)
                one[0, choices.index(_axis_size(self.model, subnet, axis,
                                                self.layers_of[axis]))] = 1.0
                probs[axis] = one
            return router_mod.RouterOutput(subnetwork=self._soft_subnetwork(probs), probs=probs)

    router_mod.ElasticRouter = FixedRouter
    try:
        yield
    finally:
        router_mod.ElasticRouter = base


# ----------------------------------------------------------------------------- runs

def _history(out: Path) -> list[dict]:
    from nemo_elastic.training.loop import read_metrics

    return read_metrics(out, up_to=10**9)


RESULT_FILE = "bench_result.json"
REPORT_ONLY = False  # set by a benchmark's --report-only: never train, only read stored results


class NotFinished(RuntimeError):
    """A run whose result is not stored yet (raised instead of training under REPORT_ONLY)."""


def cached(out: Path) -> Optional[dict]:
    """A finished run's result (written when it finished), so a rerun skips it; curves come
    back as lists of [tokens, loss] pairs."""
    path = out / RESULT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    if REPORT_ONLY:
        raise NotFinished(str(out))
    return None


def store(out: Path, result: dict) -> dict:
    tmp = out / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out / RESULT_FILE)  # atomic: a crash leaves no half-written result
    return json.loads((out / RESULT_FILE).read_text())


def elastic_run(cfg, name: str, work: Path, init: Path, s: Settings,
                fixed: Optional[dict] = None) -> dict:
    """One elastic distillation run -> {"curve": {budget: [(tokens, val loss)]}, "final",
    "family", "seconds"}; a finished run's stored result is reused."""
    from nemo_elastic.training.train import train

    out = work / name
    if (done := cached(out)) is not None:
        return done
    cfg = dataclasses.replace(cfg, elastic=dataclasses.replace(
        cfg.elastic, init_checkpoint=str(init), output_dir=str(out)))
    start = time.perf_counter()
    with fixed_router(fixed) if fixed else contextlib.nullcontext():
        result = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    curve = {n: [(h["iteration"] * s.tokens_per_iter, h["val_by_budget"][n])
                 for h in _history(out) if n in h.get("val_by_budget", {})]
             for n in cfg.elastic.budgets}
    final = {n: pts[-1][1] for n, pts in curve.items()}
    logger.info("%s: %s (%.0f s)", name, {n: round(v, 4) for n, v in final.items()}, seconds)
    return store(out, {"curve": curve, "final": final, "seconds": seconds,
                       "family": {r["name"]: {"parameters": r["parameters"],
                                              "summary": r["summary"],
                                              "subnetwork": r["subnetwork"]}
                                  for r in result.family}})


def scratch_run(cfg, name: str, work: Path, model_cfg, s: Settings) -> dict:
    """A budget's architecture pretrained from random init with the parent's recipe."""
    from nemo_elastic.training.pretrain import pretrain

    out = work / name
    if (done := cached(out)) is not None:
        return done
    run_cfg = dataclasses.replace(cfg, model=model_cfg, output_dir=str(out), elastic=None,
                                  train=dataclasses.replace(
                                      cfg.train, iters=s.scratch_iters,
                                      save_interval=s.scratch_iters))
    start = time.perf_counter()
    pretrain(run_cfg, progress=False)
    seconds = time.perf_counter() - start
    curve = [(h["iteration"] * s.tokens_per_iter, h["val_loss"]) for h in _history(out)
             if "val_loss" in h]
    logger.info("%s: %.4f (%.0f s)", name, curve[-1][1], seconds)
    return store(out, {"curve": curve, "final": curve[-1][1], "seconds": seconds})


def random_parent(parent: Path, out: Path, seed: int = 0) -> Path:
    """The parent with every width axis randomly permuted (same function, random prefixes)."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import (META_FILE, config_from_checkpoint, load_checkpoint,
                                         save_checkpoint)
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.importance import permute_model_, random_permutations

    if (out / META_FILE).is_file():
        return out
    cfg = config_from_checkpoint(parent).single_process()
    with runtime.distributed(cfg.parallel):
        model = build_elastic_model(cfg)
        load_checkpoint(parent, model=model, restore_rng=False)
        permute_model_(model, cfg.model, random_permutations(
            cfg.model, torch.Generator().manual_seed(seed)))
        save_checkpoint(out, cfg=cfg, model=model, kind="prepared", overwrite=True,
                        extra_meta={"random_order_seed": seed})
    return out


def zero_shot(cfg, ckpt: Path, family: dict) -> dict:
    """Validation loss of each sub-network masked on `ckpt` (no training)."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.training.evaluation import validation_loss

    run_cfg = cfg.single_process()
    with runtime.distributed(run_cfg.parallel) as info:
        data = build_training_data(run_cfg, info)
        model = build_elastic_model(run_cfg)
        load_checkpoint(ckpt, model=model, restore_rng=False)
        return {n: validation_loss(run_cfg, model, data, 1, info,
                                   subnetwork=SubNetwork.from_dict(f["subnetwork"]))
                for n, f in family.items()}


def matched_uniform(model_cfg, target_params: int):
    """The uniform fraction of every axis whose sub-network's parameter count is closest."""
    from nemo_elastic.cost_model import subnetwork_parameters
    from nemo_elastic.importance.zero_shot import fractional_subnetwork

    best = None
    for k in range(200, 1001):
        subnet = fractional_subnetwork(model_cfg, k / 1000)
        gap = abs(subnetwork_parameters(model_cfg, subnet) - target_params)
        if best is None or gap < best[0]:
            best = (gap, subnet)
    return best[1]


def tokens_to_reach(curve: list, target: float) -> Optional[float]:
    """First tokens at which the curve's loss <= target (linear between evaluations)."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            t0, l0 = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


# ----------------------------------------------------------------------------- main

def run(args) -> dict:
    from nemo_elastic.cost_model import count_parameters, subnetwork_parameters
    from nemo_elastic.checkpoint import META_FILE, resolve_checkpoint
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.importance.prepare import prepare
    from nemo_elastic.training.pretrain import pretrain

    s = (Settings.quick() if args.quick else Settings()).scaled(args.scale)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    cfg = recipe(s, work / "parent")
    t = time.perf_counter()
    parent = resolve_checkpoint(args.parent) if args.parent else \
        Path(pretrain(cfg, progress=False).checkpoint)
    seconds["parent"] = time.perf_counter() - t
    m = cfg.model
    full = count_parameters(m)
    t = time.perf_counter()
    prepared = work / "prepared"
    if not (prepared / META_FILE).is_file():
        prepare(parent, prepared, overwrite=True, progress=False)
    seconds["prepare"] = time.perf_counter() - t

    runs = {}
    runs["elastic"] = elastic_run(cfg, "elastic", work, prepared, s)
    family = runs["elastic"]["family"]
    subnets = {n: SubNetwork.from_dict(f["subnetwork"]) for n, f in family.items()}
    runs["elastic_uniform_stage2"] = elastic_run(recipe(s, work / "parent", curriculum=[
        {**dataclasses.asdict(cfg.elastic.curriculum[0])},
        {**dataclasses.asdict(cfg.elastic.curriculum[1]), "budget_probs": None}]),
        "elastic_uniform_stage2", work, prepared, s)
    runs["elastic_random_order"] = elastic_run(cfg, "elastic_random_order", work,
                                               random_parent(parent, work / "random_order"), s)
    uniform = {n: (SubNetwork.full(m) if n == "full" else
                   matched_uniform(m, family[n]["parameters"])) for n in BUDGETS}
    fixed_cfg = recipe(s, work / "parent", budgets={
        n: subnetwork_parameters(m, sub) / full for n, sub in uniform.items()})
    runs["elastic_fixed_uniform"] = elastic_run(fixed_cfg, "elastic_fixed_uniform", work,
                                                prepared, s, fixed=uniform)
    for n in DERIVED:
        one = recipe(s, work / "parent", budgets={n: family[n]["parameters"] / full},
                     curriculum=[{"name": "distill", "iters": s.elastic_iters,
                                  "seq_length": s.seq_length, "global_batch_size": s.global_batch,
                                  "micro_batch_size": 4}])
        runs[f"minitron_{n}"] = elastic_run(one, f"minitron_{n}", work, prepared, s,
                                            fixed={n: subnets[n]})
        runs[f"scratch_{n}"] = scratch_run(cfg, f"scratch_{n}", work,
                                           subnets[n].model_config(m), s)
    zs = zero_shot(cfg, prepared, family)
    zs_random = zero_shot(cfg, work / "random_order", family)
    for name, r in runs.items():
        seconds[name] = r["seconds"]
    result = summarize(s, runs, zs, zs_random, family, uniform, m, full)
    result["seconds"] = {**{k: round(v, 1) for k, v in seconds.items()},
                         "total": round(time.perf_counter() - started, 1)}
    result["settings"] = {**dataclasses.asdict(s), "quick": args.quick, "scale": args.scale,
                          "parent": str(parent)}
    (work / "claims.json").write_text(json.dumps(result, indent=2))
    plot(result, work)
    print_tables(result)
    return result


def summarize(s: Settings, runs: dict, zs: dict, zs_random: dict, family: dict, uniform: dict,
              m, full: int) -> dict:
    from nemo_elastic.cost_model import subnetwork_parameters

    T = s.elastic_iters * s.tokens_per_iter
    el = runs["elastic"]["final"]
    cost = {"elastic_tokens": T, "methods": {}}
    cost["methods"]["zero-shot slicing"] = {"tokens": 0, "val_loss": dict(zs), "reach": {}}
    cost["methods"]["elastic (one run, all budgets)"] = {
        "tokens": T, "val_loss": dict(el), "reach": {n: T for n in DERIVED}}
    for label, key in (("Minitron-style prune + distill, per size", "minitron"),
                       ("from scratch, per size", "scratch")):
        finals, reach, spent = {}, {}, 0
        for n in DERIVED:
            r = runs[f"{key}_{n}"]
            curve = r["curve"][n] if key == "minitron" else r["curve"]
            finals[n] = curve[-1][1]
            reach[n] = tokens_to_reach(curve, el[n])
            spent += curve[-1][0]
        cost["methods"][label] = {"tokens": spent, "val_loss": finals, "reach": reach,
                                  "curves": {n: (runs[f"{key}_{n}"]["curve"][n] if key ==
                                                 "minitron" else runs[f"{key}_{n}"]["curve"])
                                             for n in DERIVED}}
    cost["methods"]["elastic (one run, all budgets)"]["curves"] = runs["elastic"]["curve"]
    for meth in cost["methods"].values():
        r = meth["reach"]
        meth["tokens_to_reach_elastic"] = None if any(r.get(n) is None for n in DERIVED) \
            else sum(r[n] for n in DERIVED)
    fixed_final = runs["elastic_fixed_uniform"]["final"]
    curriculum = {"stage 2 0.5/0.3/0.2": runs["elastic"]["final"],
                  "stage 2 uniform": runs["elastic_uniform_stage2"]["final"]}
    smallest = DERIVED[-1]
    return {
        "claims": claims(cost, curriculum, runs, el, fixed_final, smallest),
        "budgets": {n: {"parameters": f["parameters"], "summary": f["summary"]}
                    for n, f in family.items()},
        "parent_parameters": full,
        "cost_of_family": cost,
        "curriculum": curriculum,
        "nesting_order": {"importance order": runs["elastic"]["final"],
                          "random permutation": runs["elastic_random_order"]["final"],
                          "importance order, zero-shot": zs,
                          "random permutation, zero-shot": zs_random},
        "router_vs_fixed": {
            "router": {n: {"parameters": family[n]["parameters"], "val_loss": el[n],
                           "summary": family[n]["summary"]} for n in BUDGETS},
            "uniform fraction": {n: {"parameters": subnetwork_parameters(m, uniform[n]),
                                     "val_loss": fixed_final[n],
                                     "summary": uniform[n].describe(m)} for n in BUDGETS}},
    }


def claims(cost: dict, curriculum: dict, runs: dict, el: dict, fixed: dict,
           smallest: str) -> list[dict]:
    """One row per claim: the paper's statement, what was measured here, holds or not."""
    T = cost["elastic_tokens"]
    rows = []
    for label, short in (("Minitron-style prune + distill, per size", "Minitron-style"),
                         ("from scratch, per size", "from scratch")):
        meth = cost["methods"][label]
        reach = meth["tokens_to_reach_elastic"]
        ratio = (reach / T) if reach is not None else None
        rows.append({
            "claim": f"one elastic run costs fewer tokens than {short} per size",
            "measured": (f"{short} needs {ratio:.2f}x the elastic run's tokens to reach its "
                         "75pct and 50pct losses" if ratio is not None else
                         f"{short} did not reach the elastic losses within "
                         f"{meth['tokens'] / T:.1f}x the elastic run's tokens"),
            "ratio": ratio, "holds": ratio is None or ratio > 1.0})
    adj, uni = curriculum["stage 2 0.5/0.3/0.2"], curriculum["stage 2 uniform"]
    rows.append({"claim": "stage 2 with 0.5/0.3/0.2 protects the full model",
                 "measured": f"full {adj['full']:.4f} vs uniform {uni['full']:.4f}; "
                             f"{smallest} {adj[smallest]:.4f} vs {uni[smallest]:.4f}",
                 "ratio": uni["full"] / adj["full"], "holds": adj["full"] < uni["full"]})
    rnd = runs["elastic_random_order"]["final"]
    rows.append({"claim": "importance-ordered nesting beats a random order (after training)",
                 "measured": f"{smallest} {el[smallest]:.4f} vs random {rnd[smallest]:.4f}; "
                             f"75pct {el['75pct']:.4f} vs {rnd['75pct']:.4f}",
                 "ratio": rnd[smallest] / el[smallest], "holds": el[smallest] < rnd[smallest]})
    rows.append({"claim": "router-chosen sub-networks beat a uniform fraction of every axis",
                 "measured": f"{smallest} {el[smallest]:.4f} vs uniform {fixed[smallest]:.4f}; "
                             f"75pct {el['75pct']:.4f} vs {fixed['75pct']:.4f}",
                 "ratio": fixed[smallest] / el[smallest], "holds": el[smallest] < fixed[smallest]})
    return rows


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _tok(v) -> str:
    return "not reached" if v is None else f"{v:,.0f}"


def print_tables(r: dict) -> None:
    from nemo_elastic.report.common import format_table

    cost = r["cost_of_family"]
    T = cost["elastic_tokens"]
    print("\nBudgets (the elastic run's router family): " + "; ".join(
        f"{n} {b['parameters']:,} ({b['summary']})" for n, b in r["budgets"].items()))
    rows = []
    for label, meth in cost["methods"].items():
        reach = meth["tokens_to_reach_elastic"]
        rows.append((label, f"{meth['tokens']:,}",
                     *(_f(meth["val_loss"].get(n)) for n in DERIVED),
                     *(_tok(meth["reach"].get(n)) if label != "zero-shot slicing" else "-"
                       for n in DERIVED),
                     "-" if label.startswith(("zero", "elastic")) else
                     ("> " + f"{meth['tokens'] / T:.1f}x" if reach is None else
                      f"{reach / T:.2f}x")))
    print("\n1. Cost of a family (derive 75pct + 50pct from the pretrained parent)")
    print(format_table(("method", "tokens spent", "75pct loss", "50pct loss",
                        "tokens to reach elastic 75pct", "... 50pct",
                        "tokens to reach / elastic"), rows))
    print("\n2. Curriculum: stage-2 budget sampling (validation loss after training)")
    print(format_table(("stage 2", *r["budgets"]), [
        (k, *(_f(v[n]) for n in r["budgets"])) for k, v in r["curriculum"].items()]))
    print("\n3. Nesting order (validation loss)")
    print(format_table(("parent order", *r["budgets"]), [
        (k, *(_f(v[n]) for n in r["budgets"])) for k, v in r["nesting_order"].items()]))
    print("\n4. Router vs fixed uniform fraction (same training)")
    print(format_table(("family", *(f"{n} params" for n in r["budgets"]),
                        *(f"{n} loss" for n in r["budgets"])), [
        (k, *(f"{v[n]['parameters']:,}" for n in r["budgets"]),
         *(_f(v[n]["val_loss"]) for n in r["budgets"])) for k, v in r["router_vs_fixed"].items()]))
    print("\nClaims at toy scale")
    print(format_table(("claim", "measured here", "holds"), [
        (c["claim"], c["measured"], "yes" if c["holds"] else "no") for c in r["claims"]]))
    print(f"\nseconds: {r['seconds']}")


def plot(r: dict, work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost = r["cost_of_family"]["methods"]
    fig, axs = plt.subplots(1, len(DERIVED), figsize=(11, 4), dpi=120, squeeze=False)
    for ax, n in zip(axs[0], DERIVED):
        for k, (label, meth) in enumerate(cost.items()):
            if label == "zero-shot slicing":
                ax.plot([1], [meth["val_loss"][n]], "k^", label=label)
                continue
            pts = [(max(t, 1), v) for t, v in meth["curves"][n]]
            ax.plot(*zip(*pts), "o-", markersize=3, color=f"C{k}", label=label)
        ax.axhline(cost["elastic (one run, all budgets)"]["val_loss"][n], color="grey",
                   linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{n} ({r['budgets'][n]['parameters']:,} parameters)")
        ax.set_xlabel("training tokens spent on this size (log)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(work / "claims_cost.png")
    plt.close(fig)

    names = list(r["budgets"])
    groups = {"curriculum": r["curriculum"],
              "nesting order": {k: v for k, v in r["nesting_order"].items() if "zero" not in k},
              "router vs fixed": {k: {n: x["val_loss"] for n, x in v.items()}
                                  for k, v in r["router_vs_fixed"].items()}}
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120, squeeze=False)
    for ax, (title, variants) in zip(axs[0], groups.items()):
        width = 0.8 / len(variants)
        for k, (label, vals) in enumerate(variants.items()):
            xs = [i + k * width for i in range(len(names))]
            ax.bar(xs, [vals[n] for n in names], width=width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names)
        ax.set_title(title)
        ax.set_ylabel("validation loss (nats/token)")
        lo = min(v[n] for v in variants.values() for n in names)
        hi = max(v[n] for v in variants.values() for n in names)
        ax.set_ylim(max(0.0, lo - 0.3 * (hi - lo) - 0.01), hi + 0.1 * (hi - lo) + 0.01)
        ax.legend(fontsize="x-small")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(work / "claims_ablations.png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny step counts (minutes)")
    parser.add_argument("--out", default=None, help="working folder (default runs/bench_claims"
                        "[_quick]); finished runs in it are reused")
    parser.add_argument("--parent", default=None, help="a pretrained tiny parent (skips "
                        "pretraining; must match the bench's data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every training length (not the parent's) by this factor")
    args = parser.parse_args()
    args.out = args.out or ("runs/bench_claims_quick" if args.quick else "runs/bench_claims")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    run(args)


if __name__ == "__main__":
    main()
