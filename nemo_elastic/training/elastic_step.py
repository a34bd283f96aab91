"""The elastic distillation forward step: one budget per micro-batch, router, student, teacher.

`ElasticDistillationStep` is a Megatron `forward_step_func` (`step(data_iterator, model)`) that
owns everything the paper's step needs, so any loop that calls forward steps - ours, or a
Megatron-Bridge loop through a two-line adapter - runs it unchanged:

1. sample a budget for this micro-batch from the stage's probabilities, seeded by
   (seed, iteration, micro-batch): every tensor- and pipeline-parallel rank draws the same;
2. router(budget) -> soft sub-network (Gumbel noise seeded the same way);
3. student = the elastic model under that sub-network; teacher = the frozen parent (eval, no
   grad) or, in `trainable` mode, the full-budget student itself;
4. loss = forward KL(teacher || student) (vocabulary-parallel under TP) + lambda * budget loss
   [+ ce_weight * LM cross-entropy], token-mean over the micro-batch.

Pipeline parallelism: teacher and student run stage by stage side by side, so the tensor sent
between stages is both hidden states concatenated on the last dim, `[s, b, 2h]`
(`adjust_tensor_shapes` tells the schedule); each stage splits what it receives.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from nemo_elastic.distill import forward_kl

KD, BUDGET, CE, PER_BUDGET = "kd loss", "budget loss", "ce loss", "kd by budget"


def sample_budget(probs: Sequence[float], seed: int, iteration: int, micro_batch: int) -> int:
    """Index of the budget for (iteration, micro-batch): a pure function of its arguments."""
    rng = np.random.default_rng([seed, iteration, micro_batch])
    return int(rng.choice(len(probs), p=np.asarray(probs, dtype=np.float64)))


def _unwrap(model):
    """The module under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


class ElasticDistillationStep:
    """Forward-step functor.  Call `begin_iteration(iteration, budget_probs)` before each
    forward-backward pass; `budgets_drawn` lists the budget index of every micro-batch."""

    def __init__(self, *, router, teacher: Optional[torch.nn.Module], elastic_cfg,
                 tp_group=None) -> None:
        self.router, self.teacher, self.cfg = router, teacher, elastic_cfg
        self.trainable_teacher = elastic_cfg.distill.teacher_mode == "trainable"
        if not self.trainable_teacher and teacher is None:
            raise ValueError("teacher_mode=frozen needs a teacher model")
        self.tp_group = tp_group
        self.iteration, self.micro_batch = 0, 0
        n = len(router.names)
        self.budget_probs = [1.0 / n] * n
        self.budgets_drawn: list[int] = []

    # ------------------------------------------------------------------ schedule position
    def begin_iteration(self, iteration: int, budget_probs: Optional[Sequence[float]] = None) -> None:
        self.iteration, self.micro_batch = iteration, 0
        self.budgets_drawn = []
        if budget_probs is not None:
            self.budget_probs = list(budget_probs)

    def adjust_tensor_shapes(self, recv_shapes: list, send_shapes: list):
        """Pipeline p2p carries student and teacher hidden states side by side: [s, b, 2h]."""
        double = lambda shapes: [(*s[:-1], 2 * s[-1]) for s in shapes]  # noqa: E731
        return double(recv_shapes), double(send_shapes)

    # ------------------------------------------------------------------ the step
    def __call__(self, data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        student = _unwrap(model)
        device = next(student.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        micro = self.micro_batch
        self.micro_batch += 1
        index = sample_budget(self.budget_probs, self.cfg.seed, self.iteration, micro)
        self.budgets_drawn.append(index)
        routed = self.router(index, iteration=self.iteration, micro_batch=micro)

        teacher = student if self.trainable_teacher else self.teacher
        if not student.pre_process:  # split what the previous stage sent: [s, b, 2h]
            received = student.decoder.input_tensor
            h = received.shape[-1] // 2
            student.decoder.set_input_tensor(received[..., :h])
            teacher_input = received[..., h:]
        tokens, pos = batch["tokens"], batch["position_ids"]
        out = model(tokens, pos, None, subnetwork=routed.subnetwork)
        if not student.pre_process and not self.trainable_teacher:
            teacher.set_input_tensor(teacher_input)
        if self.trainable_teacher:
            if not student.pre_process:
                student.decoder.set_input_tensor(teacher_input)
            teacher_out = model(tokens, pos, None)  # the full-budget student, with grad
        else:
            with torch.no_grad():
                teacher_out = teacher(tokens, pos, None)
        if not student.post_process:
            return torch.cat([out, teacher_out], dim=-1), _not_last_stage
        return out, partial(self.loss, batch, teacher_out, routed, index)

    def loss(self, batch: dict, teacher_logits: torch.Tensor, routed, index: int,
             student_logits: torch.Tensor):
        """-> (sum over tokens, number of tokens, report); Megatron divides by the count.

        Logits are `[b, s, V]` (or the `[b, s, V/tp]` vocabulary shard under TP).
        """
        mask = batch["loss_mask"].float()
        n_tokens = mask.sum()
        kd = forward_kl(student_logits, teacher_logits, temperature=self.cfg.distill.temperature,
                        tp_group=self.tp_group)
        kd_sum = (kd * mask).sum()
        budget = self.router.budget_loss(routed, index)
        total = kd_sum + self.cfg.loss.weight * budget * n_tokens
        ce_sum = torch.zeros((), device=kd_sum.device)
        if self.cfg.distill.ce_weight > 0:
            # CE trains the student (frozen mode) or the full-budget teacher (trainable mode).
            logits = teacher_logits if self.trainable_teacher else student_logits
            ce_sum = (_cross_entropy(logits, batch["labels"], self.tp_group) * mask).sum()
            total = total + self.cfg.distill.ce_weight * ce_sum
        per_budget = torch.zeros(len(self.router.names), 2, dtype=torch.float64)
        per_budget[index, 0], per_budget[index, 1] = kd_sum.detach().double(), n_tokens.double()
        report = {KD: torch.stack([kd_sum.detach(), n_tokens]).double(),
                  BUDGET: torch.stack([budget.detach().double().reshape(()),
                                       torch.ones((), dtype=torch.float64)]),
                  CE: torch.stack([ce_sum.detach(), n_tokens]).double(),
                  PER_BUDGET: per_budget}
        return total, n_tokens.to(torch.int), report


def _not_last_stage(output):  # the schedule never calls a loss function off the last stage
    raise RuntimeError("loss function called on a non-last pipeline stage")


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token LM loss [b, s] from [b, s, V(/tp)] logits (vocabulary-parallel under TP)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    return vocab_parallel_cross_entropy(logits.float(), labels)


def reduce_reports(losses: list[dict], n_budgets: int, dp_group=None) -> dict:
    """Micro-batch reports (last pipeline stage) -> token-mean KD, mean budget loss, CE and the
    KD of each budget, summed over micro-batches and data-parallel ranks.  NaN elsewhere."""
    keys = (KD, BUDGET, CE)
    if not losses:
        return {"kd": math.nan, "budget_loss": math.nan, "ce": math.nan,
                "kd_by_budget": [math.nan] * n_budgets, "tokens_by_budget": [0.0] * n_budgets}
    flat = torch.cat([torch.stack([r[k] for r in losses]).sum(0) for k in keys]
                     + [torch.stack([r[PER_BUDGET] for r in losses]).sum(0).flatten()])
    if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
        torch.distributed.all_reduce(flat, group=dp_group)
    kd, budget, ce, per = flat[0:2], flat[2:4], flat[4:6], flat[6:].view(n_budgets, 2)
    ratio = lambda pair: (pair[0] / pair[1]).item() if pair[1] > 0 else math.nan  # noqa: E731
    return {"kd": ratio(kd), "budget_loss": ratio(budget), "ce": ratio(ce),
            "kd_by_budget": [ratio(row) for row in per],
            "tokens_by_budget": [row[1].item() for row in per]}
