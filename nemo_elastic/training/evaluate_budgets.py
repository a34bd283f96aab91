"""`nemo-elastic eval --ckpt ELASTIC --all-budgets`: every trained budget of a family in one call.

Each budget is sliced out of the nested checkpoint (`extract --all`, into a temporary folder
that is removed afterwards) and evaluated as the plain model it exports to, on one protocol:
the checkpoint's config (+ overrides) - its data section, `train.eval_iters` global batches of
validation windows, `train.eval_accuracy_samples` greedy answers (`evaluate_models`).  The rows
carry each budget's target, parameters and band check (`family_check`), and the family's order.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from nemo_elastic.checkpoint import config_from_checkpoint, read_meta, resolve_checkpoint
from nemo_elastic.report.common import fmt_loss, fmt_pct, format_table
from nemo_elastic.units import memory_text, target_text

logger = logging.getLogger(__name__)


def evaluate_all_budgets(ckpt, overrides=(), *, speed: bool = False,
                         progress: bool = True) -> dict:
    """{checkpoint, iteration, protocol, family_check, budgets: [{name, target, parameters,
    inside_band, val_loss, answer_accuracy, tokens_per_s}]} of every budget of `ckpt`."""
    from nemo_elastic.export.family import extract_family, family_of
    from nemo_elastic.family_check import check_family
    from nemo_elastic.training.evaluate_checkpoint import evaluate_models, result_record

    path = resolve_checkpoint(ckpt)
    family_of(path)  # no family: one line before anything is loaded
    meta = read_meta(path)
    rows = meta["family"]
    cfg = config_from_checkpoint(path, overrides)
    check = check_family(rows)
    with tempfile.TemporaryDirectory(prefix=".eval-budgets-") as tmp:
        children = extract_family(path, Path(tmp) / "family")
        evaluated = {r["name"]: r for r in evaluate_models(cfg, children, speed=speed,
                                                           progress=progress)}
    budgets = []
    for row in rows:
        r, band = evaluated[row["name"]], check.by_name()[row["name"]]
        budgets.append({"name": row["name"], "target": row["target"],
                        "budget_type": row.get("budget_type", "params"),
                        "summary": row.get("summary"), "parameters": r["parameters"],
                        "parameter_fraction": row.get("parameter_fraction"),
                        "memory_bytes": row.get("memory_bytes"),
                        "memory_spec": row.get("memory_spec"),
                        "inside_band": band.inside, "deviation": band.deviation,
                        "val_loss": r["val_loss"], "answer_accuracy": r["answer_accuracy"],
                        "tokens_per_s": r["tokens_per_s"]})
    common = result_record(path, cfg, float("nan"), None, None, meta.get("iteration"), None)
    return {"checkpoint": str(path), "iteration": meta.get("iteration"),
            "uniform_loss": common["uniform_loss"], "protocol": common["protocol"],
            "family_check": check.as_dict(), "budgets": budgets}


def format_all_budgets(result: dict) -> str:
    p = result["protocol"]
    rows = []
    for b in result["budgets"]:
        band = "yes" if b["inside_band"] else "NO"
        rows.append((b["name"], target_text(b), f"{b['parameters']:,}" + memory_text(b),
                     f"{band} ({100 * b['deviation']:+.1f} %)", fmt_loss(b["val_loss"]),
                     fmt_pct(b["answer_accuracy"]),
                     "-" if b["tokens_per_s"] is None else f"{b['tokens_per_s']:.1f}"))
    order = "in order" if result["family_check"]["in_order"] else \
        "OUT OF ORDER: " + "; ".join(result["family_check"]["order_problems"])
    return (format_table(("budget", "target", "parameters", "inside band?", "val loss",
                          "answer acc.", "tokens/s"), rows)
            + f"\n(validation: the first {p['val_sequences']} sequences of {p['seq_length']} "
              f"tokens; uniform guess {fmt_loss(result['uniform_loss'])}; sizes {order})")


def check_all_budgets(result: dict) -> None:
    """A non-finite loss of any budget: one line (as `eval` of one checkpoint)."""
    from nemo_elastic.training.evaluate_checkpoint import check_result

    for b in result["budgets"]:
        check_result({"checkpoint": f"{result['checkpoint']} (budget {b['name']})",
                      "val_loss": b["val_loss"]})
