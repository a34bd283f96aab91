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

`elastic.execution`: a hard-mode student (the router's argmax prefix x its probability) runs on
the kept slices of the weights (`sliced`, so a smaller budget costs less) or masked (`masked`,
the reference; same loss and gradients).  Soft mode is always masked.

`elastic.budget_sampling=stratified`: still one budget per micro-batch, but the iteration's
micro-batches are spread over the budgets by systematic sampling (one uniform offset per
iteration, seeded by (seed, iteration), positions (k + u) / n on the probabilities' cumulative
sum, assigned to micro-batches in a seeded random order): each iteration trains every budget its
share of the micro-batches (+-1), where `one` leaves an iteration without the full budget in
(2/3)^4 = 20 % of stage 1's iterations.  Same cost as `one`; it needs the iteration's number of
micro-batches (`begin_iteration(..., num_micro_batches=)`).

`elastic.budget_sampling=full_plus_one`: the full budget on every micro-batch (weight p_full)
plus one other budget drawn from the rest (weight 1 - p_full), after one teacher forward: two
students, the same expectation as `one`.

`elastic.budget_sampling=all`: instead of drawing one budget, every budget with a non-zero
probability runs on the micro-batch after ONE teacher forward (K students, a BigNAS-style
sandwich); the loss is sum_b p_b * loss_b, so its expectation equals the one-budget step's and
Megatron's token normalization (sum, tokens) is unchanged.  All K students share the
micro-batch's Gumbel noise.

Pipeline parallelism: teacher and students run stage by stage side by side, so the tensor sent
between stages is the K student hidden states and the teacher's concatenated on the last dim,
`[s, b, (K+1)h]` (`adjust_tensor_shapes` tells the schedule); each stage splits what it receives.
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


def stratified_budgets(probs: Sequence[float], seed: int, iteration: int,
                       n_micro: int) -> list[int]:
    """Budget index of each of the iteration's `n_micro` micro-batches by systematic sampling:
    budget i gets floor or ceil of n_micro * p_i of them; each micro-batch is marginally drawn
    with the probabilities.  A pure function of its arguments (every rank agrees)."""
    p = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng([seed, iteration, 2**31 - 1])  # not a micro-batch's stream
    positions = (np.arange(n_micro) + rng.random()) / n_micro
    edges = np.cumsum(p / p.sum())
    edges[-1] = 1.0 + 1e-12  # rounding: the last position always falls inside
    picks = np.searchsorted(edges, positions, side="right")
    return [int(picks[j]) for j in rng.permutation(n_micro)]


def full_and_rest(sampling: str, probs: Sequence[float],
                  full: Optional[int]) -> Optional[tuple[int, list[float]]]:
    """full_plus_one: (index of the full budget, the other budgets' renormalized
    probabilities), or None when there is nothing to pair (another sampling, no full budget,
    or a stage that never or only draws it): then one budget per micro-batch."""
    if sampling != "full_plus_one" or full is None or not 0 < probs[full] < 1:
        return None
    rest = [0.0 if i == full else float(p) for i, p in enumerate(probs)]
    return full, [p / sum(rest) for p in rest]


def expected_student_runs(sampling: str, probs: Sequence[float],
                          full: Optional[int]) -> list[float]:
    """How many times, in expectation, budget i runs as a student on one micro-batch (the
    forward+backward passes the step pays for; not the loss weights): `all` runs every budget
    with p_i > 0 once, `full_plus_one` the full budget always plus one drawn from the rest,
    `one` and `stratified` one budget drawn with p.  Benchmarks cost a run with this."""
    if sampling == "all":
        return [1.0 if p > 0 else 0.0 for p in probs]
    pair = full_and_rest(sampling, probs, full)
    if pair is not None:
        full, rest = pair
        return [1.0 if i == full else r for i, r in enumerate(rest)]
    total = float(sum(probs))
    return [float(p) / total for p in probs]


def _unwrap(model):
    """The module under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


class ElasticDistillationStep:
    """Forward-step functor.  Call `begin_iteration(iteration, budget_probs)` before each
    forward-backward pass; `budgets_drawn` lists the budget index of every student of every
    micro-batch (one per micro-batch unless `budget_sampling=all`)."""

    def __init__(self, *, router, teacher: Optional[torch.nn.Module], elastic_cfg,
                 tp_group=None) -> None:
        self.router, self.teacher, self.cfg = router, teacher, elastic_cfg
        self.trainable_teacher = elastic_cfg.distill.teacher_mode == "trainable"
        if not self.trainable_teacher and teacher is None:
            raise ValueError("teacher_mode=frozen needs a teacher model")
        self.tp_group = tp_group
        # Soft (mixture) masks are non-zero beyond the kept prefix: they always run masked.
        self.execution = elastic_cfg.execution if router.mode == "scaled" else "masked"
        self.sampling = elastic_cfg.budget_sampling
        self.iteration, self.micro_batch = 0, 0
        n = len(router.names)
        self.budget_probs = [1.0 / n] * n
        self.budgets_drawn: list[int] = []
        self.strata: Optional[list[int]] = None  # stratified: this iteration's budgets

    # ------------------------------------------------------------------ schedule position
    def begin_iteration(self, iteration: int, budget_probs: Optional[Sequence[float]] = None,
                        num_micro_batches: Optional[int] = None) -> None:
        self.iteration, self.micro_batch = iteration, 0
        self.budgets_drawn = []
        if budget_probs is not None:
            self.budget_probs = list(budget_probs)
        self.strata = None
        if self.sampling == "stratified" and num_micro_batches:  # without the count: `one`
            self.strata = stratified_budgets(self.budget_probs, self.cfg.seed, iteration,
                                             num_micro_batches)

    def adjust_tensor_shapes(self, recv_shapes: list, send_shapes: list):
        """Pipeline p2p carries the K student hidden states and the teacher's side by side:
        [s, b, (K+1)h]."""
        k = self.students_per_micro_batch + 1
        widen = lambda shapes: [(*s[:-1], k * s[-1]) for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    @property
    def students_per_micro_batch(self) -> int:
        if self.sampling == "all":
            return sum(p > 0 for p in self.budget_probs)
        return 2 if self._full_and_rest() is not None else 1

    def _full_and_rest(self) -> Optional[tuple[int, list[float]]]:
        """`full_and_rest` for this stage's probabilities and the router's full budget."""
        full = next((i for i in range(len(self.router.names)) if self.router.is_full(i)), None)
        return full_and_rest(self.sampling, self.budget_probs, full)

    def students(self, micro: int) -> list[tuple[int, float]]:
        """(budget index, loss weight) of each student of micro-batch `micro`."""
        if self.sampling == "all":
            return [(i, float(p)) for i, p in enumerate(self.budget_probs) if p > 0]
        if self.strata is not None and micro < len(self.strata):
            return [(self.strata[micro], 1.0)]
        pair = self._full_and_rest()
        if pair is not None:
            full, rest = pair
            p_full = float(self.budget_probs[full])
            return [(full, p_full),
                    (sample_budget(rest, self.cfg.seed, self.iteration, micro), 1.0 - p_full)]
        return [(sample_budget(self.budget_probs, self.cfg.seed, self.iteration, micro), 1.0)]

    # ------------------------------------------------------------------ the step
    def __call__(self, data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        student = _unwrap(model)
        device = next(student.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        micro = self.micro_batch
        self.micro_batch += 1
        students = self.students(micro)
        self.budgets_drawn.extend(index for index, _ in students)
        routed = [self.router(index, iteration=self.iteration, micro_batch=micro)
                  for index, _ in students]

        teacher = student if self.trainable_teacher else self.teacher
        if not student.pre_process:  # split what the previous stage sent: [s, b, (K+1)h]
            received = student.decoder.input_tensor
            parts = received.chunk(len(students) + 1, dim=-1)
            student_inputs, teacher_input = parts[:-1], parts[-1]
        tokens, pos = batch["tokens"], batch["position_ids"]
        outs = []
        for k, r in enumerate(routed):
            if not student.pre_process:
                student.decoder.set_input_tensor(student_inputs[k])
            outs.append(model(tokens, pos, None, subnetwork=r.subnetwork,
                              execution=self.execution))
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
            return torch.cat([*outs, teacher_out], dim=-1), _not_last_stage
        out = outs[0] if len(outs) == 1 else torch.stack(outs)  # [K, b, s, V(/tp)]
        return out, partial(self.loss, batch, teacher_out, routed, students)

    def loss(self, batch: dict, teacher_logits: torch.Tensor, routed: list,
             students: list[tuple[int, float]], student_logits: torch.Tensor):
        """-> (sum over tokens, number of tokens, report); Megatron divides by the count.

        Logits are `[b, s, V]` (or the `[b, s, V/tp]` vocabulary shard under TP); with K > 1
        students `[K, b, s, V]`, and the sum is weighted by each student's probability.
        """
        mask = batch["loss_mask"].float()
        n_tokens = mask.sum()
        logits_of = [student_logits] if len(students) == 1 else list(student_logits.unbind(0))
        ce_weight = self.cfg.distill.ce_weight
        total = kd_total = budget_total = ce_total = torch.zeros((), device=mask.device)
        per_budget = torch.zeros(len(self.router.names), 2, dtype=torch.float64)
        for (index, weight), r, logits in zip(students, routed, logits_of):
            kd = forward_kl(logits, teacher_logits, temperature=self.cfg.distill.temperature,
                            tp_group=self.tp_group)
            kd_sum = (kd * mask).sum()
            budget = self.router.budget_loss(r, index)
            term = kd_sum + self.cfg.loss.weight * budget * n_tokens
            if ce_weight > 0 and not self.trainable_teacher:  # CE trains the student
                ce_sum = (_cross_entropy(logits, batch["labels"], self.tp_group) * mask).sum()
                term = term + ce_weight * ce_sum
                ce_total = ce_total + weight * ce_sum.detach()
            total = total + weight * term
            kd_total = kd_total + weight * kd_sum.detach()
            budget_total = budget_total + weight * budget.detach().reshape(())
            per_budget[index, 0], per_budget[index, 1] = kd_sum.detach().double(), n_tokens.double()
        if ce_weight > 0 and self.trainable_teacher:  # CE trains the full-budget teacher, once
            ce_total = (_cross_entropy(teacher_logits, batch["labels"], self.tp_group) * mask).sum()
            total = total + ce_weight * ce_total
            ce_total = ce_total.detach()
        report = {KD: torch.stack([kd_total, n_tokens]).double(),
                  BUDGET: torch.stack([budget_total.double(),
                                       torch.ones((), dtype=torch.float64)]),
                  CE: torch.stack([ce_total, n_tokens]).double(),
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
    # Megatron's vocab-parallel CE works in place on its input (subtracts the max, exponentiates
    # into it); these logits also feed the KD loss, and with K students they are views of one
    # stacked tensor: give it a copy (`.float()` of bf16 logits already is one)
    x = logits.float()
    return vocab_parallel_cross_entropy(x.clone() if x is logits else x, labels)


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
