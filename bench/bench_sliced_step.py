"""Training cost that falls with the budget: sliced vs masked hard-mode steps, shared teacher.

Part 1 - step time at each budget relative to the full budget, masked vs sliced, in one run
(benchmark-sized model, one process, interleaved repetitions, median).  Budgets are uniform width
fractions of every axis (hidden, Mamba heads, attention heads, FFN); the router is rigged so that
budget i picks choice i with probability ~1 (its real hard-mode output: argmax prefix x p).
FLOP fractions are counted by torch's FlopCounterMode on the same calls (forward + backward),
so "f" is measured, not estimated:

  student       the elastic model's forward + backward at that budget (no teacher)
  elastic step  ElasticDistillationStep: router + student fwd/bwd + frozen teacher fwd + losses

Goal: a budget at fraction f of the full step's FLOPs takes at most f + 0.1 of its time (sliced).

Part 2 - stage 1 of the tiny recipe (conf/tiny.yaml: 150 iterations, 4 micro-batches of 4 x 96
tokens, budgets full/75pct/50pct uniform) from a prepared tiny parent, three ways: masked,
sliced, sliced + shared teacher (`elastic.budget_sampling=all`: one teacher forward, every budget
per micro-batch).  CPU time of each; then validation loss of every budget at EQUAL COMPUTE:
the sliced variants are rerun with the iteration count that fits the masked run's time
(schedules stretched to that length).  Time = CPU seconds of the training process (all its
threads), which a machine shared with other jobs does not inflate the way it inflates wall time;
wall seconds are printed next to them.

Run: `.venv/bin/python bench/bench_sliced_step.py [--prepared runs/tiny/prepared] [--skip-stage1]`
(without a prepared parent it pretrains one for 400 iterations and prepares it first).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
AXES = ("hidden", "mamba_heads", "attention_heads", "ffn")


def _rig(router) -> None:
    """Budget i -> on every axis the choice nearest FRACTIONS[i] of the largest, with
    probability ~1 (logit 50 vs 0 before tau, at the end of the run)."""
    with torch.no_grad():
        for axis, axis_router in router.routers.items():
            choices = router.choices[axis]
            first, last = axis_router.net[0], axis_router.net[2]
            first.weight.zero_()
            last.weight.zero_()
            for i, fraction in enumerate(FRACTIONS):
                best = min(range(len(choices)),
                           key=lambda c: (abs(choices[c] - fraction * choices[0]), c))
                first.weight[i, i] = 1.0
                last.weight[best, i] = 5.0  # x logit scale 10


def step_times(args) -> None:
    from _common import bench_config, median_times
    from torch.utils.flop_counter import FlopCounterMode

    from nemo_elastic import runtime
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.report.common import format_table
    from nemo_elastic.router import ElasticRouter
    from nemo_elastic.training.elastic.step import ElasticDistillationStep

    names = [f"{round(f * 100)}%" for f in FRACTIONS]
    cfg = bench_config(args.hidden, args.pattern, args.seq, elastic={
        "budgets": dict(zip(names, FRACTIONS)), "iters": 100, "warmup_iters": 0,
        "axes": list(AXES), "width_fractions": list(FRACTIONS), "router": {"mode": "hard"}})
    m = cfg.model
    with runtime.distributed(ParallelConfig()):
        student = build_elastic_model(cfg)
        teacher = build_elastic_model(cfg)
        teacher.load_state_dict(student.state_dict())
        teacher.eval().requires_grad_(False)
        router = ElasticRouter(m, cfg.elastic, total_iters=100)
        _rig(router)
        step = ElasticDistillationStep(router=router, teacher=teacher, elastic_cfg=cfg.elastic)
        tokens = torch.randint(0, m.vocab_size, (args.batch, args.seq))
        batch = {"tokens": tokens, "labels": tokens, "position_ids":
                 torch.arange(args.seq).expand_as(tokens), "loss_mask": torch.ones_like(tokens)}
        sizes = {}

        def elastic_step(execution: str, index: int):
            student.zero_grad(set_to_none=True)
            router.zero_grad(set_to_none=True)
            step.execution = execution
            step.begin_iteration(100, [float(i == index) for i in range(len(names))])
            out, loss_fn = step(iter([batch]), student)
            total, n_tokens, _ = loss_fn(out)
            (total / n_tokens).backward()

        def student_only(execution: str, index: int):
            student.zero_grad(set_to_none=True)
            routed = router(index, iteration=100, micro_batch=0)
            sizes[index] = routed.subnetwork.hard().describe(m)
            student(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                    subnetwork=routed.subnetwork, execution=execution).mean().backward()

        def flops(fn) -> int:
            with FlopCounterMode(display=False) as counter:
                fn()
            return counter.get_total_flops()

        cases, flop = {}, {}
        for kind, fn in (("student", student_only), ("elastic step", elastic_step)):
            for i in range(len(names)):
                flop[(kind, i)] = flops(lambda: fn("sliced", i))
                for execution in ("masked", "sliced"):
                    cases[(kind, i, execution)] = (lambda fn=fn, e=execution, i=i: fn(e, i))
        med = median_times(cases, args.reps)
        rows, worst = [], -1.0
        for kind in ("student", "elastic step"):
            for i, name in enumerate(names):
                f = flop[(kind, i)] / flop[(kind, 0)]
                t = {e: med[(kind, i, e)] / med[(kind, 0, e)] for e in ("masked", "sliced")}
                worst = max(worst, t["sliced"] - f) if kind == "elastic step" else worst
                rows.append((kind, name, f"{f:.2f}", f"{med[(kind, i, 'masked')] * 1e3:.0f}",
                             f"{t['masked']:.2f}", f"{med[(kind, i, 'sliced')] * 1e3:.0f}",
                             f"{t['sliced']:.2f}", "yes" if t["sliced"] <= f + 0.1 else "NO"))
    print(f"\n## Step time by budget (pattern {m.hybrid_layer_pattern}, hidden {args.hidden}, "
          f"batch {args.batch} x seq {args.seq}, {args.threads} threads, median of {args.reps})")
    for i, name in enumerate(names):
        print(f"  {name}: {sizes.get(i, '?')}")
    print(format_table(("what", "budget", "FLOPs f", "masked ms", "masked ratio", "sliced ms",
                        "sliced ratio", "sliced <= f+0.1"), rows))
    print(f"worst (sliced ratio - f) of the elastic step: {worst:+.3f}")


# ------------------------------------------------------------------------------ stage 1

def _prepared_parent(args, tmp: Path) -> Path:
    from nemo_elastic.checkpoint import CheckpointError, read_meta

    path = Path(args.prepared)
    try:
        read_meta(path)
        return path
    except CheckpointError:
        pass
    from nemo_elastic.config import load_config
    from nemo_elastic.importance.prepare import prepare
    from nemo_elastic.training.pretrain import pretrain

    print(f"{path} not found: pretraining a tiny parent for 400 iterations and preparing it")
    cfg = load_config("conf/tiny.yaml", [f"output_dir={tmp / 'parent'}", "train.iters=400",
                                         "train.eval_accuracy_samples=0"])
    result = pretrain(cfg, progress=False)
    return prepare(result.checkpoint, tmp / "prepared", num_batches=8, data_config=cfg.data,
                   progress=False)


def _time_aside(trainer, *methods) -> list:
    """Wrap the trainer's `methods`; the returned list accumulates their [wall, CPU] seconds."""
    spent = [0.0, 0.0]
    for name in methods:
        original = getattr(trainer, name)

        def timed(*a, _original=original, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return _original(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
                spent[1] += time.process_time() - c0
        setattr(trainer, name, timed)
    return spent


def _stage1(prepared: Path, out: Path, iters: int, execution: str, sampling: str):
    """Train stage 1 for `iters` iterations -> (CPU seconds spent training: the loop without
    its evaluations and checkpoint saves, {budget: validation loss}, {budget: parameter
    fraction}, wall seconds of the same).

    CPU time (all threads of this process) is the cost measure: on a machine shared with other
    jobs wall time also counts the time this process waited for a core (a run sharing the cores
    with a test suite took 4x the wall time of the same run alone), CPU time does not."""
    from nemo_elastic import runtime
    from nemo_elastic.config import load_config
    from nemo_elastic.training.elastic.trainer import (choice_summary, elastic_output_dir,
                                                       parent_config)
    from nemo_elastic.training.loop import StopRequest
    from nemo_elastic.training.train import build_trainer

    cfg = load_config("conf/tiny.yaml", [
        f"output_dir={out}", f"elastic.init_checkpoint={prepared}",
        f"elastic.curriculum=[{{name: stage1, seq_length: 96, global_batch_size: 16, "
        f"micro_batch_size: 4, iters: {iters}}}]",
        f"elastic.execution={execution}", f"elastic.budget_sampling={sampling}",
        f"elastic.eval_interval={10 * iters}", f"elastic.save_interval={10 * iters}",
        f"elastic.warmup_iters={min(10, iters - 1)}",
        f"elastic.router.warmup_iters={min(10, iters - 1)}",
        "train.eval_accuracy_samples=0"])
    cfg, init, teacher = parent_config(cfg)
    elastic_output_dir(cfg).mkdir(parents=True, exist_ok=True)
    with runtime.distributed(cfg.parallel) as info:
        trainer = build_trainer(cfg, init, teacher, info)
        for seg in trainer.segments:
            seg.data  # noqa: B018 - build the data before the clock starts
        aside = _time_aside(trainer, "evaluate", "save")
        t0, c0 = time.perf_counter(), time.process_time()
        with StopRequest() as stop:
            trainer.run(stop, resume=False)
        wall = time.perf_counter() - t0 - aside[0]
        cpu = time.process_time() - c0 - aside[1]
        val = trainer.history[-1]["val_by_budget"]
        sizes = {n: c["params_fraction"] for n, c in choice_summary(trainer.router).items()}
    return cpu, val, sizes, wall


def stage1(args) -> None:
    from nemo_elastic.report.common import format_table

    variants = (("masked", "masked", "one"), ("sliced", "sliced", "one"),
                ("sliced + shared teacher", "sliced", "all"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = _prepared_parent(args, tmp)
        runs = {}
        for k, (name, execution, sampling) in enumerate(variants):
            runs[name] = _stage1(prepared, tmp / f"run{k}", args.iters, execution, sampling)
            print(f"  {name}: {args.iters} iterations in {runs[name][0]:.1f} CPU s "
                  f"({runs[name][3]:.1f} s wall)", flush=True)
        budget_time = runs["masked"][0]
        equal = {"masked": (args.iters, *runs["masked"])}
        for k, (name, execution, sampling) in enumerate(variants[1:]):
            iters = max(1, round(args.iters * budget_time / runs[name][0]))
            equal[name] = (iters, *_stage1(prepared, tmp / f"eq{k}", iters, execution, sampling))
            print(f"  {name} at the masked run's CPU time: {iters} iterations in "
                  f"{equal[name][1]:.1f} CPU s", flush=True)
    budgets = list(runs["masked"][1])
    print(f"\n## Stage 1 of the tiny recipe ({args.iters} iterations, 4 x 4 x 96 tokens each)")
    print(format_table(("variant", "CPU s", "vs masked", "wall s",
                        *[f"val {b}" for b in budgets]),
                       [(name, f"{c:.1f}", f"{c / runs['masked'][0]:.2f}", f"{w:.1f}",
                         *[f"{val[b]:.4f}" for b in budgets])
                        for name, (c, val, _, w) in runs.items()]))
    print(f"\n## Validation loss at equal compute (the masked run's {budget_time:.0f} CPU s)")
    print(format_table(("variant", "iterations", "CPU s", *[f"val {b}" for b in budgets],
                        *[f"size {b}" for b in budgets]),
                       [(name, str(it), f"{c:.1f}", *[f"{val[b]:.4f}" for b in budgets],
                         *[f"{sizes[b]:.2f}" for b in budgets])
                        for name, (it, c, val, sizes, _) in equal.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pattern", default="M-M*-M-M-")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prepared", default="runs/tiny/prepared")
    parser.add_argument("--iters", type=int, default=150, help="stage-1 iterations")
    parser.add_argument("--skip-stage1", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_steps:
        step_times(args)
    if not args.skip_stage1:
        stage1(args)


if __name__ == "__main__":
    main()
