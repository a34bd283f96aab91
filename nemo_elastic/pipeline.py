"""`nemo-elastic run`: the main job, end to end on one recipe.

1. pretrain the parent (resumes from `output_dir`);
2. `prepare`: importance scores + reordering -> `output_dir/prepared` (same function);
3. zero-shot budgets: the masked prefix sub-networks at 100 / 75 / 50 % of every width axis,
   evaluated on the parent as trained and on the prepared parent - validation loss and (on the
   synthetic corpus) greedy answer accuracy - written to `output_dir/zero_shot.json` and a table;
4. elastic distillation of the recipe's `elastic:` budgets from the prepared parent
   (`nemo-elastic train`, resumes from `output_dir/elastic`): the trained family.

Steps 2-3 run in a single process (they need whole tensors); under torchrun with several ranks
only step 1 runs.  A finished stage is not redone: pretrain and train resume from their last
checkpoint, and an existing prepared checkpoint is reused (unless --no-resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from nemo_elastic.checkpoint import META_FILE
from nemo_elastic.config import Config
from nemo_elastic.report import format_table, plot_budgets

logger = logging.getLogger(__name__)

FRACTIONS = (1.0, 0.75, 0.5)


def run(cfg: Config, *, resume: bool = True, progress: bool = True,
        fractions: Sequence[float] = FRACTIONS) -> Optional[dict]:
    from nemo_elastic.importance.prepare import prepare
    from nemo_elastic.training.pretrain import pretrain

    result = pretrain(cfg, resume=resume, progress=progress)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logger.info("several processes: run `nemo-elastic prepare` on the checkpoint in one "
                    "process for the importance reordering and zero-shot budgets")
        return None
    if result.checkpoint is None:
        return None
    out = Path(cfg.output_dir)
    prepared = out / "prepared"
    if resume and (prepared / META_FILE).is_file():
        logger.info("reusing the prepared checkpoint %s (--no-resume redoes it)", prepared)
    else:
        prepared = prepare(result.checkpoint, prepared, overwrite=True, progress=progress)
    table = zero_shot_budgets(cfg, {"original order": Path(result.checkpoint),
                                    "importance order": prepared}, fractions)
    (out / "zero_shot.json").write_text(json.dumps(table, indent=2))
    plot_budgets(table["budgets"], out / "zero_shot.png", uniform_loss=result.uniform_loss)
    if cfg.elastic is None:
        logger.info("the recipe has no `elastic:` section: no elastic distillation stage")
        return table
    from nemo_elastic.training.train import train

    elastic_cfg = dataclasses.replace(
        cfg, elastic=dataclasses.replace(cfg.elastic, init_checkpoint=str(prepared)))
    trained = train(elastic_cfg, resume=resume, progress=progress)
    table["family"] = trained.family
    table["teacher"] = trained.teacher
    return table


def zero_shot_budgets(cfg: Config, checkpoints: dict[str, Path],
                      fractions: Sequence[float]) -> dict:
    """Masked prefix sub-networks of each checkpoint: parameters, val loss, answer accuracy."""
    from nemo_elastic import runtime
    from nemo_elastic.budget import count_parameters
    from nemo_elastic.data.loaders import build_training_data

    run_cfg = cfg.single_process()
    rows, records = [], []
    info = runtime.initialize(run_cfg.parallel, cfg.train.seed)
    try:
        data = build_training_data(run_cfg, info)
        full = count_parameters(run_cfg.model)
        for name, ckpt in checkpoints.items():
            for record in _checkpoint_budgets(run_cfg, ckpt, data, info, fractions):
                records.append({"weights": name, **record})
                rows.append(_table_row(records[-1], full))
    finally:
        runtime.destroy()
    logger.info("zero-shot budgets: masked prefixes of the parent, before any elastic training "
                "(multi-budget distillation is what makes the smaller prefixes good models)\n%s",
                format_table(("weights", "width", "parameters", "val loss", "answer acc"), rows))
    return {"budgets": records}


def _table_row(record: dict, full_parameters: int) -> tuple[str, ...]:
    params, acc = record["parameters"], record["answer_accuracy"]
    return (record["weights"], f"{record['fraction']:.0%}",
            f"{params:,} ({params / full_parameters:.0%})", f"{record['val_loss']:.4f}",
            "n/a" if acc is None else f"{acc:.1%}")


def _checkpoint_budgets(run_cfg: Config, ckpt: Path, data, info,
                        fractions: Sequence[float]) -> list[dict]:
    """One record per fraction for the elastic model of `ckpt` (one process, TP=PP=1)."""
    from nemo_elastic.budget import subnetwork_parameters
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.importance.zero_shot import fractional_subnetwork
    from nemo_elastic.training.evaluation import evaluate_subnetwork

    model = build_elastic_model(run_cfg)
    load_checkpoint(ckpt, model=model, restore_rng=False)
    model.eval()
    records = []
    for fraction in fractions:
        subnet = fractional_subnetwork(run_cfg.model, fraction)
        # One micro-batch per eval iteration: the loss is the token mean over the first
        # `train.eval_iters` validation micro-batches, the set the zero-shot table always used.
        metrics = evaluate_subnetwork(run_cfg, model, data, info, subnet, num_microbatches=1)
        records.append({"fraction": fraction,
                        "parameters": subnetwork_parameters(run_cfg.model, subnet), **metrics,
                        "subnetwork": subnet.to_dict()})
    return records
