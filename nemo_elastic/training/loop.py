"""The one training loop shared by `pretrain` and the elastic `train`.

One iteration = one global batch = `num_microbatches` micro-batches per data-parallel rank run by
Megatron's `get_forward_backward_func()` (pipeline-aware) with a *pluggable forward step*, then
the Megatron optimizer step (Adam, grad clipping), the LR scheduler, and `after_step` (e.g. a
subclass's second optimizer).  A run is a list of `Segment`s (curriculum stages: each with its
own sequence length, batch and data iterator); pretraining is one segment.

Checkpoints (model, optimizer, scheduler, RNG, data position, and whatever `extra_state()` adds,
e.g. a subclass's extra modules and optimizers) are written every `save_interval` iterations, at every segment
end, at the end, and when SIGTERM / Ctrl-C arrives (Slurm preemption), so a rerun resumes exactly
where it stopped — also across a stage transition.

Run outputs are never lost: each iteration's record is appended to `metrics.jsonl` as it is made
(the records after the resume point, which the resumed run redoes, are dropped at resume), so
the file always holds the whole history; `config.json` is written only once the resume checks
passed, and a rerun of a finished run writes nothing.  A non-finite loss stops the run before
any checkpoint is written (the last good one stays `latest`); `train.keep_checkpoints` keeps only
the newest N checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from nemo_elastic.checkpoint import checkpoint_meta, latest_checkpoint, load_parts, \
    prune_checkpoints, save_parts, start_writer_processes, write_text_durably
from nemo_elastic.config import Config, ConfigError, to_dict
from nemo_elastic.errors import TrainingDiverged
from nemo_elastic.report.common import strict_json
from nemo_elastic.run.run_dir import METRICS_FILE, RunDir

logger = logging.getLogger(__name__)


class StopRequest:
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


def global_param_count(model: torch.nn.Module) -> int:
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


@dataclass
class Segment:
    """A stretch of iterations with one data shape: iterations (begin, end] of the run."""

    name: str
    begin: int
    end: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    data_factory: Callable[[], Any]  # -> TrainingData for this segment (built on first use)
    extra: dict = field(default_factory=dict)  # e.g. budget probabilities
    _data: Any = None

    @property
    def data(self):
        if self._data is None:
            self._data = self.data_factory()
        return self._data


class Trainer:
    """Subclasses set `forward_step` and may override the hooks; `run()` is the loop."""

    kind = "pretrain"  # checkpoint kind
    desc = "train"  # progress-bar label
    output_field, lr_field = "output_dir", "train.lr"  # recipe fields named in errors
    # the record fields that must stay finite, in the order they are reported, with their
    # names; and the fields holding {name: value} maps of them (subclasses add theirs)
    finite_fields = {"train_loss": "training loss", "val_loss": "validation loss",
                     "grad_norm": "gradient norm"}
    finite_maps: dict = {}
    validation_keys = ("val_loss",)  # record fields measured on the current weights

    def __init__(self, cfg: Config, info, *, out_dir: Path, model, ddp, optimizer, scheduler,
                 segments: list[Segment], log_interval: int, eval_interval: int,
                 save_interval: int, progress: bool = True) -> None:
        self.cfg, self.info, self.out_dir = cfg, info, Path(out_dir)
        self.model, self.ddp, self.optimizer, self.scheduler = model, ddp, optimizer, scheduler
        self.segments = segments
        self.total_iters = segments[-1].end
        self.log_interval, self.eval_interval, self.save_interval = \
            log_interval, eval_interval, save_interval
        self.progress = progress
        self.run_dir = RunDir(self.out_dir)
        self.ckpt_root = self.run_dir.checkpoints
        self.history: list[dict] = []  # this invocation's iterations
        self.earlier: list[dict] = []  # metrics of earlier invocations, up to the resume point
        self.ckpt_path: Optional[Path] = None
        self.wall_time_s = 0.0
        self.trained = False  # whether this invocation ran any iteration
        self.keep_checkpoints = cfg.train.keep_checkpoints
        self._metrics_file = None
        for seg in segments:
            per_step = seg.micro_batch_size * info.dp_size
            if seg.global_batch_size % per_step:
                raise ConfigError(
                    f"global batch {seg.global_batch_size} of stage {seg.name!r} must be a "
                    f"multiple of micro batch x data-parallel size = {seg.micro_batch_size} x "
                    f"{info.dp_size}")

    # ------------------------------------------------------------------ hooks
    forward_step: Callable

    def num_microbatches(self, seg: Segment) -> int:
        return seg.global_batch_size // (seg.micro_batch_size * self.info.dp_size)

    def begin_iteration(self, iteration: int, seg: Segment) -> None:
        """Before the schedule runs iteration `iteration` (1-based) of segment `seg`."""

    def schedule_kwargs(self, seg: Segment) -> dict:
        """Extra keyword arguments of Megatron's forward-backward function."""
        return {}

    def after_step(self, iteration: int) -> dict:
        """After the model's optimizer step; returns metrics to record."""
        return {}

    def reduce_losses(self, losses: list[dict]) -> dict:
        raise NotImplementedError

    def evaluate(self, iteration: int) -> dict:
        """Periodic validation; returns metrics (known on every rank)."""
        return {}

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record.get('train_loss', math.nan):.3f}"}

    def extra_state(self) -> dict:
        """Picklable state saved with each checkpoint (common, replicated on every rank)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def extra_meta(self) -> dict:
        return {}

    def failure_context(self, record: dict) -> str:
        """More words on where a non-finite value came from (appended after the stage)."""
        return ""

    # ------------------------------------------------------------------ checkpoints
    def segment_at(self, iteration: int) -> Segment:
        """The segment that runs iteration `iteration + 1` (the last one once finished)."""
        for seg in self.segments:
            if iteration < seg.end:
                return seg
        return self.segments[-1]

    def resume(self, resume: bool) -> int:
        latest = latest_checkpoint(self.ckpt_root) if resume else None
        if latest is None:
            return 0
        from nemo_elastic.checkpoint import check_model_matches, config_from_checkpoint
        from nemo_elastic.checkpoint.stored_config import check_data_matches

        stored = config_from_checkpoint(latest)
        check_model_matches(latest, stored, self.cfg,
                            fix="a run resumes with the model it started with: drop the override "
                            "or start a new run (--no-resume, or another output_dir)")
        check_data_matches(latest, stored, self.cfg, fix="a run resumes on the data it started "
                           f"with: restore the old value, or start a new run (--no-resume, or "
                           f"another {self.output_field})")
        state = load_parts(latest, {"model": self.model, "optimizer": self.optimizer,
                                    "scheduler": self.scheduler})
        it = int(state.get("iteration", 0))
        seg = self.segment_at(it)
        # A checkpoint at a segment's last iteration holds that segment's data position; the
        # next segment starts its own data from the beginning.
        if state.get("data_state") is not None and state.get("segment", seg.name) == seg.name:
            seg.data.train_iter.load_state_dict(state["data_state"])
        self.load_extra_state(state.get("extra") or {})
        self.earlier = read_metrics(self.out_dir, up_to=it)
        self.ckpt_path = latest
        logger.info("resuming from %s at iteration %d (stage %s)", latest, it, seg.name)
        return it

    def save(self, iteration: int) -> Path:
        seg = self.segment_at(iteration - 1)
        # the trainer's stateful parts; the store knows none of them by kind
        parts = {"model": self.model, "optimizer": self.optimizer, "iteration": iteration,
                 "data_state": seg.data.train_iter, "scheduler": self.scheduler,
                 "segment": seg.name, "extra": self.extra_state()}
        self.ckpt_path = save_parts(
            self.run_dir.checkpoint(iteration), parts, checkpoint_meta(
                self.cfg, kind=self.kind, iteration=iteration,
                has_optimizer=self.optimizer is not None,
                extra={"segment": seg.name, **self.extra_meta()}), overwrite=True,
            field_name=self.output_field)
        if self._metrics_file is not None:  # the records up to this checkpoint are on disk
            os.fsync(self._metrics_file.fileno())
        prune_checkpoints(self.ckpt_root, self.keep_checkpoints)
        return self.ckpt_path

    # ------------------------------------------------------------------ run outputs
    def _open_outputs(self) -> None:
        """After the resume checks passed: the run's config and the metrics so far (rank 0)."""
        if not self.info.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)  # a Trainer built outside a job too
        self.run_dir.write_config(json.dumps(to_dict(self.cfg), indent=2))
        write_metrics(self.out_dir, self.earlier)  # drops the records the resumed run redoes
        self._metrics_file = open(self.out_dir / METRICS_FILE, "a")

    def _append_metrics(self, record: dict) -> None:
        if self._metrics_file is not None:
            self._metrics_file.write(strict_json(record) + "\n")
            self._metrics_file.flush()

    def weights_loss(self, seg: Segment) -> float:
        """Loss of the current weights on the first validation micro-batch (whole model): the
        check, before a checkpoint is written, that the optimizer step left usable weights (a
        huge step leaves finite weights whose loss is not)."""
        import dataclasses

        from nemo_elastic.training.evaluation import validation_loss

        cfg = seg.extra.get("config", self.cfg)
        one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_iters=1))
        return validation_loss(one, self.ddp, seg.data, 1, self.info, all_stages=True)

    def _check_finite(self, record: dict, seg: Segment) -> None:
        """A non-finite loss (training, validation, a subclass's per-name ones) or gradient norm stops the
        run here, before any checkpoint of these weights."""
        bad = non_finite(record, self.finite_fields, self.finite_maps)
        if not bad:
            return
        what, value = bad
        self._diverged(f"{what} is {value} at iteration {record['iteration']} (stage "
                       f"{seg.name!r}{self.failure_context(record)})")

    def _diverged(self, what: str) -> None:
        lr = self.lr_field
        if self.ckpt_path:
            fix = (f"the last good checkpoint {str(self.ckpt_path)!r} is kept; lower {lr} (and "
                   "its min_lr) and rerun the same command to resume from it with the new rate")
        else:
            fix = f"no checkpoint was written; lower {lr} (and its min_lr) and rerun"
        raise TrainingDiverged(f"{what}; {fix}")

    def _check_weights_before_save(self, record: dict, seg: Segment) -> None:
        if any(key in record for key in self.validation_keys):  # measured on these weights
            return
        loss = self.weights_loss(seg)
        if not math.isfinite(loss):
            self._diverged(f"the weights after iteration {record['iteration']} (stage "
                           f"{seg.name!r}) give a validation loss of {loss}")

    # ------------------------------------------------------------------ the loop
    def run(self, stop: StopRequest, *, resume: bool = True) -> int:
        """Train from the latest checkpoint (or scratch) to the end; returns the start iteration."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        start = self.resume(resume)
        if start >= self.total_iters:
            logger.info("checkpoint %s already reached %d iterations; nothing to train, "
                        "outputs left as they are", self.ckpt_path, self.total_iters)
            return start
        start_writer_processes()  # in-process checkpoint writer (see its docstring)
        self._open_outputs()
        self.trained = True
        fwd_bwd = get_forward_backward_func()
        started = time.perf_counter()
        bar = tqdm(total=self.total_iters, initial=start, desc=self.desc, unit="it",
                   disable=not (self.progress and self.info.is_main), dynamic_ncols=True)
        logger.info("training iterations %d..%d", start + 1, self.total_iters)
        it = start
        try:
            while it < self.total_iters:
                seg = self.segment_at(it)
                if it == seg.begin and it > start:
                    logger.info("stage %r begins at iteration %d: sequence length %d, global "
                                "batch %d", seg.name, it + 1, seg.seq_length, seg.global_batch_size)
                self.ddp.train()
                self.ddp.zero_grad_buffer()
                self.optimizer.zero_grad()
                self.begin_iteration(it + 1, seg)
                losses = fwd_bwd(
                    forward_step_func=self.forward_step, data_iterator=seg.data.train_iter,
                    model=[self.ddp], num_microbatches=self.num_microbatches(seg),
                    seq_length=seg.seq_length, micro_batch_size=seg.micro_batch_size,
                    forward_only=False, **self.schedule_kwargs(seg))
                ok, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(increment=1)
                it += 1
                record = {"iteration": it, "stage": seg.name, **self.reduce_losses(losses),
                          "lr": self.optimizer.param_groups[0]["lr"],
                          "grad_norm": float(grad_norm) if grad_norm is not None else None}
                self._check_finite(record, seg)
                record.update(self.after_step(it))
                if it % self.eval_interval == 0 or it == self.total_iters or it == seg.end:
                    record.update(self.evaluate(it))
                    self._check_finite(record, seg)
                self.history.append(record)
                self._append_metrics(record)
                bar.update(1)
                bar.set_postfix(self.postfix(record), refresh=False)
                if it % self.log_interval == 0:
                    logger.debug("iter %d %s", it, record)
                stopping = stop.agreed()
                if it % self.save_interval == 0 or it == self.total_iters or it == seg.end \
                        or stopping:
                    self._check_weights_before_save(record, seg)
                    self.save(it)
                if stopping:
                    raise SystemExit(f"stopped by a signal at iteration {it}; checkpoint "
                                     f"{self.ckpt_path}; rerun the same command to resume")
        finally:
            bar.close()
            self.wall_time_s = time.perf_counter() - started
            if self._metrics_file is not None:
                self._metrics_file.close()
                self._metrics_file = None
        return start


    @property
    def full_history(self) -> list[dict]:
        """Every iteration of the run so far, across resumes (what plots and files show)."""
        return self.earlier + self.history


def read_metrics(out_dir: Path, *, up_to: int) -> list[dict]:
    """Records of an earlier invocation's `metrics.jsonl` up to iteration `up_to` (those after
    it belong to iterations that the resumed run does again).  Missing file: none."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if isinstance(record, dict) and record.get("iteration", up_to + 1) <= up_to:
            records.append(record)
    return records


def write_metrics(out_dir: Path, history: list[dict], name: str = METRICS_FILE) -> None:
    """Rewrite the metrics file atomically (fsync'd) from the whole history."""
    write_text_durably(Path(out_dir) / name, "".join(
        strict_json(record) + "\n" for record in history))


def non_finite(record: dict, fields: dict, maps: dict) -> Optional[tuple[str, float]]:
    """(name, value) of the first non-finite value of an iteration record: `fields` maps
    record keys to names, `maps` keys of {name: value} entries (e.g. one loss per budget) to
    the words before the name."""
    for key, name in fields.items():
        value = record.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return name, value
    for key, label in maps.items():
        for name, value in (record.get(key) or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"{label} {name!r}", value
    return None
