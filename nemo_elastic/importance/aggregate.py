"""How per-token activation magnitudes become one score per channel / neuron / head.

An activation score is built in two reductions (Minitron, paper-digest §4.1 and §9.2):

1. over the sequence of each sample: ``sequence`` in {sum, mean, l2} of ``a[t, b, ...]``
   (``a >= 0``: |LN(X)|, |fc1 output|, |x|, per-head L2 of the attention output);
2. over all calibration samples (micro-batches and data-parallel ranks): ``batch`` in
   {sum, mean, l2}.

The paper writes plain sums (Eqs. 1-4); Minitron found sequence=mean, batch=l2 best, which is our
default.  Accumulators keep the *raw* running sum (of values, or of squares for l2) in float64
plus the sample count, so the data-parallel all-reduce is an exact sum and the final reduction
(mean: divide, l2: sqrt) runs once afterwards, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from nemo_elastic.errors import ConfigError

REDUCTIONS = ("sum", "mean", "l2")
# float64 running sums: thousands of samples of O(1) magnitudes stay exact enough that TP/DP
# layouts agree to ~1e-12, far inside any ranking tie-break.
ACC_DTYPE = torch.float64


@dataclass(frozen=True, kw_only=True)
class Aggregation:
    """sequence: reduction over the tokens of one sample; batch: over all samples."""

    sequence: str = "mean"
    batch: str = "l2"

    def __post_init__(self) -> None:
        for name in ("sequence", "batch"):
            value = getattr(self, name)
            if value not in REDUCTIONS:
                raise ConfigError(f"aggregation.{name}={value!r}: must be one of {REDUCTIONS} "
                                 "(e.g. Aggregation(sequence='mean', batch='l2'))")

    @classmethod
    def parse(cls, value: Union["Aggregation", str, dict, None]) -> "Aggregation":
        """An Aggregation, a dict, None (default), 'SEQ/BATCH' (e.g. 'mean/l2') or one name for
        both reductions (e.g. 'sum' = the paper's plain sums)."""
        if value is None:
            return cls()
        if isinstance(value, Aggregation):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, str):
            parts = value.split("/")
            if len(parts) == 1:
                return cls(sequence=parts[0], batch=parts[0])
            if len(parts) == 2:
                return cls(sequence=parts[0], batch=parts[1])
        raise ConfigError(f"aggregation={value!r}: use 'SEQUENCE/BATCH' with each one of "
                         f"{REDUCTIONS} (e.g. 'mean/l2'), a single name for both, or an Aggregation")

    def to_dict(self) -> dict[str, str]:
        return {"sequence": self.sequence, "batch": self.batch}

    # ------------------------------------------------------------------ the two reductions
    def per_sample(self, a: torch.Tensor) -> torch.Tensor:
        """a [s, b, ...] (Megatron's sequence-first layout), a >= 0 -> [b, ...] float64."""
        a = a.detach().to(ACC_DTYPE)
        if self.sequence == "sum":
            return a.sum(dim=0)
        if self.sequence == "mean":
            return a.mean(dim=0)
        return a.square().sum(dim=0).sqrt()

    def accumulate(self, total: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
        """Add one micro-batch's activations a [s, b, ...] to the running raw sum [...]."""
        v = self.per_sample(a)
        part = (v.square() if self.batch == "l2" else v).sum(dim=0)
        return part if total is None else total + part

    def finalize(self, total: torch.Tensor, samples: int) -> torch.Tensor:
        """Raw running sum (already reduced over data-parallel ranks) -> score (float64)."""
        if self.batch == "mean":
            return total / max(samples, 1)
        if self.batch == "l2":
            return total.sqrt()
        return total
