"""`nemo-elastic train`: build student, teacher and router, run the curriculum, report the family.

Outputs in `elastic.output_dir` (default `<output_dir>/elastic`): `checkpoints/` (resumable;
each one's `nemo_elastic.json` holds the family), `metrics.jsonl`, TensorBoard event files in
`tb/`, `kd_by_budget.png` (per-budget KD loss), `router_choices.png` (each budget's chosen
sizes over training), `family.json` and a closing table: per budget the chosen sizes,
parameters vs. target, validation loss and answer accuracy before (zero-shot prefix of the
initial weights) and after training, and the teacher's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional


from nemo_elastic import runtime
from nemo_elastic.checkpoint import load_checkpoint, write_text_durably
from nemo_elastic.config import Config, ConfigError
from nemo_elastic.checkpoint.fingerprint import guard_run_folder, run_fingerprint, \
    training_fingerprint
from nemo_elastic.report.common import json_safe
from nemo_elastic.run.run_dir import RunDir, elastic_run_dir
from nemo_elastic.training.elastic.step import ElasticDistillationStep
from nemo_elastic.training.elastic.trainer import (ElasticTrainer, build_router_optimizer,
                                                   elastic_output_dir, evaluate_family,
                                                   finalize_with_router, parent_config,
                                                   training_segments)
from nemo_elastic.training.loop import StopRequest, global_param_count, write_metrics

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    iterations: int
    wall_time_s: float
    checkpoint: Optional[str]
    family: list[dict] = field(default_factory=list)  # one row per budget (see _family_rows)
    teacher: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def train(cfg: Config, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """Elastic distillation of `cfg.elastic`'s budgets; resumes from its output dir."""
    cfg, init, teacher_ckpt = parent_config(cfg)
    with StopRequest() as stop:
        return _train(cfg, init, teacher_ckpt, stop, resume=resume, progress=progress)


def build_teacher(cfg: Config, ckpt: Path):
    """The frozen parent at this rank's TP/PP layout: eval mode, no gradients."""
    from nemo_elastic.elastic.specs import build_elastic_model

    teacher = build_elastic_model(cfg)
    load_checkpoint(ckpt, model=teacher, restore_rng=False)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _train(cfg: Config, init: Path, teacher_ckpt: Path, stop: StopRequest, *, resume: bool,
           progress: bool) -> TrainResult:
    from nemo_elastic.run.paths import check_output_location

    run = elastic_run_dir(cfg)
    out_dir = run.root
    # the run never writes into, over or under the checkpoints it reads
    check_output_location(out_dir, "elastic.output_dir", {
        "elastic.init_checkpoint": init, "elastic.distill.teacher": teacher_ckpt},
        error=ConfigError, run_folder=True)
    info = runtime.initialize(cfg.parallel, cfg.elastic.seed)
    try:
        with run.lock():
            # before the model is built: a changed recipe is refused at once, nothing written
            fingerprint = run_fingerprint(
                cfg, init, None if cfg.elastic.distill.teacher_mode == "trainable" else
                teacher_ckpt)
            guard_run_folder(run.checkpoints, fingerprint, resume)
            resuming = resume and run.latest() is not None
            trainer = build_trainer(cfg, init, teacher_ckpt, info, load_init=not resuming,
                                    progress=progress)
            trainer.folder_guarded = trainer.fingerprint == fingerprint  # checked just above
            trainer.run(stop, resume=resume)  # writes config.json once the resume checks pass
            result = _closing_report(cfg, trainer, init, teacher_ckpt, info)
            if info.is_main:
                if trainer.trained or not run.has_summary():
                    _write_outputs(trainer.out_dir, result, trainer)
                else:
                    logger.info("elastic run %s had finished: its outputs are left unchanged",
                                out_dir)
            return result
    finally:
        runtime.destroy()


def build_trainer(cfg: Config, init: Path, teacher_ckpt: Path, info, *, load_init: bool = True,
                  progress: bool = False) -> ElasticTrainer:
    """Student (from `init` unless resuming), frozen teacher, router, both optimizers, stages.
    A fresh start (`load_init`) with `router.init: zero_shot` also sets the router's offsets
    (`router_prior`).  Needs an initialized runtime; `cfg` as returned by `parent_config`."""
    from megatron.core import parallel_state as ps

    from nemo_elastic.checkpoint import read_meta
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.router import ElasticRouter
    from nemo_elastic.training.optim import build_optimizer, build_scheduler, wrap_ddp

    e = cfg.elastic
    for warning in e.warmup_warnings():
        logger.warning("%s", warning)
    student = build_elastic_model(cfg, **cfg.train.recompute_overrides())
    if load_init:  # before the optimizer: bf16 optimizers copy the weights at build time
        load_checkpoint(init, model=student, restore_rng=False)
    device = next(student.parameters()).device
    router = ElasticRouter(cfg.model, e, total_iters=e.total_iters,
                           layer_ranking=read_meta(init).get("layer_ranking")).to(device)
    teacher = None if e.distill.teacher_mode == "trainable" else build_teacher(cfg, teacher_ckpt)
    ddp = wrap_ddp(student, finalize_grads=partial(finalize_with_router, router=router))
    optimizer = build_optimizer([ddp], e.optimizer(cfg.train), student.config.params_dtype)
    scheduler = build_scheduler(optimizer, e.optimizer(cfg.train))
    router_opt, router_sched = build_router_optimizer(cfg, router)
    step = ElasticDistillationStep(router=router, teacher=teacher, elastic_cfg=e,
                                   tp_group=ps.get_tensor_model_parallel_group())
    trainer = ElasticTrainer(
        cfg, info, out_dir=elastic_output_dir(cfg), model=student, ddp=ddp, optimizer=optimizer,
        scheduler=scheduler, segments=training_segments(cfg, info), log_interval=e.log_interval,
        eval_interval=e.eval_interval, save_interval=e.save_interval, progress=progress,
        step=step, router=router, router_optimizer=router_opt, router_scheduler=router_sched,
        teacher=teacher, fingerprint=training_fingerprint(
            cfg, router, init, None if teacher is None else teacher_ckpt))
    if load_init and router.has_prior:  # router.init=zero_shot; a resume restores the offsets
        from nemo_elastic.elastic.router_prior import apply_zero_shot_prior

        first = trainer.segments[0]
        apply_zero_shot_prior(first.extra["config"], router, ddp, first.data, info)
    from nemo_elastic.units import target_text

    logger.info("elastic distillation: %s parameters, budgets %s, stages %s, teacher %s",
                f"{global_param_count(student):,}", ", ".join(
                    f"{n} {target_text({'target': t, 'budget_type': e.budget_type})}"
                    for n, t in e.budgets.items()),
                [(s.name, s.end - s.begin) for s in trainer.segments],
                "trainable (full budget)" if teacher is None else teacher_ckpt)
    return trainer


def _closing_report(cfg: Config, trainer: ElasticTrainer, init: Path, teacher_ckpt: Path,
                    info) -> TrainResult:
    """Per budget: sizes, parameters vs target, val loss / accuracy before and after."""
    from nemo_elastic.training.evaluation import answer_accuracy_of, validation_loss

    router = trainer.router
    seg = trainer.segments[-1]
    family = router.family()
    table = {row["name"]: row for row in router.family_table()}
    # The loop's last evaluation (it always evaluates the final iteration) already scored this
    # family on this stage; recompute only when this invocation trained nothing.
    after = trainer.val or evaluate_family(trainer, seg, family)
    # "before": the same sub-networks on the initial weights (zero-shot prefixes).
    initial = trainer.teacher if trainer.teacher is not None and Path(teacher_ckpt) == Path(init) \
        else build_teacher(cfg, init)
    before = evaluate_family(trainer, seg, family, model=initial)
    stage_cfg = seg.extra["config"]
    n_micro = trainer.num_microbatches(seg)
    teacher_model = trainer.teacher if trainer.teacher is not None else trainer.ddp
    teacher = {"val_loss": validation_loss(stage_cfg, teacher_model, seg.data, n_micro, info,
                                           all_stages=True)}
    acc = lambda model, subnet=None: _accuracy(answer_accuracy_of(  # noqa: E731
        stage_cfg, model, seg.data, info, subnetwork=subnet))
    teacher["answer_accuracy"] = acc(teacher_model)
    rows = []
    for name, subnet in family.items():
        row = dict(table[name])
        row.update(val_loss_before=before[name], val_loss_after=after[name],
                   answer_accuracy_before=acc(initial, subnet),
                   answer_accuracy_after=acc(trainer.model, subnet))
        rows.append(row)
    return TrainResult(iterations=trainer.total_iters, wall_time_s=trainer.wall_time_s,
                       checkpoint=str(trainer.ckpt_path) if trainer.ckpt_path else None,
                       family=rows, teacher=teacher, history=trainer.history)


def _accuracy(result: Optional[dict]) -> Optional[float]:
    return None if result is None else result["accuracy"]


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _write_outputs(out_dir: Path, result: TrainResult, trainer: ElasticTrainer) -> None:
    from nemo_elastic.report.common import format_table
    from nemo_elastic.report.elastic import plot_kd_by_budget, plot_router_choices, \
        write_tensorboard

    history = trainer.full_history  # across resumes
    write_metrics(out_dir, history)
    from nemo_elastic.family_check import check_family

    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    summary["family_check"] = check_family(result.family).as_dict()
    run = RunDir(out_dir)
    run.write_summary(json.dumps(json_safe(summary), indent=2))
    write_text_durably(run.family_file, json.dumps(json_safe(result.family), indent=2))
    if history:
        names = trainer.router.names
        plot_kd_by_budget(history, names, out_dir / "kd_by_budget.png")
        plot_router_choices(history, names, trainer.router, out_dir / "router_choices.png")
        write_tensorboard(history, out_dir / "tb")
    from nemo_elastic.family_check import check_family
    from nemo_elastic.units import size_text, target_text

    check = check_family(result.family)
    bands = check.by_name()
    rows = [(r["name"], target_text(r), r["summary"],
             size_text(r),
             bands[r["name"]].band_text,
             f"{r['val_loss_before']:.4f}", f"{r['val_loss_after']:.4f}",
             _pct(r["answer_accuracy_before"]), _pct(r["answer_accuracy_after"]))
            for r in result.family]
    rows.append(("teacher", "-", "parent", "-", "-", "-", f"{result.teacher['val_loss']:.4f}",
                 "-", _pct(result.teacher["answer_accuracy"])))
    header = ("budget", "target", "sizes", "parameters", "inside band?", "val loss before",
              "val loss after", "acc before", "acc after")
    seg = trainer.segments[-1]
    n_val = trainer.cfg.train.eval_iters * seg.global_batch_size
    protocol = (f"before = zero-shot prefix of the initial weights; after = elastic "
                f"distillation; validation on the last stage's data: the first {n_val} windows "
                f"of {seg.seq_length} tokens, so losses differ slightly from the pretraining's "
                "and the main job's report")
    logger.info("elastic family (%s), %.1f s\n%s", protocol, result.wall_time_s,
                format_table(header, rows))
    write_train_report(out_dir, result, check, header, rows, protocol)
    if check.ok:
        logger.info("family: %s", check.summary())
    else:  # the last thing a user reads: the family does not keep its promise
        logger.warning("family: %s (see %s)", check.summary(), out_dir / "report.md")


def write_train_report(out_dir: Path, result: TrainResult, check, header, rows,
                       protocol: str) -> Path:
    """`report.md` of `nemo-elastic train`: the family table, band and order."""
    from nemo_elastic.report.common import markdown_table

    lines = [f"# Elastic training report: `{out_dir}`", "",
             f"{result.iterations} iterations, {result.wall_time_s:.1f} s; checkpoint "
             f"`{result.checkpoint}`.", "",
             markdown_table(header, rows), "", f"({protocol}.)", "",
             f"**Bands**: {check.summary()}.", "",
             f"**Order**: sizes {check.order_text()}.", "",
             "Figures: `kd_by_budget.png` (per-budget distillation loss), `router_choices.png` "
             "(each budget's chosen sizes over training).", ""]
    path = out_dir / "report.md"
    write_text_durably(path, "\n".join(lines))
    return path
