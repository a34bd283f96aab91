"""Cost of a family: one elastic run against NVIDIA ModelOpt's Minitron per size (issue 22).

Every arm starts from the same pretrained parent, distills against the same frozen teacher (the
parent's function) with the project's own loop, reads the same data at the same tokens per
iteration (`global_batch x seq_length`) and is scored by the same validation protocol (the
first `eval_iters x 16` validation windows; final answer accuracy on `--accuracy` problems):

* **elastic**: ONE run for the whole family (the recipe's two curriculum stages, router);
  `--extra-sampling all` adds the same run under another `budget_sampling` as its own rows;
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
        --seeds 3 --stage1-iters 90 --stage2-iters 30 --eval-every 15 --name peers3
    (README "The paper's claims" gives the exact commands of its tables; one process per seed
    with --seed-start S --seeds S+1 shares the machine's cores; a final --report-only pass
    writes the tables of every seed.)
Tokens are what the paper counts; the tables also give an estimate of training compute
(`elastic_compute`, `per_size_compute`: full-model forward+backward token passes), since an
elastic step runs a teacher forward and one student per budget it trains.
Writes `NAME.json`, `NAME.md` (the tables), `NAME_cost.png` (loss vs tokens, mean ± sd per
method and size) and `NAME_final.png` into `--out`. Each run stores its result when it
ends and is skipped on a rerun, so a killed benchmark resumes; `--report-only` writes the
tables from what is stored.
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
from typing import Optional

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


TEACHER_PASS = 1.0 / 3.0  # a frozen teacher's forward costs ~1/3 of a forward + backward


def elastic_compute(cfg, fractions: dict) -> float:
    """Estimated training compute of the elastic run, in full-model forward+backward token
    passes: per stage, its tokens x (the students' parameter fractions weighted by how often
    the step runs each, `expected_student_runs`, + one teacher forward).  `fractions`: each
    budget's parameter fraction; the full budget is the one at fraction 1.  Parameters only
    (6 N flops per token): attention's sequence term and the router are left out, as is the
    hidden-state size."""
    from nemo_elastic.training.elastic.schedule import Curriculum
    from nemo_elastic.training.elastic.step import expected_student_runs

    f = [fractions[n] for n in cfg.elastic.budget_names]
    full = next((i for i, x in enumerate(f) if x >= 1.0), None)
    total = 0.0
    for st in Curriculum(cfg.elastic, cfg.data).stages:
        runs = expected_student_runs(cfg.elastic.budget_sampling, st.budget_probs, full)
        students = sum(fi * ri for fi, ri in zip(f, runs))
        total += st.iters * st.tokens_per_iteration * (students + TEACHER_PASS)
    return total


def per_size_compute(tokens: float, fraction: float) -> float:
    """A per-size distillation's compute in the same unit: one student of `fraction` and one
    teacher forward per token."""
    return tokens * (fraction + TEACHER_PASS)


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


def final_accuracy(cfg, ckpt_dir: Path, subnets: dict, samples: int, model_cfg=None) -> dict:
    """Greedy answer accuracy of each sub-network of the run's final checkpoint (`model_cfg`:
    a plain model of that config, e.g. a from-scratch run; its one entry is the whole model)."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import latest_checkpoint, load_checkpoint
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.model.build import build_hybrid_model
    from nemo_elastic.training.evaluation import answer_accuracy_of

    if samples <= 0:
        return {}
    cache = ckpt_dir / f"accuracy_{samples}.json"  # finished runs are reused: so is this
    if cache.is_file() and set(json.loads(cache.read_text())) == set(subnets):
        return json.loads(cache.read_text())
    if bc.REPORT_ONLY:
        raise bc.NotFinished(str(cache))
    run_cfg = cfg.single_process()
    run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(
        run_cfg.train, eval_accuracy_samples=samples))
    if model_cfg is not None:
        run_cfg = dataclasses.replace(run_cfg, model=model_cfg, elastic=None)
    with runtime.distributed(run_cfg.parallel) as info:
        data = build_training_data(run_cfg, info)
        model = build_elastic_model(run_cfg) if model_cfg is None else \
            build_hybrid_model(run_cfg, spec_backend="local")
        load_checkpoint(latest_checkpoint(ckpt_dir / "checkpoints"), model=model,
                        restore_rng=False)
        out = {}
        for n, sub in subnets.items():
            acc = answer_accuracy_of(run_cfg, model, data, info,
                                     subnetwork=None if model_cfg is not None else sub)
            out[n] = None if acc is None else acc.get("accuracy")
    cache.write_text(json.dumps(out))
    return out


ARMS = {"modelopt-router": "ModelOpt at router arch", "uniform": "uniform cut",
        "modelopt-search": "ModelOpt search + distill", "scratch": "from scratch"}


def run(args) -> dict:
    from nemo_elastic.cost_model import count_parameters
    from nemo_elastic.checkpoint import META_FILE, resolve_checkpoint
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
    needs_modelopt = {"modelopt-router", "modelopt-search"} & set(args.arms)
    mo_parent = modelopt_sorted_parent(base, parent, work / "modelopt_sorted", calib) \
        if needs_modelopt else None
    T = s.elastic_iters * s.tokens_per_iter
    search = {}
    if "modelopt-search" in args.arms:
        for n in derived:
            path = work / f"modelopt_candidates_{n}.json"
            if not path.is_file():
                path.write_text(json.dumps(modelopt_candidates(
                    base, parent, calib, held_out, int(budgets[n] * full), args.top_k,
                    args.max_width_pruning), indent=2))
            search[n] = json.loads(path.read_text())
    arms: dict[str, list] = {}
    seeds_done = []
    for seed in range(args.seed_start, args.seeds):
        try:  # a seed counts only once every arm of it is stored (--report-only skips the rest)
            one = run_seed(args, s, work, seed, budgets, derived, prepared, mo_parent, search, m)
        except bc.NotFinished as missing:
            logger.info("seed %d not finished (%s): left out of the tables", seed, missing)
            continue
        seeds_done.append(seed)
        for label, r in one.items():
            arms.setdefault(label, []).append({**r, "seed": seed})
    if not seeds_done:
        raise SystemExit("no seed finished yet")
    result = summarize(arms, budgets, derived, T, full)
    result["settings"] = {**dataclasses.asdict(s), "seeds": seeds_done, "budgets": budgets,
                          "arms": list(args.arms), "top_k": args.top_k,
                          "search_iters": args.search_iters,
                          "mamba_signal": args.mamba_signal, "parent": str(parent),
                          "sampling": base_sampling(args),
                          "accuracy_samples": args.accuracy}
    result["search_candidates"] = search
    result["seeds_run"] = len(seeds_done)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["run_seconds"] = run_seconds(arms, derived)
    name = args.name
    (work / f"{name}.json").write_text(json.dumps(result, indent=2))
    text = print_tables(result)
    (work / f"{name}.md").write_text(text)
    plot(result, work, name)
    return result


def is_elastic(label: str) -> bool:
    """The elastic run, or a variant of it (`elastic (SAMPLING)`, --extra-sampling)."""
    return label == "elastic" or label.startswith("elastic (")


def base_sampling(args) -> str:
    """The elastic run's budget sampling: --sampling or conf/tiny.yaml's."""
    from nemo_elastic.config import load_config

    return args.sampling or load_config("conf/tiny.yaml").elastic.budget_sampling


def run_seed(args, s, work, seed, budgets, derived, prepared, mo_parent, search, m) -> dict:
    """Every arm of one seed -> {label: result}; each run's result is stored when it ends.
    Arm by arm (every size of one arm before the next arm, the ModelOpt arms first), so a
    benchmark stopped early has whole arms; under --report-only an arm with a missing run is
    left out of this seed (the elastic run missing leaves the whole seed out)."""
    from nemo_elastic.cost_model import count_parameters, subnetwork_parameters
    from nemo_elastic.elastic.subnet import SubNetwork

    m_params = count_parameters(m)

    def elastic(tag: str, sampling: Optional[str]) -> tuple:
        """One elastic run of this seed (`sampling`: its budget_sampling, None: the recipe's)
        with its final accuracy, parameters and estimated compute -> (config, result)."""
        run_cfg = recipe(s, work / "parent", budgets, seed,
                         **({"budget_sampling": sampling} if sampling else {}))
        r = bc.elastic_run(run_cfg, tag, work, prepared, s)
        r["accuracy"] = final_accuracy(
            run_cfg, work / tag,
            {n: SubNetwork.from_dict(f["subnetwork"]) for n, f in r["family"].items()},
            args.accuracy)
        r["parameters"] = {n: f["parameters"] for n, f in r["family"].items()}
        r["compute"] = elastic_compute(run_cfg, {n: p / m_params
                                                 for n, p in r["parameters"].items()})
        return run_cfg, r

    out = {}
    cfg, el = elastic(f"elastic_s{seed}", args.sampling)
    family = {n: SubNetwork.from_dict(f["subnetwork"]) for n, f in el["family"].items()}
    out["elastic"] = el
    out["zero-shot"] = {"final": bc.zero_shot(cfg, prepared, el["family"]), "curve": {}}
    for mode in args.extra_sampling:  # the same seed's elastic run with other budget sampling
        out[f"elastic ({mode})"] = elastic(f"elastic_{mode}_s{seed}", mode)[1]

    def distilled(tag, init, subnet_of):
        def one(n):
            subnet = subnet_of(n)
            r = per_size_run(s, work, f"{tag}_{n}_s{seed}", n, budgets[n], seed, init,
                             subnet, s.elastic_iters)
            r["parameters"] = subnetwork_parameters(m, subnet)
            r["accuracy"] = final_accuracy(cfg, work / f"{tag}_{n}_s{seed}", {n: subnet},
                                           args.accuracy).get(n)
            return r
        return one

    def scratch(n):
        sub = family[n]
        short = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, warmup_iters=min(cfg.train.warmup_iters, args.scratch_iters // 4)))
        r = bc.scratch_run(short, f"scratch_{n}_s{seed}", work, sub.model_config(m), s)
        r["curve"] = {n: r["curve"]}
        r["parameters"] = el["parameters"][n]
        r["accuracy"] = final_accuracy(short, work / f"scratch_{n}_s{seed}",
                                       {n: SubNetwork.full(sub.model_config(m))},
                                       args.accuracy, model_cfg=sub.model_config(m)).get(n)
        return r

    arms = {
        "modelopt-router": distilled("modelopt_router", mo_parent, lambda n: family[n]),
        "modelopt-search": lambda n: search_arm(s, work, n, budgets[n], seed, mo_parent,
                                                search[n], args, m, cfg),
        "uniform": distilled("uniform_uniform", prepared,
                             lambda n: bc.matched_uniform(m, el["parameters"][n])),
        "scratch": scratch}
    for arm, one in arms.items():
        if arm not in args.arms:
            continue
        try:
            out[ARMS[arm]] = {n: one(n) for n in derived}
        except bc.NotFinished as missing:
            logger.info("seed %d, %s not finished (%s): left out", seed, ARMS[arm], missing)
    return out


def run_seconds(arms: dict, derived: list) -> dict:
    """Mean wall seconds of one seed of each arm (all its per-size runs, search included)."""
    out = {}
    for label, per_seed in arms.items():
        if label == "zero-shot":
            continue
        secs = []
        for r in per_seed:
            if is_elastic(label):
                secs.append(r["seconds"])
            else:
                secs.append(sum(r[n]["seconds"] + r[n].get("search_seconds", 0)
                                for n in derived))
        out[label] = round(statistics.mean(secs), 1)
    return out


def search_arm(s, work, n, frac, seed, mo_parent, candidates, args, m, cfg) -> dict:
    """Each top-k candidate distilled for `search_iters`, the best then for the full length;
    every token counted (the winner's curve is offset by the search's tokens)."""
    short = []
    for k, cand in enumerate(candidates[:args.top_k]):
        sub = subnet_of_export(m, cand["export_config"])
        r = per_size_run(s, work, f"modelopt_search_{n}_c{k}_s{seed}", n, frac, seed, mo_parent,
                         sub, args.search_iters)
        short.append((r["final"][n], k, sub, r))
    _, best_k, best_sub, _ = min(short, key=lambda x: x[0])
    spent = len(short) * args.search_iters * s.tokens_per_iter
    r = per_size_run(s, work, f"modelopt_search_{n}_best_s{seed}", n, frac, seed, mo_parent,
                     best_sub, s.elastic_iters)
    r["curve"] = {n: [(t + spent, v) for t, v in r["curve"][n]]}
    r["search_tokens"] = spent
    r["search_seconds"] = sum(x[3]["seconds"] for x in short)
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


def loss_at(curve: list, tokens: float) -> Optional[float]:
    """The curve's loss at `tokens` (linear between evaluations; None past its end)."""
    prev = None
    for t, v in curve:
        if t >= tokens:
            if t == tokens:
                return v
            if prev is None:  # not evaluated yet at `tokens` (e.g. still searching)
                return None
            t0, v0 = prev
            return v0 + (v - v0) * (tokens - t0) / (t - t0)
        prev = (t, v)
    return None


def summarize(arms: dict, budgets: dict, derived: list, T: int, full: int) -> dict:
    """Per method and budget: final loss / accuracy mean and sd over seeds, tokens spent, the
    loss at equal tokens (the elastic run's tokens shared equally by the derived sizes, and all
    of them), and the tokens needed to reach the same seed's elastic loss of that budget."""
    table = {}
    elastic = {r["seed"]: r for r in arms["elastic"]}
    share = T / len(derived)
    for label, per_seed in arms.items():
        row = {}
        for n in derived:
            finals, accs, reach, spent, params, at_share, at_T = [], [], [], [], [], [], []
            for r in per_seed:
                if is_elastic(label) or label == "zero-shot":
                    finals.append(r["final"][n])
                    accs.append((r.get("accuracy") or {}).get(n))
                    spent.append(T if is_elastic(label) else 0)
                    params.append((r.get("parameters") or {}).get(n))
                    reach.append(T if is_elastic(label) else None)
                    continue
                rr = r[n]
                curve = rr["curve"][n]
                finals.append(curve[-1][1])
                accs.append(rr.get("accuracy"))
                spent.append(curve[-1][0])
                params.append(rr.get("parameters"))
                reach.append(bc.tokens_to_reach(curve, elastic[r["seed"]]["final"][n]))
                at_share.append(loss_at(curve, share))
                at_T.append(loss_at(curve, T))
            reached = [x for x in reach if x is not None]
            # a seed that never reached: it needs MORE than it spent -> a lower bound
            bound = [x if x is not None else t for x, t in zip(reach, spent)]
            row[n] = {"loss": _ms(finals), "accuracy": _ms(accs), "tokens": _ms(spent)[0],
                      "reach": reach, "reached": len(reached), "seeds": len(reach),
                      "reach_mean": _ms(bound)[0] if label != "zero-shot" else None,
                      "loss_at_share": _ms(at_share), "loss_at_T": _ms(at_T),
                      "parameters": _ms(params)[0], "losses": finals}
        spent_all = sum(row[n]["tokens"] or 0 for n in derived)
        if is_elastic(label):
            compute = _ms([r.get("compute") for r in per_seed])[0]
        elif label == "zero-shot":
            compute = 0.0
        else:  # each size's tokens (search included) at its parameter fraction
            compute = sum(per_size_compute(row[n]["tokens"] or 0,
                                           (row[n]["parameters"] or full) / full)
                          for n in derived)
        reach_all = None if label == "zero-shot" else sum(row[n]["reach_mean"] for n in derived)
        exact = all(row[n]["reached"] == row[n]["seeds"] for n in derived)
        compute_to_reach = None if is_elastic(label) or label == "zero-shot" else sum(
            per_size_compute(row[n]["reach_mean"], (row[n]["parameters"] or full) / full)
            for n in derived)
        table[label] = {"budgets": row, "tokens": T if is_elastic(label) else spent_all,
                        "compute": compute, "compute_to_reach_elastic": compute_to_reach,
                        "tokens_to_reach_elastic": reach_all,
                        "ratio": None if reach_all is None else reach_all / T,
                        "ratio_is_lower_bound": not exact,
                        "seeds": [r["seed"] for r in per_seed]}
    full_loss = _ms([r["final"]["full"] for r in elastic.values()])
    full_acc = _ms([(r.get("accuracy") or {}).get("full") for r in elastic.values()])
    return {"methods": table, "elastic_tokens": T, "parent_parameters": full,
            "elastic_full_loss": full_loss, "elastic_full_accuracy": full_acc,
            "derived": derived, "budgets": budgets,
            "curves": {label: [({n: (r if is_elastic(label) or label == "zero-shot" else r[n])
                                 .get("curve", {}).get(n) for n in derived}) for r in per_seed]
                       for label, per_seed in arms.items()}}


def _f(ms, digits=4, scale=1.0, unit="") -> str:
    m, sd = ms
    return "n/a" if m is None else f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}{unit}"


def _ratio(meth: dict) -> str:
    if meth["ratio"] is None:
        return "-"
    return ("≥ " if meth["ratio_is_lower_bound"] else "") + f"{meth['ratio']:.2f}×"


def _compute_ratio(meth: dict, elastic_compute: Optional[float]) -> str:
    """Compute to reach the elastic losses over the elastic run's compute (a lower bound
    where the tokens to reach are)."""
    if meth.get("compute_to_reach_elastic") is None or not elastic_compute:
        return "-"
    return ("≥ " if meth["ratio_is_lower_bound"] else "") + \
        f"{meth['compute_to_reach_elastic'] / elastic_compute:.2f}×"


def print_tables(r: dict) -> str:
    """The markdown tables (printed and returned, for the output folder)."""
    from nemo_elastic.report.common import format_table

    derived = r["derived"]
    T = r["elastic_tokens"]
    share = T / len(derived)
    lines = [f"Cost of a family: {len(derived)} derived sizes ({', '.join(derived)}), "
             f"{r['seeds_run']} seed(s) {r['settings']['seeds']} (mean ± sd over seeds); "
             f"elastic run T = {T:,} tokens; elastic full budget {_f(r['elastic_full_loss'])} "
             f"loss, {_f(r['elastic_full_accuracy'], 1, 100, ' %')} accuracy; budget sampling "
             f"{r['settings'].get('sampling')}. Compute: estimated training compute in full-model "
             "forward+backward token passes (students' parameter fractions + a teacher forward "
             "as 1/3 pass per token; `elastic_compute`), relative to the elastic run's", ""]
    rows = []
    for label, meth in r["methods"].items():
        b = meth["budgets"]
        el_compute = r["methods"]["elastic"].get("compute")
        compute = meth.get("compute")
        rows.append((f"{label} ({len(meth['seeds'])} seeds)", f"{meth['tokens']:,.0f}",
                     "n/a" if compute is None or not el_compute else f"{compute / el_compute:.2f}×",
                     *(_f(b[n]["loss"]) for n in derived),
                     *(_f(b[n]["accuracy"], 0, 100, " %") for n in derived),
                     "-" if is_elastic(label) or label == "zero-shot" else _ratio(meth),
                     _compute_ratio(meth, el_compute)))
    lines.append(format_table(
        ("method", "tokens spent (all sizes)", "compute / elastic's",
         *(f"{n} loss" for n in derived),
         *(f"{n} acc." for n in derived), "tokens to reach elastic / T",
         "compute to reach elastic / elastic's"), rows))
    lines += ["", f"Equal tokens: loss of each per-size run after T/{len(derived)} = "
              f"{share:,.0f} tokens (the family's tokens shared equally) and after T = {T:,} "
              "(each size alone gets the whole family's tokens); elastic: its one run.", ""]
    rows = []
    for label, meth in r["methods"].items():
        if label == "zero-shot":
            continue
        b = meth["budgets"]
        if is_elastic(label):
            rows.append((label, *(_f(b[n]["loss"]) for n in derived),
                         *(_f(b[n]["loss"]) for n in derived)))
            continue
        rows.append((label, *(_f(b[n]["loss_at_share"]) for n in derived),
                     *(_f(b[n]["loss_at_T"]) for n in derived)))
    lines.append(format_table(("method", *(f"{n} @ T/{len(derived)}" for n in derived),
                               *(f"{n} @ T" for n in derived)), rows))
    lines += ["", "Tokens to reach the same seed's elastic loss, per size (mean over seeds; "
              "'k/n' seeds reached it; a seed that did not counts its tokens spent, so the "
              "mean is then a lower bound):", ""]
    rows = []
    for label, meth in r["methods"].items():
        if is_elastic(label) or label == "zero-shot":
            continue
        b = meth["budgets"]
        rows.append((label, *(f"{b[n]['reach_mean']:,.0f} ({b[n]['reached']}/{b[n]['seeds']})"
                              for n in derived), _ratio(meth)))
    lines.append(format_table(("method", *derived, "sum / T"), rows))
    lines += ["", "Parameters per budget (mean over seeds): " + "; ".join(
        f"{label}: " + ", ".join(f"{n} {meth['budgets'][n]['parameters']:,.0f}"
                                 for n in derived if meth['budgets'][n]['parameters'])
        for label, meth in r["methods"].items() if label != "zero-shot")]
    lines.append("Wall seconds per seed and arm (all sizes): " + ", ".join(
        f"{k} {v:,.0f}" for k, v in r.get("run_seconds", {}).items()))
    search = r["methods"].get("ModelOpt search + distill") or r["methods"].get(
        "ModelOpt at router arch")
    ratio = None
    if search and search["ratio"] is not None:
        ratio = search["ratio"] / len(derived)  # per derived size
    lines += ["", extrapolation_table(ratio, search["ratio_is_lower_bound"] if search else True)]
    text = "\n".join(lines)
    print(text)
    return text


# The paper's 12B numbers (paper-digest, Table 2): Minitron-SSM spends 480B exploratory + 270B
# final tokens for 9B + 6B, i.e. 375B per derived size; the elastic run 110B for the family.
PAPER_ELASTIC_TOKENS = 110e9
PAPER_MINITRON_PER_SIZE = 375e9
TOKENS_PER_GPU_SECOND = 4000.0  # assumed 12B hybrid training throughput per H100 (~30 % MFU)


def extrapolate(per_size_ratio: Optional[float]) -> list[tuple]:
    """An extrapolation, not a measurement: tokens to derive a 12B family of `n` budgets
    (n - 1 derived sizes) by one elastic run (the paper's 110B, constant in n, and a
    conservative variant growing with the budgets, 110B x n / 3) against ModelOpt Minitron per
    size (the paper's 375B per size, and the toy scale's measured tokens-to-reach ratio per
    derived size applied to the paper's elastic run: ratio x 110B per size)."""
    rows = []
    for n in (2, 3, 5):
        derived = n - 1
        mt_toy = None if per_size_ratio is None else derived * per_size_ratio * \
            PAPER_ELASTIC_TOKENS
        rows.append((n, PAPER_ELASTIC_TOKENS, PAPER_ELASTIC_TOKENS * n / 3,
                     derived * PAPER_MINITRON_PER_SIZE, mt_toy))
    return rows


def gpu_hours(tokens: float) -> float:
    return tokens / TOKENS_PER_GPU_SECOND / 3600


def extrapolation_table(per_size_ratio: Optional[float], lower_bound: bool) -> str:
    from nemo_elastic.report.common import format_table

    b = lambda t: "n/a" if t is None else f"{t / 1e9:,.0f}B"  # noqa: E731
    h = lambda t: "n/a" if t is None else f"{gpu_hours(t):,.0f}"  # noqa: E731
    ge = "≥ " if lower_bound and per_size_ratio is not None else ""
    rows = [(n, b(ec), b(ep), b(mp), ge + b(mt), h(ec), h(mp), ge + h(mt),
             f"{mp / ec:.1f}×", "n/a" if mt is None else f"{ge}{mt / ec:.1f}×")
            for n, ec, ep, mp, mt in extrapolate(per_size_ratio)]
    head = (f"Cost at 12B, EXTRAPOLATED (not measured): {TOKENS_PER_GPU_SECOND:,.0f} tokens/s "
            "per GPU assumed; measured toy tokens-to-reach ratio per derived size "
            + ("n/a" if per_size_ratio is None else f"{ge}{per_size_ratio:.2f}"))
    return head + "\n\n" + format_table(
        ("budgets", "elastic (paper, const)", "elastic (x n/3)",
         "ModelOpt per size (paper 375B/size)", "ModelOpt per size (toy ratio)",
         "elastic GPU-h", "ModelOpt GPU-h (paper)", "ModelOpt GPU-h (toy ratio)",
         "saving (paper)", "saving (toy ratio)"), rows)


def plot(r: dict, work: Path, name: str) -> None:
    """Per derived size: mean validation loss ± sd over seeds against the tokens each method
    spent on that size (elastic: its one run for every size), with the spread as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    derived = r["derived"]
    fig, axs = plt.subplots(1, len(derived), figsize=(4.6 * len(derived), 4.2), dpi=120,
                            squeeze=False)
    for ax, n in zip(axs[0], derived):
        for k, (label, per_seed) in enumerate(r["curves"].items()):
            b = r["methods"][label]["budgets"][n]
            if label == "zero-shot":
                ax.errorbar([r["elastic_tokens"] / 100], [b["loss"][0]], yerr=[b["loss"][1]],
                            fmt="k^", capsize=3, label="zero-shot (0 tokens)")
                continue
            curves = [c.get(n) for c in per_seed if c.get(n)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            xs = [max(curves[0][i][0], 1) for i in range(length)]
            ys = [[c[i][1] for c in curves] for i in range(length)]
            mean = [statistics.mean(y) for y in ys]
            sd = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            ax.plot(xs, mean, "o-", markersize=2.5, color=f"C{k}",
                    label=f"{label} ({len(curves)} seeds)")
            ax.fill_between(xs, [m - d for m, d in zip(mean, sd)],
                            [m + d for m, d in zip(mean, sd)], color=f"C{k}", alpha=0.18)
        el = r["methods"]["elastic"]["budgets"][n]["loss"][0]
        ax.axhline(el, color="C0", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{n} (parent {r['parent_parameters']:,} parameters)")
        ax.set_xlabel("training tokens spent on this size (elastic: its one run)")
        ax.set_ylabel("validation loss (mean ± sd over seeds)")
        ax.grid(alpha=0.3, which="both")
    axs[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(work / f"{name}_cost.png")
    plt.close(fig)

    # final quality against tokens spent, one point per method and size (mean ± sd)
    fig, axs = plt.subplots(1, 2, figsize=(10, 4), dpi=120, squeeze=False)
    for k, (label, meth) in enumerate(r["methods"].items()):
        for j, n in enumerate(derived):
            b = meth["budgets"][n]
            x = max(b["tokens"] or 0, r["elastic_tokens"] / 100)
            for ax, key, scale in ((axs[0][0], "loss", 1.0), (axs[0][1], "accuracy", 100.0)):
                m, sd = b[key]
                if m is None:
                    continue
                ax.errorbar([x], [m * scale], yerr=[sd * scale], fmt="os^vDP"[j % 6],
                            color=f"C{k}", capsize=3,
                            label=label if j == 0 and key == "loss" else None)
    for ax, ylabel in ((axs[0][0], "final validation loss"), (axs[0][1], "answer accuracy %")):
        ax.set_xscale("log")
        ax.set_xlabel("tokens spent on the size (markers: " + ", ".join(
            f"{'os^vDP'[j % 6]} {n}" for j, n in enumerate(derived)) + ")")
        ax.set_ylabel(ylabel + " (mean ± sd)")
        ax.grid(alpha=0.3, which="both")
    axs[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(work / f"{name}_final.png")
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
    p.add_argument("--arms", type=lambda v: [x for x in v.split(",") if x],
                   default=list(ARMS), help="per-size arms besides elastic and zero-shot: "
                   + ",".join(ARMS))
    p.add_argument("--name", default="peers", help="output files NAME.json/.md/_cost.png")
    p.add_argument("--report-only", action="store_true", help="train nothing: tables and "
                   "plots from the stored runs (seeds with a missing run are left out)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra-sampling", type=lambda v: [x for x in v.split(",") if x],
                   default=[], help="also run the elastic arm with these budget_sampling "
                   "modes (rows 'elastic (MODE)'; the per-size arms follow the main run)")
    p.add_argument("--sampling", default=None, help="the elastic run's budget_sampling "
                   "(one, stratified, full_plus_one, all; default: the recipe's)")
    args = p.parse_args()
    if bad := set(args.arms) - set(ARMS):
        p.error(f"--arms: unknown {sorted(bad)}; choose from {','.join(ARMS)}")
    from nemo_elastic.config_elastic import BUDGET_SAMPLINGS

    for mode in ([args.sampling] if args.sampling else []) + args.extra_sampling:
        if mode not in BUDGET_SAMPLINGS:
            p.error(f"--sampling/--extra-sampling: unknown {mode!r}; choose from "
                    f"{','.join(BUDGET_SAMPLINGS)}")
    bc.REPORT_ONLY = args.report_only
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
