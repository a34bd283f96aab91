"""`nemo-elastic train`: elastic distillation of every budget at once (paper-digest §5-§6).

Starts from a model-only checkpoint (`elastic.init_checkpoint`: imported, pretrained or - best -
`prepare`d, i.e. importance-reordered), distills every budget from a frozen teacher (by default
the same checkpoint) through `ElasticDistillationStep` in the shared `Trainer` loop, stage by
stage of the curriculum.  The router is replicated on every rank and has its own optimizer
(own LR, warmup and clipping: Megatron's optimizer would clip router and model gradients
jointly); its gradients are summed over pipeline stages and averaged over data-parallel replicas
inside the schedule's finalize hook, so every copy stays identical.

Every checkpoint's `nemo_elastic.json` holds the family: each budget's argmax sub-network with its
parameters and memory (`nemo-elastic info CKPT`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from nemo_elastic.checkpoint import CheckpointError, read_meta, resolve_checkpoint
from nemo_elastic.checkpoint.stored_config import model_differences
from nemo_elastic.config import Config, ConfigError, to_dict
from nemo_elastic.training.elastic.schedule import Curriculum, lr_factor
from nemo_elastic.training.elastic.step import ElasticDistillationStep, reduce_reports
from nemo_elastic.training.loop import Segment, Trainer

logger = logging.getLogger(__name__)


def elastic_output_dir(cfg: Config) -> Path:
    from nemo_elastic.run.run_dir import elastic_run_dir

    return elastic_run_dir(cfg).root


def _require_elastic(cfg: Config) -> None:
    if cfg.elastic is None:
        raise ConfigError("the recipe has no `elastic:` section; add one (see conf/tiny.yaml) "
                          "or pass e.g. elastic.iters=100 elastic.init_checkpoint=CKPT")
    if not cfg.elastic.init_checkpoint:
        raise ConfigError("elastic.init_checkpoint=None: give the parent checkpoint to start "
                          "from (imported, pretrained or prepared), e.g. "
                          "elastic.init_checkpoint=runs/tiny/prepared")


def parent_config(cfg: Config) -> tuple[Config, Path, Path]:
    """The recipe with the init checkpoint's model shape; (cfg, init path, teacher path).

    The parent's shape is the checkpoint's: the recipe's `model:` section may only add pipeline
    stage boundaries ('|') and a training dtype.
    """
    _require_elastic(cfg)
    init = resolve_checkpoint(cfg.elastic.init_checkpoint)
    try:
        meta = read_meta(init)
    except CheckpointError as err:
        raise ConfigError(f"elastic.init_checkpoint={cfg.elastic.init_checkpoint!r}: {err}") from None
    stored = meta["config"]["model"]
    ours = to_dict(cfg)["model"]
    # the pattern first, then the other fields by name
    differs = model_differences(stored, ours, ["hybrid_layer_pattern", *sorted(
        k for k in stored if k not in ("hybrid_layer_pattern", "params_dtype"))])
    if differs:
        logger.warning("model fields %s of the recipe differ from the init checkpoint %s; "
                       "training uses the checkpoint's (it is the parent)", differs, init)
        pattern = stored["hybrid_layer_pattern"]
        if cfg.parallel.pipeline_model_parallel_size > 1 and "|" not in pattern:
            raise ConfigError(f"model.hybrid_layer_pattern: with pipeline parallelism give the "
                              f"checkpoint's pattern {pattern!r} with '|' stage boundaries")
        merged = {**stored, "params_dtype": ours["params_dtype"]}
        if "hybrid_layer_pattern" not in differs:  # the same layers, maybe with stage bounds
            merged["hybrid_layer_pattern"] = ours["hybrid_layer_pattern"]
        from nemo_elastic.config import load_config

        cfg = load_config(base={**to_dict(cfg), "model": merged})
    teacher = resolve_checkpoint(cfg.elastic.distill.teacher) if cfg.elastic.distill.teacher \
        else init
    if cfg.elastic.distill.teacher_mode == "frozen":
        try:
            teacher_model = read_meta(teacher)["config"]["model"]
        except CheckpointError as err:
            raise ConfigError(f"elastic.distill.teacher={str(teacher)!r}: {err}") from None
        # the teacher is built at the parent's shape (build_teacher): another shape (e.g. an
        # extracted budget) would fail deep in the load with a tensor shape mismatch
        parent = to_dict(cfg)["model"]
        shapeless = ("params_dtype", "init_method_std", "max_sequence_length",
                     "mamba_chunk_size")  # no bearing on the weights' shapes
        differs = model_differences(teacher_model, parent,
                                    sorted((set(teacher_model) | set(parent)) - set(shapeless)))
        if differs:
            key = differs[0]
            a, b = teacher_model.get(key), parent.get(key)
            if key == "hybrid_layer_pattern" and a and b:  # as compared: no stage bounds
                a, b = a.replace("|", ""), b.replace("|", "")
            raise ConfigError(
                f"elastic.distill.teacher={str(teacher)!r}: holds model.{key}={a!r}, the "
                f"parent (elastic.init_checkpoint) model.{key}={b!r}; the frozen teacher "
                "has the parent's shape: pass the parent or a checkpoint of its shape (not "
                "an extracted budget), or leave elastic.distill.teacher unset")
    return cfg, init, teacher


def training_segments(cfg: Config, info) -> list[Segment]:
    """The curriculum's stages as the loop's segments: each with its own data (built on first
    use) and budget probabilities."""
    from nemo_elastic.data.loaders import build_training_data

    segments = []
    for stage in Curriculum.of(cfg).stages:
        stage_cfg = dataclasses.replace(cfg, data=stage.data_config(cfg.data))
        segments.append(Segment(
            name=stage.name, begin=stage.begin, end=stage.end, seq_length=stage.seq_length,
            micro_batch_size=stage.micro_batch_size,
            global_batch_size=stage.global_batch_size,
            data_factory=partial(build_training_data, stage_cfg, info),
            extra={"budget_probs": list(stage.budget_probs), "config": stage_cfg}))
    return segments


def build_router_optimizer(cfg: Config, router: torch.nn.Module):
    """The router's own AdamW (its LR, weight decay and the model's betas) and its LR schedule
    (`schedule.lr_factor`: the router's warmup, the model's decay style and min/max ratio)."""
    e, r = cfg.elastic, cfg.elastic.router
    optimizer = torch.optim.AdamW(router.parameters(), lr=r.lr, weight_decay=r.weight_decay,
                                  betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=r.warmup_iters, total=e.total_iters, style=e.lr_decay_style,
        min_ratio=e.min_lr / e.lr))
    return optimizer, scheduler


def sync_router_grads(router: torch.nn.Module) -> None:
    """Sum the router's gradients over pipeline stages (each stage's copy only sees its own
    layers' masks; the last stage adds the budget loss) and average them over data-parallel
    replicas (as DDP does for the model).  Tensor-parallel ranks already agree (see masks.shard)."""
    from megatron.core import parallel_state as ps

    params = [p for p in router.parameters()]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    pp = ps.get_pipeline_model_parallel_group()
    if torch.distributed.get_world_size(pp) > 1:
        torch.distributed.all_reduce(flat, group=pp)
    dp = ps.get_data_parallel_group()
    if torch.distributed.get_world_size(dp) > 1:
        torch.distributed.all_reduce(flat, group=dp)
        flat /= torch.distributed.get_world_size(dp)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def finalize_with_router(model_chunks, *args, router, **kwargs):
    """Megatron's `finalize_model_grads`, then the router's gradients (`sync_router_grads`)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model_chunks, *args, **kwargs)
    sync_router_grads(router)


class ElasticTrainer(Trainer):
    kind, desc = "elastic", "elastic"
    output_field, lr_field = "elastic.output_dir", "elastic.lr"
    # the record fields that must stay finite, in the order they are reported, with their names
    finite_fields = {"train_loss": "training loss", "kd": "distillation (KD) loss",
                     "budget_loss": "budget loss", "ce": "cross-entropy loss",
                     "val_loss": "validation loss", "grad_norm": "gradient norm",
                     "router_grad_norm": "router gradient norm"}
    finite_maps = {"kd_by_budget": "KD loss of budget", "val_by_budget": "validation loss of budget"}
    validation_keys = ("val_loss", "val_by_budget")

    def failure_context(self, record: dict) -> str:
        drawn = [n for n, k in (record.get("budgets_drawn") or {}).items() if k]
        return f", budget(s) {', '.join(drawn)}" if drawn else ""

    def __init__(self, *args, step: ElasticDistillationStep, router, router_optimizer,
                 router_scheduler, teacher, fingerprint: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint  # nemo_elastic.checkpoint.fingerprint: checked on resume
        # True when the caller (`train`) already guarded the run folder with this fingerprint
        # before building: the check is not repeated (nor its resume warnings logged twice)
        self.folder_guarded = False
        self.forward_step = step
        self.step, self.router, self.teacher = step, router, teacher
        self.router_optimizer, self.router_scheduler = router_optimizer, router_scheduler
        self.val: dict[str, float] = {}
        self.sizes: dict[str, float] = {}  # budget -> argmax sub-network's parameter fraction

    # ------------------------------------------------------------------ hooks
    def begin_iteration(self, iteration: int, seg: Segment) -> None:
        self.router_optimizer.zero_grad(set_to_none=True)
        self.step.begin_iteration(iteration, seg.extra["budget_probs"],
                                  num_micro_batches=self.num_microbatches(seg))

    def schedule_kwargs(self, seg: Segment) -> dict:
        if self.info.pp_size > 1:
            return {"adjust_tensor_shapes_fn": self.step.adjust_tensor_shapes}
        return {}

    def reduce_losses(self, losses: list[dict]) -> dict:
        from megatron.core import parallel_state as ps

        names = self.router.names
        r = reduce_reports(losses, len(names), ps.get_data_parallel_group())
        values = torch.tensor([r["kd"], r["budget_loss"], r["ce"], *r["kd_by_budget"]],
                              dtype=torch.float64)
        if self.info.pp_size > 1:  # only the last stage computed losses
            if not ps.is_pipeline_last_stage(ignore_virtual=True):
                values.zero_()
            torch.distributed.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        kd_by = {n: v for n, v in zip(names, values[3:].tolist()) if not math.isnan(v)}
        drawn = {n: 0 for n in names}
        for i in self.step.budgets_drawn:
            drawn[names[i]] += 1
        return {"train_loss": values[0].item(), "kd": values[0].item(),
                "budget_loss": values[1].item(), "ce": values[2].item(), "kd_by_budget": kd_by,
                "budgets_drawn": drawn}

    def after_step(self, iteration: int) -> dict:
        clip = self.cfg.elastic.router.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(self.router.parameters(), clip if clip > 0 else
                                              float("inf"))
        self.router_optimizer.step()
        self.router_scheduler.step()
        record = {"router_lr": self.router_optimizer.param_groups[0]["lr"],
                  "router_grad_norm": float(norm), "tau": self.router.temperature(iteration),
                  "logit_scale": self.router.logit_scale(iteration)}
        if iteration % self.log_interval == 0 or iteration == self.total_iters or not self.sizes:
            record["choices"] = choice_summary(self.router)
            self.sizes = {n: c["params_fraction"] for n, c in record["choices"].items()}
        return record

    def evaluate(self, iteration: int) -> dict:
        seg = self.segment_at(iteration - 1)
        self.val = evaluate_family(self, seg, self.router.family())
        return {"val_by_budget": dict(self.val)}

    def postfix(self, record: dict) -> dict:
        """Progress bar: KD loss of the budgets drawn this iteration, each budget's current
        argmax size (fraction of the parent's parameters) and the Gumbel temperature."""
        kd = record.get("kd_by_budget", {})
        return {"kd": " ".join(f"{n}:{kd[n]:.3f}" for n in self.router.names if n in kd),
                "size": "/".join(f"{self.sizes.get(n, math.nan):.2f}" for n in self.router.names),
                "tau": f"{record['tau']:.2f}"}

    def resume(self, resume: bool) -> int:
        """Before anything is loaded or written: the recipe must define the family and training
        of the run that wrote the folder's latest checkpoint (`fingerprint.check_resume`);
        with --no-resume a difference is a warning (a deliberate fresh start)."""
        from nemo_elastic.checkpoint.fingerprint import guard_run_folder

        if self.fingerprint is not None and not self.folder_guarded:
            guard_run_folder(self.ckpt_root, self.fingerprint, resume)
        return super().resume(resume)

    def extra_state(self) -> dict:
        return {"router_names": list(self.router.names), "router": self.router.state_dict(),
                "router_optimizer": self.router_optimizer.state_dict(),
                "router_scheduler": self.router_scheduler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "router" not in state:
            raise CheckpointError("the elastic checkpoint holds no router state (was it written "
                                  "by `pretrain`?); start the elastic run in an empty output dir")
        from nemo_elastic.checkpoint import LATEST_FILE
        from nemo_elastic.checkpoint.fingerprint import permute_router_state

        # rows are bound to budget names (older checkpoints: the recorded budget_names)
        saved_names = state.get("router_names") or self._saved_budget_names()
        if saved_names is not None:
            state = permute_router_state(state, saved_names, self.router.names, self.ckpt_path
                                         or self.ckpt_root / LATEST_FILE)
        try:
            self.router.load_state_dict(state["router"])
        except RuntimeError as err:  # a shape mismatch: the recipe's router is another one
            raise CheckpointError(
                f"the router in {str(self.ckpt_root)!r} does not match the recipe's "
                f"({str(err).splitlines()[-1].strip()}): elastic.budgets, axes, choices or "
                "router.hidden_dim changed; restore them, or start a new run in another "
                "elastic.output_dir") from None
        # The saved optimizer/scheduler state carries the hyperparameters of the run that wrote
        # it (torch restores param-group lr / weight_decay / betas and LambdaLR's base_lrs).  A
        # resume follows the recipe instead, as the model's optimizer does (Megatron-LM's
        # --override-opt_param-scheduler): the moments and the position in the schedule are
        # kept, elastic.router.lr / weight_decay apply from the resumed iteration on.  With an
        # unchanged recipe this recomputes exactly the saved values (bit-exact resume).
        configured = [{k: v for k, v in group.items() if k != "params"}
                      for group in self.router_optimizer.param_groups]
        base_lrs = list(self.router_scheduler.base_lrs)
        self.router_optimizer.load_state_dict(state["router_optimizer"])
        self.router_scheduler.load_state_dict(state["router_scheduler"])
        self.router_scheduler.base_lrs = base_lrs
        sched = self.router_scheduler
        for group, hyper, base, factor in zip(self.router_optimizer.param_groups, configured,
                                              base_lrs, sched.lr_lambdas):
            group.update(hyper)
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.router_optimizer.param_groups]

    def _saved_budget_names(self) -> Optional[list]:
        from nemo_elastic.checkpoint import latest_checkpoint

        latest = latest_checkpoint(self.ckpt_root)
        return read_meta(latest).get("budget_names") if latest is not None else None

    def extra_meta(self) -> dict:
        meta = {"family": self.router.family_table(), "budget_names": self.router.names,
                "budget_type": self.cfg.elastic.budget_type}
        if self.fingerprint is not None:
            meta["fingerprint"] = self.fingerprint
        return meta


def choice_summary(router) -> dict:
    """{budget: {axis: chosen size (mean over layers for heterogeneous axes), params_fraction}}
    of the router's argmax sub-networks (no noise)."""
    from nemo_elastic.cost_model import subnetwork_parameters

    out = {}
    with torch.no_grad():
        for i, name in enumerate(router.names):
            routed = router(i, noise=False)
            out[name] = {axis: float(sum(router.choices[axis][int(j)] for j in p.argmax(-1))
                                     / p.shape[0]) for axis, p in routed.probs.items()}
            out[name]["params_fraction"] = subnetwork_parameters(
                router.model, routed.subnetwork.hard()) / router.full_parameters
    return out


def evaluate_family(trainer: Trainer, seg: Segment, family: dict, model=None) -> dict:
    """Validation loss of each budget's sub-network (every rank gets the values)."""
    from nemo_elastic.training.evaluation import validation_loss

    model = model if model is not None else trainer.ddp
    n_micro = trainer.num_microbatches(seg)
    stage_cfg = seg.extra["config"]
    return {name: validation_loss(stage_cfg, model, seg.data, n_micro, trainer.info,
                                  subnetwork=subnet, all_stages=True)
            for name, subnet in family.items()}
