"""`runs/<name>/report.md` of the main job (`nemo-elastic run`) and its two plots.

Every number in the report comes from the JSON files next to it (`evaluation.json`,
`training_curve.json`, `zero_shot.json`, `pipeline.json`) through the formatters of
`nemo_elastic.report.common` (`fmt_loss`, `fmt_pct`), so the report and the JSON always agree.

* `report_budgets.png`: validation loss and answer accuracy against parameters - the exported
  elastic family, the same sub-networks zero-shot (prepared parent, no training), the uniform
  prefixes, the teacher;
* `report_training.png`: each budget's validation loss and answer accuracy against the
  training tokens of the elastic run (every saved checkpoint, each with the router's choice at
  that point; a vertical line at each curriculum stage change).

Figures made by earlier stages are linked: the router's choices over training
(`elastic/router_choices.png`), layer importance (`prepared/layer_importance.png`), per-budget
KD (`elastic/kd_by_budget.png`), the parent's pretraining loss (`loss.png`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nemo_elastic.config import Config
from nemo_elastic.report.common import fmt_loss, fmt_pct, markdown_table
from nemo_elastic.units import memory_text, target_text

REPORT = "report.md"
BUDGETS_PNG = "report_budgets.png"
TRAINING_PNG = "report_training.png"
LINKED = (("the router's choice for each budget over training", "elastic/router_choices.png"),
          ("layer importance (prepare)", "prepared/layer_importance.png"),
          ("per-budget distillation loss during training", "elastic/kd_by_budget.png"),
          ("zero-shot prefixes, original vs importance order", "zero_shot.png"),
          ("pretraining loss of the parent", "loss.png"))


def fmt_speed(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def fmt_params(params: int, full: int) -> str:
    return f"{params:,} ({fmt_pct(params / full)})"


def family_rows(evaluation: dict, family: list[dict], before: dict[str, dict]) -> list[tuple]:
    """The family table of the report: one row per budget, then the teacher."""
    models = {m["name"]: m for m in evaluation["models"]}
    teacher = models["teacher"]
    full = teacher["parameters"]
    from nemo_elastic.family_check import check_family

    bands = check_family(family).by_name()
    rows = []
    for row in family:
        m, b = models[row["name"]], before.get(row["name"], {})
        rows.append((row["name"], target_text(row), row["summary"],
                     fmt_params(m["parameters"], full) + _active_text(row) + memory_text(row),
                     bands[row["name"]].band_text,
                     fmt_loss(m["val_loss"]),
                     fmt_pct(m["answer_accuracy"]), fmt_speed(m["tokens_per_s"]),
                     fmt_loss(b.get("val_loss")), fmt_pct(b.get("answer_accuracy"))))
    parent_active = {"active_parameters": round(family[0]["active_parameters"]
                                                / family[0]["active_fraction"]),
                     "active_fraction": 1.0} if "active_fraction" in family[0] else {}
    rows.append(("teacher (parent)", "-", "parent", fmt_params(full, full)
                 + _active_text(parent_active), "-",
                 fmt_loss(teacher["val_loss"]), fmt_pct(teacher["answer_accuracy"]),
                 fmt_speed(teacher["tokens_per_s"]), "-", "-"))
    return rows


def _active_text(row: dict) -> str:
    """MoE: ', active N (x%)' of a family row (what one token touches); '' otherwise."""
    if "active_fraction" not in row:
        return ""
    return f", active {row['active_parameters']:,} ({100 * row['active_fraction']:.1f}%)"


FAMILY_HEADER = ("budget", "target", "sizes", "parameters (exported)", "inside band?", "val loss",
                 "answer acc.", "tokens/s", "zero-shot val loss", "zero-shot acc.")


def _curve_by_iteration(curve: dict) -> dict[int, dict]:
    points: dict[int, dict] = {}
    for r in curve["records"]:
        points.setdefault(r["iteration"], {"tokens": r["tokens"]})[r["budget"]] = r
    return points


def write_report(out: Path, *, cfg: Config, parent: dict, zero_shot: dict, evaluation: dict,
                 curve: dict, stages: dict) -> Path:
    out = Path(out)
    from nemo_elastic.family_check import check_family
    from nemo_elastic.training.elastic.schedule import Curriculum

    curriculum = Curriculum.of(cfg)
    family = zero_shot["family"]
    check = check_family(family)
    names = [r["name"] for r in family]
    points = _curve_by_iteration(curve or {"records": []})  # None: elastic.training_curve off
    before = points.get(0, {})
    plot_family(out / BUDGETS_PNG, evaluation, family, before, zero_shot["budgets"],
                parent.get("uniform_loss"))
    if curve is not None:
        plot_training(out / TRAINING_PNG, curve, names, curriculum.stage_change_tokens())
    p = evaluation["protocol"]
    e = cfg.elastic
    stage_text = curriculum.describe(names)
    total_tokens = max((v["tokens"] for v in points.values()), default=0)
    budgets_text = ", ".join(f"`{n}` " + target_text({"target": e.budgets[n],
                                                      "budget_type": e.budget_type})
                             for n in names)
    lines = [
        f"# Main job report: `{out}`",
        "",
        f"Parent: `{cfg.model.hybrid_layer_pattern}`, {parent['parameters']:,} parameters, "
        f"pretrained {parent['iterations']} iterations (validation loss "
        f"{fmt_loss(parent['final_val_loss'])}, uniform guess {fmt_loss(parent['uniform_loss'])})."
        f" Budgets: {budgets_text}. "
        f"Elastic distillation from the prepared (importance-reordered) parent, which is also "
        f"the frozen teacher: {stage_text}; {total_tokens:,} training tokens for the whole "
        "family.",
        "",
        f"**One protocol for every number below**: validation loss = token mean over the first "
        f"{p['val_sequences']} validation sequences of {p['seq_length']} tokens "
        f"({p['val_micro_batches']} micro-batches of {p['micro_batch_size']}); answer accuracy = "
        f"exact-match greedy answers on the first {p['accuracy_problems']} validation problems; "
        "tokens/s = greedy decoding, one prompt at a time, with the KV cache and Mamba states, "
        "on this machine's CPU. "
        "The training logs measure differently (see [Two losses](#two-losses-for-one-checkpoint)).",
        "",
        "## The family: each budget exported and evaluated as a standalone model",
        "",
        markdown_table(FAMILY_HEADER, family_rows(evaluation, family, before)),
        "",
        "*parameters (exported)* are counted on the loaded standalone checkpoint "
        "(`family/<name>`, as `nemo-elastic extract --all`); *zero-shot* is the same "
        "sub-network sliced from the prepared parent before any elastic training; *inside "
        "band?*: the achieved size against the target's band (`elastic.loss.tolerance`)."
        + (" *active*: the parameters one token touches (each MoE layer's router, top-"
           f"{cfg.model.moe.moe_router_topk} routed experts and shared expert; closed form), "
           "as a fraction of the parent's." if cfg.model.has_moe else ""),
        "",
        f"**Bands**: {check.summary()}. **Order**: sizes {check.order_text()}.",
        "",
    ]
    hf = sorted(n for n in names if (out / "hf" / n / "config.json").is_file())
    lines += [f"Exported: Megatron checkpoints `family/{{{','.join(names)}}}`" + (
        f"; Hugging Face `nemotron_h` folders `hf/{{{','.join(hf)}}}`." if hf else
        "; no Hugging Face export (transformers not installed, or a heterogeneous budget)."), ""]
    lines += ["## Against training tokens", "",
              "Each saved elastic checkpoint, each budget at the router's choice of that "
              "checkpoint (iteration 0: the prepared parent = zero-shot).", ""]
    header = ["tokens", "iteration"] + [f"{n} {k}" for n in names for k in ("loss", "acc.")]
    rows = []
    for it in sorted(points):
        pt = points[it]
        rows.append([f"{pt['tokens']:,}", str(it)] + [
            v for n in names for v in (fmt_loss(pt.get(n, {}).get("val_loss")),
                                       fmt_pct(pt.get(n, {}).get("answer_accuracy")))])
    lines += [markdown_table(header, rows) if curve is not None else
              "Not measured (`elastic.training_curve: false`).", ""]
    lines += ["## Zero-shot prefixes (no elastic training)", "",
              "Every width axis cut to the same fraction, in the parent's original order and "
              "in the importance order (`prepare`).", ""]
    full = parent["parameters"]
    lines += [markdown_table(("weights", "width", "parameters", "val loss", "answer acc."), [
        (r["weights"], fmt_pct(r["fraction"]), fmt_params(r["parameters"], full),
         fmt_loss(r["val_loss"]), fmt_pct(r["answer_accuracy"])) for r in zero_shot["budgets"]]),
        ""]
    lines += ["## Figures", "",
              f"![loss and accuracy against parameters]({BUDGETS_PNG})", ""]
    if curve is not None:
        lines += [f"![loss and accuracy against training tokens]({TRAINING_PNG})", ""]
    for title, rel in LINKED:
        if (out / rel).is_file():
            lines += [f"![{title}]({rel})", ""]
    lines += ["## Stages", "", markdown_table(("stage", "wall time (when it ran)", "this invocation"), [
        (name, "n/a" if s.get("seconds") is None else f"{s['seconds']:.1f} s",
         "reused" if s.get("reused") else "ran") for name, s in stages.items()]), ""]
    teacher_train = zero_shot.get("teacher", {}).get("val_loss")
    last = curriculum.stages[-1] if curriculum.explicit else None
    lines += [
        "## Two losses for one checkpoint", "",
        "The same model gets slightly different validation losses in different places "
        "because they are measured on different token sets, not because anything differs:",
        f"- this report: the protocol above (teacher {fmt_loss(_teacher(evaluation))});",
        f"- the parent's pretraining summary (`summary.json`): {fmt_loss(parent['final_val_loss'])}"
        ", the recipe's windows and `train.eval_iters` global batches;",
        "- the elastic run's closing table (`elastic/summary.json`, teacher "
        f"{fmt_loss(teacher_train)}): the last curriculum stage's data"
        + (f" ({last.seq_length}-token windows, "
           f"{cfg.train.eval_iters} x {last.global_batch_size} "
           "sequences)" if last else "") + ", with the router's family at the end of training.",
        ""]
    path = out / REPORT
    path.write_text("\n".join(lines))
    return path


def _teacher(evaluation: dict) -> Optional[float]:
    return next((m["val_loss"] for m in evaluation["models"] if m["name"] == "teacher"), None)


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), dpi=120, squeeze=False)


def _finish(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_family(path: Path, evaluation: dict, family: list[dict], before: dict,
                zero_shot: list[dict], uniform_loss: Optional[float]) -> Path:
    """Loss and accuracy against parameters: elastic family, zero-shot, uniform prefixes."""
    fig, axs = _figure(2)
    models = {m["name"]: m for m in evaluation["models"]}
    names = [r["name"] for r in family]
    for ax, key, label in ((axs[0][0], "val_loss", "validation loss (nats/token)"),
                           (axs[0][1], "answer_accuracy", "answer accuracy (greedy)")):
        series = {
            "elastic (exported)": [(models[n]["parameters"], models[n][key]) for n in names],
            "same sub-networks, zero-shot": [(before[n]["parameters"], before[n][key])
                                             for n in names if n in before],
            "uniform prefixes, zero-shot": [(r["parameters"], r[key]) for r in zero_shot
                                            if r["weights"] == "importance order"],
        }
        for (name, pts), style in zip(series.items(), ("o-", "x--", "s:")):
            pts = sorted(p for p in pts if p[1] is not None)
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        t = models.get("teacher")
        if t and t[key] is not None:
            ax.plot([t["parameters"]], [t[key]], "k*", markersize=10, label="teacher (parent)")
        if key == "val_loss" and uniform_loss is not None:
            ax.axhline(uniform_loss, color="grey", linestyle="--", label="uniform guess")
        if key == "answer_accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize="small")
    return _finish(fig, path)


def plot_training(path: Path, curve: dict, names: list[str], stage_marks: list[int]) -> Path:
    """Each budget's loss and accuracy against the elastic run's training tokens."""
    fig, axs = _figure(2)
    for ax, key, label in ((axs[0][0], "val_loss", "validation loss (nats/token)"),
                           (axs[0][1], "answer_accuracy", "answer accuracy (greedy)")):
        for k, name in enumerate(names):
            pts = sorted((r["tokens"], r[key]) for r in curve["records"]
                         if r["budget"] == name and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{k}", label=name)
        for mark in stage_marks:
            ax.axvline(mark, color="grey", linewidth=0.8)
        if key == "answer_accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("elastic training tokens (grey: curriculum stage change)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize="small")
    return _finish(fig, path)
