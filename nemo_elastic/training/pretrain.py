"""`nemo-elastic pretrain`: train the hybrid parent with Megatron-Core's schedules and optimizer.

The loop is `training.loop.Trainer` (shared with the elastic `train`) with the plain LM forward
step: token-mean cross-entropy.  Checkpoints (model, optimizer, scheduler, RNG, data position)
are written every `train.save_interval` iterations, at the end, and when SIGTERM / Ctrl-C
arrives (Slurm preemption), so a rerun of the same command resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from nemo_elastic import runtime
from nemo_elastic.checkpoint import write_text_durably
from nemo_elastic.run.run_dir import RunDir, pretrain_run_dir
from nemo_elastic.config import Config, ConfigError
from nemo_elastic.data.loaders import build_training_data
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.report.common import format_table, json_safe, plot_curves, strict_json
from nemo_elastic.training.evaluation import answer_accuracy_of, to_every_stage, validation_loss
from nemo_elastic.training.loop import Segment, StopRequest, Trainer, global_param_count, \
    write_metrics
from nemo_elastic.training.optim import build_optimizer, build_scheduler, wrap_ddp
from nemo_elastic.training.step import lm_forward_step, reduce_lm_loss

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    iterations: int
    parameters: int
    final_train_loss: float
    final_val_loss: float
    uniform_loss: float
    answer_accuracy: Optional[float]
    wall_time_s: float
    checkpoint: Optional[str]
    history: list[dict] = field(default_factory=list)


class PretrainTrainer(Trainer):
    kind, desc = "pretrain", "pretrain"
    forward_step = staticmethod(lm_forward_step)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = math.nan

    def reduce_losses(self, losses: list[dict]) -> dict:
        from megatron.core import parallel_state as ps

        return {"train_loss": to_every_stage(reduce_lm_loss(losses, ps.get_data_parallel_group())[0])}

    def evaluate(self, iteration: int) -> dict:
        seg = self.segments[0]
        self.val_loss = to_every_stage(validation_loss(
            self.cfg, self.ddp, seg.data, self.num_microbatches(seg), self.info))
        return {"val_loss": self.val_loss}

    def postfix(self, record: dict) -> dict:
        # No validation figure until the first evaluation has produced one (not 'nan').
        shown = {"loss": f"{record['train_loss']:.3f}"}
        if not math.isnan(self.val_loss):
            shown["val"] = f"{self.val_loss:.3f}"
        return shown


def pretrain(cfg: Config, *, resume: bool = True, progress: bool = True) -> PretrainResult:
    """Train (or resume) the parent described by `cfg`; returns the run's summary."""
    from nemo_elastic.config_elastic import WARMUP_WARN_SHARE

    t = cfg.train
    if t.warmup_iters > WARMUP_WARN_SHARE * t.iters:
        logger.warning("train.warmup_iters=%d is %.0f%% of the run's %d iterations; lower it",
                       t.warmup_iters, 100 * t.warmup_iters / t.iters, t.iters)
    with StopRequest() as stop:
        return _pretrain(cfg, stop, resume=resume, progress=progress)


def _pretrain(cfg: Config, stop: StopRequest, *, resume: bool, progress: bool) -> PretrainResult:
    from nemo_elastic.run.paths import check_output_location

    run = pretrain_run_dir(cfg)
    # a run folder, not a checkpoint or an exported model (whose files it would mix with or
    # replace) nor inside one; as `train` checks its elastic.output_dir
    check_output_location(run.root, "output_dir", error=ConfigError, run_folder=True)
    info = runtime.initialize(cfg.parallel, cfg.train.seed)
    try:
        with run.lock():
            return _pretrain_locked(cfg, info, run, stop, resume=resume, progress=progress)
    finally:
        runtime.destroy()


def _pretrain_locked(cfg: Config, info, run: RunDir, stop: StopRequest, *, resume: bool,
                     progress: bool) -> PretrainResult:
    out_dir = run.root
    model = build_hybrid_model(cfg, **cfg.train.recompute_overrides())
    n_params = global_param_count(model)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer([ddp], cfg.train.optimizer, model.config.params_dtype)
    scheduler = build_scheduler(optimizer, cfg.train.optimizer)
    d, t = cfg.data, cfg.train
    data = build_training_data(cfg, info)
    segment = Segment(name="pretrain", begin=0, end=t.iters, seq_length=d.seq_length,
                      micro_batch_size=d.micro_batch_size, global_batch_size=d.global_batch_size,
                      data_factory=lambda: data)
    trainer = PretrainTrainer(cfg, info, out_dir=out_dir, model=model, ddp=ddp,
                              optimizer=optimizer, scheduler=scheduler, segments=[segment],
                              log_interval=t.log_interval, eval_interval=t.eval_interval,
                              save_interval=t.save_interval, progress=progress)
    logger.info("model: %s parameters, pattern %s; %d micro-batch(es) of %d per iteration, "
                "data-parallel %d", f"{n_params:,}", cfg.model.hybrid_layer_pattern,
                trainer.num_microbatches(segment), d.micro_batch_size, info.dp_size)
    trainer.run(stop, resume=resume)
    history = trainer.history
    # A rerun of a finished run trains nothing: its figures come from the earlier records
    # and a fresh validation pass, never NaN (which is not even valid JSON).
    done = trainer.full_history
    train_loss = done[-1]["train_loss"] if done else math.nan
    val_loss = trainer.val_loss
    if math.isnan(val_loss):
        val_loss = trainer.evaluate(t.iters)["val_loss"]
    accuracy = answer_accuracy_of(cfg, model, data, info)
    ckpt_path = trainer.ckpt_path
    result = PretrainResult(
        iterations=t.iters, parameters=n_params, final_train_loss=train_loss,
        final_val_loss=val_loss, uniform_loss=math.log(data.tokenizer.vocab_size),
        answer_accuracy=None if accuracy is None else accuracy["accuracy"],
        wall_time_s=trainer.wall_time_s, checkpoint=str(ckpt_path) if ckpt_path else None,
        history=history)
    if info.is_main:
        if trainer.trained or not run.has_summary():
            _write_outputs(run, result, accuracy, trainer.full_history)
        else:
            logger.info("run %s had finished: its outputs are left unchanged (validation "
                        "loss %.4f)", out_dir, val_loss)
    return result


def _write_outputs(run: RunDir, result: PretrainResult, accuracy: Optional[dict],
                   full_history: list[dict]) -> None:
    out_dir = run.root
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    run.write_summary(json.dumps(json_safe(summary), indent=2))
    write_metrics(out_dir, full_history)
    if accuracy is not None:
        write_text_durably(run.answer_examples,
                           strict_json(accuracy["examples"], indent=2))
    if full_history:
        plot_curves(full_history, run.loss_plot, uniform_loss=result.uniform_loss)
    rows = [
        ("parameters", f"{result.parameters:,}"),
        ("iterations", str(result.iterations)),
        ("train loss (last)", f"{result.final_train_loss:.4f}"),
        ("validation loss", f"{result.final_val_loss:.4f}"),
        ("uniform-guess loss", f"{result.uniform_loss:.4f}"),
        ("answer accuracy (greedy)",
         "n/a" if result.answer_accuracy is None else f"{result.answer_accuracy:.1%}"),
        ("wall time", f"{result.wall_time_s:.1f} s"),
        ("checkpoint", result.checkpoint or "-"),
    ]
    logger.info("pretrain summary\n%s", format_table(("metric", "value"), rows))
