"""`nemo-elastic pretrain`: train the hybrid parent with Megatron-Core's schedules and optimizer.

One iteration = one global batch = `num_microbatches` micro-batches per data-parallel rank run by
`get_forward_backward_func()` (pipeline-aware), then `optimizer.step()` (Megatron Adam with grad
clipping) and the LR scheduler.  Checkpoints (model, optimizer, scheduler, RNG, data position)
are written every `train.save_interval` iterations, at the end, and when SIGTERM / Ctrl-C
arrives (Slurm preemption), so a rerun of the same command resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from nemo_elastic import runtime
from nemo_elastic.checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint,
                                    start_writer_processes)
from nemo_elastic.config import Config, ConfigError, to_dict
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.data.loaders import build_training_data
from nemo_elastic.training.evaluation import answer_accuracy_of, validation_loss
from nemo_elastic.training.optim import build_optimizer, build_scheduler
from nemo_elastic.report import format_table, plot_curves
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


class _StopRequest:
    """SIGTERM (Slurm preemption / scancel) or a first Ctrl-C -> checkpoint at the next iteration
    boundary, then exit; a second Ctrl-C aborts at once.  The decision is all-reduced so every
    rank stops at the same iteration even if only some received the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint at the end of this iteration "
                       "(Ctrl-C again aborts without saving)", name)
        self.requested = True

    def agreed(self) -> bool:
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _from_last_stage(value: float) -> float:
    """Make a last-pipeline-stage scalar known on every rank (for logging on rank 0)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
    t = torch.tensor([value if is_last else 0.0], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    return t.item()


def pretrain(cfg: Config, *, resume: bool = True, progress: bool = True) -> PretrainResult:
    """Train (or resume) the parent described by `cfg`; returns the run's summary."""
    with _StopRequest() as stop:
        return _pretrain(cfg, stop, resume=resume, progress=progress)


def _pretrain(cfg: Config, stop: _StopRequest, *, resume: bool, progress: bool) -> PretrainResult:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    info = runtime.initialize(cfg.parallel, cfg.train.seed)
    try:
        out_dir = Path(cfg.output_dir)
        ckpt_root = out_dir / "checkpoints"
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        model = build_hybrid_model(cfg)
        n_params = _global_param_count(model)
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False),
            model)
        # The schedule all-reduces data-parallel grads (and syncs pipeline-shared params) through
        # this hook; without it every data-parallel replica would step on its own gradients.
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.no_sync_func = ddp.no_sync
        optimizer = build_optimizer([ddp], cfg.train, model.config.params_dtype)
        scheduler = build_scheduler(optimizer, cfg.train)
        data = build_training_data(cfg, info)
        d, t = cfg.data, cfg.train
        per_step = d.micro_batch_size * info.dp_size
        if d.global_batch_size % per_step != 0:
            raise ConfigError(
                f"data.global_batch_size={d.global_batch_size} must be a multiple of "
                f"data.micro_batch_size x data-parallel size = {d.micro_batch_size} x {info.dp_size}")
        num_micro = d.global_batch_size // per_step

        start_iter = 0
        latest = latest_checkpoint(ckpt_root) if resume else None
        if latest is not None:
            state = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
            start_iter = int(state["iteration"])
            data.train_iter.load_state_dict(state["data_state"])
            logger.info("resuming from %s at iteration %d", latest, start_iter)
        if start_iter >= t.iters:
            logger.info("checkpoint %s already reached train.iters=%d; nothing to train", latest, t.iters)

        start_writer_processes()  # before any signal can arrive mid-training (see its docstring)
        fwd_bwd = get_forward_backward_func()
        dp_group = ps.get_data_parallel_group()
        logger.info("model: %s parameters, pattern %s; %d micro-batch(es) of %d per iteration, "
                    "data-parallel %d", f"{n_params:,}", cfg.model.hybrid_layer_pattern, num_micro,
                    d.micro_batch_size, info.dp_size)
        history: list[dict] = []
        train_loss = val_loss = float("nan")
        ckpt_path: Optional[Path] = latest
        started = time.perf_counter()
        bar = tqdm(total=t.iters, initial=start_iter, desc="pretrain", unit="it",
                   disable=not (progress and info.is_main), dynamic_ncols=True)
        logger.info("training iterations %d..%d", start_iter + 1, t.iters)
        it = start_iter
        try:
            while it < t.iters:
                ddp.train()
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
                losses = fwd_bwd(forward_step_func=lm_forward_step, data_iterator=data.train_iter,
                                 model=[ddp], num_microbatches=num_micro, seq_length=d.seq_length,
                                 micro_batch_size=d.micro_batch_size, forward_only=False)
                ok, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
                it += 1
                train_loss = _from_last_stage(reduce_lm_loss(losses, dp_group)[0])
                record = {"iteration": it, "train_loss": train_loss,
                          "lr": optimizer.param_groups[0]["lr"],
                          "grad_norm": float(grad_norm) if grad_norm is not None else None}
                if it % t.eval_interval == 0 or it == t.iters:
                    val_loss = _from_last_stage(validation_loss(cfg, ddp, data, num_micro, info))
                    record["val_loss"] = val_loss
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                if it % t.log_interval == 0 and info.is_main:
                    logger.debug("iter %d %s", it, record)
                stopping = stop.agreed()
                if it % t.save_interval == 0 or it == t.iters or stopping:
                    ckpt_path = save_checkpoint(
                        ckpt_root / f"iter_{it:07d}", cfg=cfg, model=model, optimizer=optimizer,
                        scheduler=scheduler, iteration=it,
                        data_state=data.train_iter.state_dict(), overwrite=True)
                if stopping:
                    raise SystemExit(f"stopped by a signal at iteration {it}; checkpoint "
                                     f"{ckpt_path}; rerun the same command to resume")
        finally:
            bar.close()
        wall = time.perf_counter() - started

        if math.isnan(val_loss) and start_iter < t.iters:
            val_loss = _from_last_stage(validation_loss(cfg, ddp, data, num_micro, info))
        accuracy = answer_accuracy_of(cfg, model, data, info)
        result = PretrainResult(
            iterations=t.iters, parameters=n_params, final_train_loss=train_loss,
            final_val_loss=val_loss, uniform_loss=math.log(data.tokenizer.vocab_size),
            answer_accuracy=None if accuracy is None else accuracy["accuracy"],
            wall_time_s=wall, checkpoint=str(ckpt_path) if ckpt_path else None, history=history)
        if info.is_main:
            _write_outputs(out_dir, result, accuracy)
        return result
    finally:
        runtime.destroy()


def _global_param_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model: summed over pipeline stages and tensor-parallel shards."""
    from megatron.core import parallel_state as ps

    local = 0
    for p in model.parameters():
        # Replicated (non-TP) params are counted once: only on TP rank 0.
        if getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0:
            local += p.numel()
    total = torch.tensor([local], dtype=torch.int64)
    group = ps.get_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    return int(total.item())


def _write_outputs(out_dir: Path, result: PretrainResult, accuracy: Optional[dict]) -> None:
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out_dir / "metrics.jsonl", "w") as f:
        for record in result.history:
            f.write(json.dumps(record) + "\n")
    if accuracy is not None:
        (out_dir / "answer_examples.json").write_text(json.dumps(accuracy["examples"], indent=2))
    if result.history:
        plot_curves(result.history, out_dir / "loss.png", uniform_loss=result.uniform_loss)
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
