"""Does a trained family keep its promises?  Each budget inside its band, and the sizes in the
order of the targets.

A family is the list of rows `ElasticRouter.family_table()` writes into every elastic
checkpoint (`nemo_elastic.json` -> `family`).  Two properties are checked, from the rows alone
(no weights):

* **band**: the budget's achieved cost (its parameter fraction, its active-parameter fraction
  for active budgets, or its memory in GB for memory budgets) relative to its target,
  `achieved / target - 1`, lies in the band the budget loss treats as free:
  `(-tolerance, +tolerance]` (symmetric) or `(-tolerance, 0]` (ceiling).  The tolerance and
  band are the training's (`elastic.loss`), stored in each row; rows written before they were
  stored use the defaults (0.05, symmetric).
* **order**: a budget with a larger target is at least as large (same cost measure) as every
  budget with a smaller target.  A family out of order (60pct larger than 80pct) is not a
  nested family a user can deploy by size; `export` refuses it unless told otherwise.

`train`, `info`, the main job's report and `export` all use `check_family`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

GB = 1e9  # = nemo_elastic.cost_model.GB (kept here so this module needs no torch)
DEFAULT_TOLERANCE = 0.05
DEFAULT_BAND = "symmetric"


@dataclass
class BudgetCheck:
    name: str
    target: float
    achieved: float  # in the target's unit: a fraction of the parent, or GB
    deviation: float  # achieved / target - 1
    inside: bool
    tolerance: float
    band: str

    @property
    def band_text(self) -> str:
        """'yes (+1.2 %)' / 'NO (-9.3 %, band -5 %..+5 %)'."""
        upper = 0.0 if self.band == "ceiling" else self.tolerance
        dev = f"{100 * self.deviation:+.1f} %"
        if self.inside:
            return f"yes ({dev})"
        return f"NO ({dev}; band {-100 * self.tolerance:+g} %..{100 * upper:+g} %)"


@dataclass
class FamilyCheck:
    budgets: list[BudgetCheck] = field(default_factory=list)
    order_problems: list[str] = field(default_factory=list)  # 'b60 (77.7 %) > b80 (63.6 %)'

    @property
    def in_order(self) -> bool:
        return not self.order_problems

    @property
    def outside(self) -> list[BudgetCheck]:
        return [b for b in self.budgets if not b.inside]

    @property
    def ok(self) -> bool:
        return self.in_order and not self.outside

    def by_name(self) -> dict[str, BudgetCheck]:
        return {b.name: b for b in self.budgets}

    def order_text(self) -> str:
        if self.in_order:
            return "in order (a larger target is never smaller)"
        return "OUT OF ORDER: " + "; ".join(self.order_problems)

    def summary(self) -> str:
        """One line for logs: what is wrong, or that all is well."""
        parts = [f"{b.name} {b.band_text}" for b in self.outside]
        problems = []
        if parts:
            problems.append("outside their band: " + ", ".join(parts))
        if not self.in_order:
            problems.append("sizes " + self.order_text())
        return "; ".join(problems) if problems else \
            "every budget inside its band, sizes in the order of the targets"

    def as_dict(self) -> dict:
        return {"in_order": self.in_order, "order_problems": list(self.order_problems),
                "budgets": {b.name: {"achieved": b.achieved, "deviation": b.deviation,
                                     "inside_band": b.inside} for b in self.budgets}}


def achieved(row: dict) -> float:
    """A family row's cost in its target's unit."""
    if row.get("budget_type") == "memory":
        return float(row["memory_bytes"]) / GB
    if row.get("budget_type") == "active":  # MoE: a fraction of the parent's active parameters
        return float(row["active_fraction"])
    return float(row["parameter_fraction"])


def _fmt(row: dict, value: float) -> str:
    from nemo_elastic.units import readable_bytes

    return readable_bytes(value * GB) if row.get("budget_type") == "memory" else \
        f"{100 * value:.1f} %"


def _target(row: dict) -> str:
    """A target as the recipe reads: 0.75 (a fraction) or 310.00 kB (a memory budget)."""
    from nemo_elastic.units import readable_bytes

    target = float(row["target"])
    return readable_bytes(target * GB) if row.get("budget_type") == "memory" else f"{target:g}"


def check_family(rows: Sequence[dict], *, tolerance: Optional[float] = None,
                 band: Optional[str] = None) -> FamilyCheck:
    """Band and order of a family (rows as `ElasticRouter.family_table()`).  `tolerance` /
    `band` override the values stored in the rows."""
    result = FamilyCheck()
    for row in rows:
        tol = float(tolerance if tolerance is not None else row.get("tolerance", DEFAULT_TOLERANCE))
        kind = band or row.get("band", DEFAULT_BAND)
        value = achieved(row)
        dev = value / float(row["target"]) - 1.0
        upper = 0.0 if kind == "ceiling" else tol
        # the budget loss's own condition (router.budget_loss), with a rounding allowance
        inside = -tol - 1e-9 < dev <= upper + 1e-9
        result.budgets.append(BudgetCheck(row["name"], float(row["target"]), value, dev, inside,
                                          tol, kind))
    ordered = sorted(rows, key=lambda r: -float(r["target"]))
    for i, big in enumerate(ordered):
        for small in ordered[i + 1:]:
            if float(small["target"]) < float(big["target"]) and achieved(small) > achieved(big):
                result.order_problems.append(
                    f"{small['name']} (target {_target(small)}, {_fmt(small, achieved(small))}) "
                    f"is larger than {big['name']} (target {_target(big)}, "
                    f"{_fmt(big, achieved(big))})")
    return result
