"""Cost of a family: one elastic run against NVIDIA ModelOpt's Minitron per size (issue 22).

Every arm starts from the same pretrained parent, distills against the same frozen teacher (the
parent's function) with the project's own loop, reads the same data at the same tokens per
iteration (`global_batch x seq_length`) and is scored by the same validation protocol (the
first `eval_iters x 16` validation windows; final answer accuracy on `--accuracy` problems):

* **elastic**: ONE run for the whole family (the recipe's two curriculum stages, router);
* **ModelOpt search** (its README's recipe): `mcore_minitron` with a parameter constraint per
  size (candidates within `max_width_pruning` of every width, the `--top-k` largest scored
  zero-shot on held-out training batches), each top-k candidate distilled for `--search-iters`,
  the best (validation loss) distilled for the full length - every search token counted;
* **ModelOpt at the router's architecture**: ModelOpt's importance order, pruned to the
  elastic run's sub-network of that size (no search), distilled per size;
* **uniform cut**: the same fraction of every width axis (parameter-matched to the router's
  sub-network) of the importance-ordered parent, distilled per size;
* **zero-shot** slicing of the importance-ordered parent (0 tokens) and **from scratch** per
  size (random init, the parent's pretraining recipe).

A pruned model trains as the prefix sub-network of a full-size parent whose weights are sorted
by the pruner's order (ModelOpt: `mcore_minitron` pruned to the full sizes, i.e. sorted, nothing
dropped; its pruned model is exactly that prefix when Mamba head channels are not cut), through
the fixed router of `bench_claims.py` (the same loop, loss, teacher and data as the elastic run).

    .venv/bin/python bench/bench_peers.py --parent runs/tiny/checkpoints/iter_0001200 \
        --seeds 3 --scale 0.5
Writes `peers.json` and `peers_cost.png` into `--out` (finished runs are reused).
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
import bench_claims as bc  # noqa: E402

warnings.filterwarnings("ignore")
logger = logging.getLogger("bench_peers")

WIDTH_AXES = ["hidden", "mamba_heads", "mamba_head_dim", "attention_heads", "ffn"]


def budget_names(fractions: list[float]) -> dict[str, float]:
    return {("full" if f == 1.0 else f"{int(round(f * 100))}pct"): f for f in fractions}


def _warmups(iters: int) -> dict:
    """Warm-up lengths that fit a short run (the recipe's 10 iterations otherwise)."""
    from nemo_elastic.config import load_config, to_dict

    router = to_dict(load_config("conf/tiny.yaml"))["elastic"]["router"]
    w = min(10, max(0, iters // 4))
    return {"warmup_iters": w, "router": {**router, "warmup_iters": w}}


def recipe(s, out: Path, budgets: dict, seed: int, **elastic):
    """bench_claims' recipe with these budgets, the stage-2 probabilities spread over them
    (0.5 on full, the rest shared in proportion to the paper's 0.3 / 0.2 ramp) and `seed`."""
    cfg = bc.recipe(s, out, **{**_warmups(s.elastic_iters), **elastic})
    cfg = reseed(cfg, seed)
    names = list(budgets)
    derived = names[1:]
    weights = [len(derived) - i for i in range(len(derived))]
    probs = {names[0]: 0.5, **{n: 0.5 * w / sum(weights) for n, w in zip(derived, weights)}}
    curriculum = [dataclasses.replace(st, budget_probs=probs if st.budget_probs else None)
                  for st in cfg.elastic.curriculum] if "curriculum" not in elastic else \
        cfg.elastic.curriculum
    return dataclasses.replace(
        cfg, elastic=dataclasses.replace(cfg.elastic, budgets=dict(budgets), curriculum=curriculum))


def one_size_recipe(s, out: Path, name: str, fraction: float, seed: int, iters: int,
                    axes=None):
    cfg = bc.recipe(s, out, budgets={name: fraction}, curriculum=[
        {"name": "distill", "iters": iters, "seq_length": s.seq_length,
         "global_batch_size": s.global_batch, "micro_batch_size": 4}],
        save_interval=iters, eval_interval=max(1, min(s.elastic_eval, iters)), **_warmups(iters),
        **({"axes": axes} if axes else {}))
    return reseed(cfg, seed)


def reseed(cfg, seed: int):
    """Seed `seed` of an arm: the elastic run's seed (router init, budget draws), the data
    order (`data.seed`; the corpus and validation windows stay) and `train.seed` (from-scratch
    init), each offset from the recipe's value; seed 0 is the recipe itself."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + seed),
        data=dataclasses.replace(cfg.data, seed=cfg.data.seed + seed),
        elastic=dataclasses.replace(cfg.elastic, seed=cfg.elastic.seed + seed))


# ----------------------------------------------------------------------------- ModelOpt

def _plain_parent(cfg, parent: Path):
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.model.build import build_hybrid_model

    model = build_hybrid_model(cfg.single_process(), spec_backend="local")
    load_checkpoint(parent, model=model, restore_rng=False)
    return model


def _calibration(cfg, num_batches: int, skip: int = 0) -> list:
    from nemo_elastic import runtime
    from nemo_elastic.data.loaders import build_training_data

    with runtime.distributed(cfg.single_process().parallel) as info:
        data = build_training_data(cfg.single_process(), info)
        batches = [next(data.train_iter) for _ in range(skip + num_batches)]
    return batches[skip:]


def full_export(m) -> dict:
    return {"hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
            "num_attention_heads": m.num_attention_heads, "mamba_num_heads": m.mamba_num_heads,
            "mamba_head_dim": m.mamba_head_dim}


def modelopt_sorted_parent(cfg, parent: Path, out: Path, calib: list) -> Path:
    """The parent with every width axis sorted by ModelOpt's Minitron importance (pruned to the
    full sizes: the same function), saved as a checkpoint the project's loop starts from."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import META_FILE, save_checkpoint
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.importance.scores import run_batch
    from nemo_elastic.peers import modelopt_minitron as mm

    if (out / META_FILE).is_file():
        return out
    run_cfg = cfg.single_process()
    with runtime.distributed(run_cfg.parallel):
        plain = _plain_parent(cfg, parent)
        res = mm.prune(plain, cfg.model, lambda mdl: [run_batch(mdl, b) for b in calib],
                       export_config=full_export(cfg.model))
        model = build_elastic_model(run_cfg)
        missing, unexpected = model.load_state_dict(res.state_dict, strict=False)
        params = {n for n, _ in model.named_parameters()}
        assert not (set(missing) & params) and not unexpected, (missing, unexpected)
        save_checkpoint(out, cfg=cfg, model=model, kind="prepared", overwrite=True,
                        extra_meta={"order": "modelopt mcore_minitron " + mm.MODELOPT_VERSION})
    return out


def modelopt_candidates(cfg, parent: Path, calib: list, held_out: list, params: int,
                        top_k: int, max_width_pruning: float) -> list[dict]:
    """ModelOpt's parameter-constrained search: its top-k candidates (export configs), best
    zero-shot score first.  Score = -loss on held-out training batches (higher is better)."""
    from nemo_elastic import runtime
    from nemo_elastic.importance.scores import run_batch
    from nemo_elastic.peers import modelopt_minitron as mm

    def score(mdl) -> float:
        total = 0.0
        with torch.no_grad():
            for b in held_out:
                logits = run_batch(mdl, b).float()
                total += torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), b["labels"].flatten(), reduction="none").mul(
                    b["loss_mask"].flatten()).sum().item() / b["loss_mask"].sum().item()
        return -total / len(held_out)

    with runtime.distributed(cfg.single_process().parallel):
        plain = _plain_parent(cfg, parent)
        res = mm.prune(plain, cfg.model, lambda mdl: [run_batch(mdl, b) for b in calib],
                       params=params, score_func=score, top_k=top_k,
                       max_width_pruning=max_width_pruning)
    scored = [c for c in res.candidates if c["score"] is not None]
    scored.sort(key=lambda c: -c["score"])
    logger.info("ModelOpt search (params <= %s): %d candidates, top %d scored, best %s (%.1f s)",
                f"{params:,}", len(res.candidates), len(scored), res.export_config, res.seconds)
    return [{"export_config": {k: int(v) for k, v in c["config"].items()
                               if k in mm.WIDTH_FIELDS},
             "params": c["metrics"].get("params"), "score": c["score"]} for c in scored]


def subnet_of_export(m, export: dict):
    from nemo_elastic.elastic import SubNetwork

    return SubNetwork.uniform(m, **{k: int(export.get(k, getattr(m, k)))
                                    for k in full_export(m)}).validate(m)


def export_of_subnet(m, subnet) -> dict:
    mc = subnet.model_config(m)
    return {k: getattr(mc, k) for k in full_export(m)}


# ----------------------------------------------------------------------------- runs

def per_size_run(s, work: Path, tag: str, name: str, frac: float, seed: int, init: Path,
                 subnet, iters: int) -> dict:
    cfg = one_size_recipe(s, work / "parent", name, frac, seed, iters, axes=WIDTH_AXES)
    return bc.elastic_run(cfg, tag, work, init, s, fixed={name: subnet})


def final_accuracy(cfg, ckpt_dir: Path, subnets: dict, samples: int) -> dict:
    """Greedy answer accuracy of each sub-network of the run's final checkpoint."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import latest_checkpoint, load_checkpoint
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.training.evaluation import answer_accuracy_of

    if samples <= 0:
        return {}
    cache = ckpt_dir / f"accuracy_{samples}.json"  # finished runs are reused: so is this
    if cache.is_file() and set(json.loads(cache.read_text())) == set(subnets):
        return json.loads(cache.read_text())
    run_cfg = cfg.single_process()
    run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(
        run_cfg.train, eval_accuracy_samples=samples))
    with runtime.distributed(run_cfg.parallel) as info:
        data = build_training_data(run_cfg, info)
        model = build_elastic_model(run_cfg)
        load_checkpoint(latest_checkpoint(ckpt_dir / "checkpoints"), model=model,
                        restore_rng=False)
        out = {}
        for n, sub in subnets.items():
            acc = answer_accuracy_of(run_cfg, model, data, info, subnetwork=sub)
            out[n] = None if acc is None else acc.get("accuracy")
    cache.write_text(json.dumps(out))
    return out


def run(args) -> dict:
    from nemo_elastic.cost_model import count_parameters, subnetwork_parameters
    from nemo_elastic.checkpoint import META_FILE, resolve_checkpoint
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.importance.prepare import prepare

    s = bc.Settings(stage1_iters=args.stage1_iters, stage2_iters=args.stage2_iters,
                    elastic_eval=args.eval_every, scratch_iters=args.scratch_iters,
                    scratch_eval=max(1, args.scratch_iters // 6), eval_iters=args.eval_iters)
    budgets = budget_names(args.budgets)
    derived = list(budgets)[1:]
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parent = resolve_checkpoint(args.parent)
    base = recipe(s, work / "parent", budgets, 0)
    m = base.model
    full = count_parameters(m)
    prepared = work / "prepared"
    if not (prepared / META_FILE).is_file():
        prepare(parent, prepared, overwrite=True, progress=False,
                mamba_signal=args.mamba_signal)
    calib = _calibration(base, args.calib_batches)
    held_out = _calibration(base, 4, skip=args.calib_batches)
    mo_parent = modelopt_sorted_parent(base, parent, work / "modelopt_sorted", calib)
    T = s.elastic_iters * s.tokens_per_iter
    arms: dict[str, dict] = {}
    search = {}
    if args.modelopt_search:
        for n in derived:
            path = work / f"modelopt_candidates_{n}.json"
            if not path.is_file():
                path.write_text(json.dumps(modelopt_candidates(
                    base, parent, calib, held_out, int(budgets[n] * full), args.top_k,
                    args.max_width_pruning), indent=2))
            search[n] = json.loads(path.read_text())
    for seed in range(args.seed_start, args.seeds):
        cfg = recipe(s, work / "parent", budgets, seed)
        el = bc.elastic_run(cfg, f"elastic_s{seed}", work, prepared, s)
        family = {n: SubNetwork.from_dict(f["subnetwork"]) for n, f in el["family"].items()}
        el["accuracy"] = final_accuracy(cfg, work / f"elastic_s{seed}", family, args.accuracy)
        el["parameters"] = {n: f["parameters"] for n, f in el["family"].items()}
        arms.setdefault("elastic", []).append(el)
        zs = bc.zero_shot(cfg, prepared, el["family"])
        arms.setdefault("zero-shot", []).append({"final": zs, "curve": {}})
        rows = {"ModelOpt at router arch": {}, "uniform cut": {}, "from scratch": {}}
        if search:
            rows["ModelOpt search + distill"] = {}
        for n in derived:
            sub = family[n]
            runs = {"ModelOpt at router arch": (mo_parent, sub),
                    "uniform cut": (prepared, bc.matched_uniform(m, el["parameters"][n]))}
            for label, (init, subnet) in runs.items():
                tag = f"{label.split()[0].lower()}_{'router' if 'router' in label else 'uniform'}"
                r = per_size_run(s, work, f"{tag}_{n}_s{seed}", n, budgets[n], seed, init,
                                 subnet, s.elastic_iters)
                r["parameters"] = subnetwork_parameters(m, subnet)
                r["accuracy"] = final_accuracy(cfg, work / f"{tag}_{n}_s{seed}", {n: subnet},
                                               args.accuracy).get(n)
                rows[label][n] = r
            if search:
                rows["ModelOpt search + distill"][n] = search_arm(
                    s, work, n, budgets[n], seed, mo_parent, search[n], args, m, cfg)
            if args.scratch_iters > 0:
                short = dataclasses.replace(cfg, train=dataclasses.replace(
                    cfg.train, warmup_iters=min(cfg.train.warmup_iters, args.scratch_iters // 4)))
                r = bc.scratch_run(short, f"scratch_{n}_s{seed}", work, sub.model_config(m), s)
                r["curve"] = {n: r["curve"]}
                r["parameters"] = el["parameters"][n]
                rows["from scratch"][n] = r
        for label, per in rows.items():
            if per:
                arms.setdefault(label, []).append(per)
    result = summarize(arms, budgets, derived, T, full)
    result["settings"] = {**dataclasses.asdict(s), "seeds": args.seeds, "budgets": budgets,
                          "top_k": args.top_k, "search_iters": args.search_iters,
                          "mamba_signal": args.mamba_signal, "parent": str(parent),
                          "accuracy_samples": args.accuracy}
    result["search_candidates"] = search
    result["seeds_run"] = len(arms["elastic"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    (work / "peers.json").write_text(json.dumps(result, indent=2))
    print_tables(result)
    plot(result, work)
    return result


def search_arm(s, work, n, frac, seed, mo_parent, candidates, args, m, cfg) -> dict:
    """Each top-k candidate distilled for `search_iters`, the best then for the full length;
    every token counted (the winner's curve is offset by the search's tokens)."""
    short = []
    for k, cand in enumerate(candidates[:args.top_k]):
        sub = subnet_of_export(m, cand["export_config"])
        r = per_size_run(s, work, f"modelopt_search_{n}_c{k}_s{seed}", n, frac, seed, mo_parent,
                         sub, args.search_iters)
        short.append((r["final"][n], k, sub, r))
    best_loss, best_k, best_sub, _ = min(short, key=lambda x: x[0])
    spent = len(short) * args.search_iters * s.tokens_per_iter
    r = per_size_run(s, work, f"modelopt_search_{n}_best_s{seed}", n, frac, seed, mo_parent,
                     best_sub, s.elastic_iters)
    r["curve"] = {n: [(t + spent, v) for t, v in r["curve"][n]]}
    r["search_tokens"] = spent
    r["winner"] = {"index": best_k, "export_config": export_of_subnet(m, best_sub),
                   "short_losses": [x[0] for x in short]}
    from nemo_elastic.cost_model import subnetwork_parameters

    r["parameters"] = subnetwork_parameters(m, best_sub)
    r["accuracy"] = final_accuracy(cfg, work / f"modelopt_search_{n}_best_s{seed}",
                                   {n: best_sub}, args.accuracy).get(n)
    return r


# ----------------------------------------------------------------------------- tables

def _ms(values: list) -> tuple:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(arms: dict, budgets: dict, derived: list, T: int, full: int) -> dict:
    """Per method and budget: final loss / accuracy mean and sd over seeds, tokens spent, and
    the tokens needed to reach the elastic run's loss of that budget (same seed's elastic)."""
    table = {}
    elastic = arms["elastic"]
    for label, per_seed in arms.items():
        row = {}
        for n in derived:
            finals, accs, reach, spent, params = [], [], [], [], []
            for seed, r in enumerate(per_seed):
                rr = r if label in ("elastic", "zero-shot") else r[n]
                if label in ("elastic", "zero-shot"):
                    finals.append(rr["final"][n])
                    accs.append((rr.get("accuracy") or {}).get(n))
                    spent.append(T if label == "elastic" else 0)
                    params.append((rr.get("parameters") or {}).get(n))
                    reach.append(T if label == "elastic" else None)
                    continue
                curve = rr["curve"][n]
                finals.append(curve[-1][1])
                accs.append(rr.get("accuracy"))
                spent.append(curve[-1][0])
                params.append(rr.get("parameters"))
                reach.append(bc.tokens_to_reach(curve, elastic[seed]["final"][n]))
            row[n] = {"loss": _ms(finals), "accuracy": _ms(accs), "tokens": _ms(spent)[0],
                      "reach": reach, "reach_mean": _ms(reach)[0]
                      if all(x is not None for x in reach) else None,
                      "parameters": _ms(params)[0], "losses": finals}
        total = [sum(row[n]["tokens"] or 0 for n in derived)]
        reach_all = None if any(row[n]["reach_mean"] is None for n in derived) else \
            sum(row[n]["reach_mean"] for n in derived)
        table[label] = {"budgets": row, "tokens": T if label == "elastic" else total[0],
                        "tokens_to_reach_elastic": reach_all,
                        "ratio": None if reach_all is None else reach_all / T}
    full_loss = _ms([r["final"]["full"] for r in elastic])
    return {"methods": table, "elastic_tokens": T, "parent_parameters": full,
            "elastic_full_loss": full_loss, "derived": derived,
            "curves": {label: [({n: (r if label in ("elastic", "zero-shot") else r[n])
                                 .get("curve", {}).get(n) for n in derived}) for r in per_seed]
                       for label, per_seed in arms.items()}}


def _f(ms, digits=4) -> str:
    m, sd = ms
    return "n/a" if m is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


def print_tables(r: dict) -> None:
    from nemo_elastic.report.common import format_table

    derived = r["derived"]
    T = r["elastic_tokens"]
    print(f"\nCost of a family: {len(derived)} derived sizes, {r['seeds_run']} seed(s) "
          f"(mean ± sd over seeds); elastic full budget {_f(r['elastic_full_loss'])}")
    rows = []
    for label, meth in r["methods"].items():
        b = meth["budgets"]
        rows.append((label, f"{meth['tokens']:,.0f}",
                     *(_f(b[n]["loss"]) for n in derived),
                     *(_f(b[n]["accuracy"], 3) for n in derived),
                     "-" if label in ("elastic", "zero-shot") else
                     ("not reached" if meth["ratio"] is None else f"{meth['ratio']:.2f}x")))
    print(format_table(("method", "tokens spent", *(f"{n} loss" for n in derived),
                        *(f"{n} acc." for n in derived), "tokens to reach elastic / elastic"),
                       rows))
    print("\nParameters per budget (mean over seeds): " + "; ".join(
        f"{label}: " + ", ".join(f"{n} {meth['budgets'][n]['parameters']:,.0f}"
                                 for n in derived if meth['budgets'][n]['parameters'])
        for label, meth in r["methods"].items() if label != "zero-shot"))
    print(f"seconds: {r['seconds']}  (T = {T:,} tokens per elastic run)")
    search = r["methods"].get("ModelOpt search + distill") or r["methods"].get(
        "ModelOpt at router arch")
    print_extrapolation(search["ratio"] if search else None)


# The paper's 12B numbers (paper-digest, Table 2): Minitron-SSM spends 480B exploratory + 270B
# final tokens for 9B + 6B, i.e. 375B per derived size; the elastic run 110B for the family.
PAPER_ELASTIC_TOKENS = 110e9
PAPER_MINITRON_PER_SIZE = 375e9
TOKENS_PER_GPU_SECOND = 4000.0  # assumed 12B hybrid training throughput per H100 (~30 % MFU)


def extrapolate(ratio_two_sizes: float | None) -> list[tuple]:
    """An extrapolation, not a measurement: tokens and GPU-hours to derive a 12B family of
    `n` budgets (n - 1 derived sizes) by one elastic run (the paper's 110B, constant in n, and
    a conservative variant growing with the budgets' share, 110B x n / 3) against ModelOpt
    Minitron per size (the paper's 375B per size, and our measured per-size token ratio at toy
    scale applied to the paper's elastic run: ratio / 2 x 110B per size)."""
    rows = []
    gpuh = lambda t: t / TOKENS_PER_GPU_SECOND / 3600  # noqa: E731
    for n in (2, 3, 5):
        derived = n - 1
        el_const, el_prop = PAPER_ELASTIC_TOKENS, PAPER_ELASTIC_TOKENS * n / 3
        mt_paper = derived * PAPER_MINITRON_PER_SIZE
        mt_toy = None if ratio_two_sizes is None else \
            derived * ratio_two_sizes / 2 * PAPER_ELASTIC_TOKENS
        rows.append((n, el_const, el_prop, mt_paper, mt_toy, gpuh))
    return rows


def print_extrapolation(ratio: float | None) -> None:
    from nemo_elastic.report.common import format_table

    b = lambda t: "n/a" if t is None else f"{t / 1e9:,.0f}B"  # noqa: E731
    h = lambda t, g: "n/a" if t is None else f"{g(t):,.0f}"  # noqa: E731
    rows = [(n, b(ec), b(ep), b(mp), b(mt), h(ec, g), h(mp, g), h(mt, g),
             f"{mp / ec:.1f}x" if mp else "-")
            for n, ec, ep, mp, mt, g in extrapolate(ratio)]
    print(f"\nCost at 12B, EXTRAPOLATED (not measured): {TOKENS_PER_GPU_SECOND:,.0f} tokens/s "
          "per GPU assumed; toy per-size ratio " + ("n/a" if ratio is None else f"{ratio:.2f}"))
    print(format_table(("budgets", "elastic (paper, const)", "elastic (x n/3)",
                        "ModelOpt per size (paper 375B/size)", "ModelOpt per size (toy ratio)",
                        "elastic GPU-h", "ModelOpt GPU-h (paper)", "ModelOpt GPU-h (toy)",
                        "paper saving"), rows))


def plot(r: dict, work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    derived = r["derived"]
    fig, axs = plt.subplots(1, len(derived), figsize=(4.5 * len(derived), 4), dpi=120,
                            squeeze=False)
    for ax, n in zip(axs[0], derived):
        for k, (label, per_seed) in enumerate(r["curves"].items()):
            for j, curves in enumerate(per_seed):
                pts = curves.get(n)
                if label == "zero-shot":
                    ax.plot([1], [r["methods"][label]["budgets"][n]["losses"][j]], "k^",
                            label=label if j == 0 else None)
                    continue
                if not pts:
                    continue
                xs, ys = zip(*[(max(t, 1), v) for t, v in pts])
                ax.plot(xs, ys, "-", color=f"C{k}", alpha=0.7, linewidth=1,
                        label=label if j == 0 else None)
        ax.set_xscale("log")
        ax.set_title(n)
        ax.set_xlabel("training tokens spent on this size (log; elastic: its one run)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(work / "peers_cost.png")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", required=True, help="the pretrained parent checkpoint")
    p.add_argument("--out", default="runs/bench_peers")
    p.add_argument("--budgets", type=lambda v: [float(x) for x in v.split(",")],
                   default=[1.0, 0.75, 0.5], help="fractions of the parent, first = 1.0")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-start", type=int, default=0, help="first seed (another process can "
                   "fill later seeds' runs in the same --out; they are reused)")
    p.add_argument("--stage1-iters", type=int, default=150)
    p.add_argument("--stage2-iters", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--scratch-iters", type=int, default=1200, help="0: no from-scratch arm")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--search-iters", type=int, default=20)
    p.add_argument("--max-width-pruning", type=float, default=0.6)
    p.add_argument("--no-modelopt-search", dest="modelopt_search", action="store_false")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--accuracy", type=int, default=64, help="answer-accuracy problems (0: off)")
    p.add_argument("--mamba-signal", default="output", help="the prepared parent's Mamba signal")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.budgets[0] != 1.0:
        p.error("--budgets must start with 1.0 (the full model)")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    bc.logger.setLevel(logging.INFO)
    run(args)


if __name__ == "__main__":
    main()
