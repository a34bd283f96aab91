"""`nemo-elastic run`: the main job, end to end on one recipe.

1. **pretrain** the parent (resumes from `output_dir`);
2. **prepare**: importance scores + reordering -> `output_dir/prepared` (same function);
3. **zero-shot**: the masked prefix sub-networks at 100 / 75 / 50 % of every width axis,
   evaluated on the parent as trained and on the prepared parent -> `zero_shot.json`;
4. **elastic** distillation of the recipe's `elastic:` budgets from the prepared parent
   (`nemo-elastic train`, resumes from `output_dir/elastic`): the trained family;
5. **export** every budget as a standalone Megatron checkpoint (`output_dir/family/<name>`,
   the path of `nemo-elastic export --all --format megatron`) and, when `transformers` is
   installed, as a Hugging Face folder (`output_dir/hf/<name>`, `export --budget NAME`);
6. **evaluate** each exported model as a plain model (validation loss, greedy answer accuracy,
   greedy decoding tokens/s) and the teacher -> `evaluation.json`; and every saved elastic
   checkpoint's family (loss and accuracy against training tokens) -> `training_curve.json`;
7. **report**: `report.md` with tables and PNG plots (`report/main_job.py`).

The folder's layout and each stage's `finished` check: `run.main_job_dir.MainJobDir`.

Every evaluation in steps 3 and 6 uses one protocol (`evaluation_protocol`): the recipe's
`data` section, the first `train.eval_iters` global batches of the validation set (as `eval` and
training measure it: `training.evaluation.eval_microbatches`), the first
`train.eval_accuracy_samples` validation problems.  Steps 2-7 run in a single process (they need
whole tensors); under torchrun with several ranks only step 1 runs.  A stage whose output exists
(and was made from the same inputs) is skipped; `--no-resume` redoes everything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from nemo_elastic.config import Config
from nemo_elastic.report.common import fmt_loss, fmt_pct, format_table, plot_budgets
from nemo_elastic.run.main_job_dir import MainJobDir, stamped

logger = logging.getLogger(__name__)

FRACTIONS = (1.0, 0.75, 0.5)


class _Stages:
    """Times each stage and remembers, across invocations, how long it took when it ran."""

    def __init__(self, job: MainJobDir, resume: bool) -> None:
        from nemo_elastic.checkpoint import read_json_file
        from nemo_elastic.errors import UserError

        self.path = job.stages_file
        fix = "delete it (it only holds stage timings) or rerun with --no-resume"
        old = read_json_file(self.path, repr(str(self.path)), error=UserError, fix=fix) \
            if resume and self.path.is_file() else {}
        stages = old.get("stages", {}) if isinstance(old, dict) else None
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise UserError(f"{str(self.path)!r} is corrupt (not a mapping of stages); {fix}")
        self.stages: dict[str, dict] = stages

    def run(self, name: str, done: bool, fn: Callable[[], object], what: str):
        """`fn()` unless `done` (then logs that the output `what` is reused)."""
        if done:
            logger.info("stage %s: reusing %s (--no-resume redoes it)", name, what)
            self.stages.setdefault(name, {"seconds": None})["reused"] = True
            self.write()
            return None
        logger.info("stage %s ...", name)
        start = time.perf_counter()
        value = fn()
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 1), "reused": False}
        self.write()
        return value

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"stages": self.stages})


def write_json(path: Path, value) -> None:
    """Atomic and fsync'd (a crash leaves the old file or the new one, never half of one)."""
    from nemo_elastic.checkpoint import write_text_durably
    from nemo_elastic.report.common import strict_json

    write_text_durably(path, strict_json(value, indent=2))


def run(cfg: Config, *, resume: bool = True, progress: bool = True,
        fractions: Sequence[float] = FRACTIONS) -> Optional[dict]:
    """The main job; returns {"budgets": zero-shot records, "family", "teacher", "evaluation",
    "training_curve", "report"} (None under several processes or when nothing was trained).

    In one process the whole job holds the run folder's lock (its stages nest inside it), so a
    second `run` on the same folder refuses at once instead of racing at a later stage.  Under
    several processes only pretraining runs, and it locks the folder itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run(cfg, resume=resume, progress=progress, fractions=fractions)
    with MainJobDir(cfg).lock(nested=True):
        return _run(cfg, resume=resume, progress=progress, fractions=fractions)


def _run(cfg: Config, *, resume: bool, progress: bool,
         fractions: Sequence[float]) -> Optional[dict]:
    job = MainJobDir(cfg)
    stages = _Stages(job, resume)
    parent = job.pretrained() if resume else None
    if parent is None:
        from nemo_elastic.training.pretrain import pretrain

        start = time.perf_counter()
        parent = {k: v for k, v in dataclasses.asdict(
            pretrain(cfg, resume=resume, progress=progress)).items() if k != "history"}
        stages.stages["pretrain"] = {"seconds": round(time.perf_counter() - start, 1),
                                     "reused": False}
    else:
        logger.info("stage pretrain: reusing %s (%d iterations done; --no-resume redoes it)",
                    parent["checkpoint"], parent["iterations"])
        stages.stages.setdefault("pretrain", {"seconds": None})["reused"] = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logger.info("several processes: run `nemo-elastic prepare` on the checkpoint in one "
                    "process for the importance reordering and zero-shot budgets")
        return None
    if parent["checkpoint"] is None:
        return None
    stages.write()
    parent_ckpt = Path(parent["checkpoint"])
    prepared = job.output("prepare")

    def do_prepare():
        from nemo_elastic.importance.prepare import prepare

        return prepare(parent_ckpt, prepared, overwrite=True, progress=progress)

    stages.run("prepare", resume and job.finished("prepare", source=parent_ckpt) is not None,
               do_prepare, str(prepared))

    sources = {"original order": str(parent_ckpt), "importance order": str(prepared)}
    zs_path = job.output("zero_shot")
    old = job.finished("zero_shot", checkpoints=sources, fractions=list(fractions))
    table = stages.run("zero_shot", resume and old is not None, lambda: zero_shot_budgets(
        cfg, {k: Path(v) for k, v in sources.items()}, fractions), str(zs_path))
    if table is None:
        table = old
    else:
        table = {"checkpoints": sources, "fractions": list(fractions), **table}
        write_json(zs_path, table)
    plot_budgets(table["budgets"], job.zero_shot_plot, uniform_loss=parent["uniform_loss"])
    if cfg.elastic is None:
        logger.info("the recipe has no `elastic:` section: no elastic distillation stage")
        return table

    elastic_cfg = dataclasses.replace(
        cfg, elastic=dataclasses.replace(cfg.elastic, init_checkpoint=str(prepared)))
    trained = job.trained(elastic_cfg) if resume else None

    def do_train():
        from nemo_elastic.training.train import train

        result = train(elastic_cfg, resume=resume, progress=progress)
        return {"checkpoint": result.checkpoint, "family": result.family,
                "teacher": result.teacher, "iterations": result.iterations}

    value = stages.run("elastic", trained is not None, do_train,
                       f"the finished elastic run in {job.elastic(elastic_cfg).root}")
    trained = trained or value
    table["family"], table["teacher"] = trained["family"], trained["teacher"]
    ckpt = Path(trained["checkpoint"])

    exported = stages.run("export", resume and job.exported(ckpt, trained["family"]) is not None,
                          lambda: export_family(job, ckpt, trained["family"]),
                          str(job.family_dir))
    exported = exported or job.exported(ckpt, trained["family"])

    eval_path = job.output("evaluate")
    models = {"teacher": str(prepared), **{name: str(p) for name, p in exported["megatron"].items()}}
    old = job.finished("evaluate", checkpoints=stamped(models))
    evaluation = stages.run(
        "evaluate", resume and old is not None,
        lambda: evaluate_exported(cfg, models, progress=progress), str(eval_path))
    if evaluation is None:
        evaluation = old
    else:
        write_json(eval_path, evaluation)

    curve_path = job.output("training_curve")
    checkpoints = job.elastic(elastic_cfg).saved_checkpoints()
    if not cfg.elastic.training_curve:
        logger.info("stage training_curve: skipped (elastic.training_curve: false)")
        curve = None
    else:
        old = job.finished("training_curve", checkpoints=stamped(
            {str(k): str(v) for k, v in checkpoints.items()}))
        curve = stages.run(
            "training_curve", resume and old is not None,
            lambda: training_curve(cfg, prepared, checkpoints, trained["family"],
                                   progress=progress), str(curve_path))
        if curve is None:
            curve = old
        else:
            write_json(curve_path, curve)

    from nemo_elastic.report.main_job import write_report

    table.update(evaluation=evaluation, training_curve=curve, exported=
                 {k: {n: str(p) for n, p in v.items()} for k, v in exported.items()})
    start = time.perf_counter()
    report = write_report(job.root, cfg=elastic_cfg, parent=parent, zero_shot=table,
                          evaluation=evaluation, curve=curve, stages=stages.stages)
    stages.stages["report"] = {"seconds": round(time.perf_counter() - start, 1), "reused": False}
    stages.write()
    table["report"] = str(report)
    logger.info("report: %s", report)
    return table


# ------------------------------------------------------------------------ stage outputs

def export_family(job: MainJobDir, ckpt: Path, family: list[dict]) -> dict:
    """Every trained budget as a Megatron checkpoint `family/<name>` and, when transformers
    is installed and the budget is homogeneous, a Hugging Face folder `hf/<name>`: the path of
    `nemo-elastic export --all --format megatron` and `export --budget NAME --format hf`
    (sliced, reloaded and verified against the masked nested model).  The family's order is
    reported by the job (its report), not refused here."""
    import importlib.util

    from nemo_elastic.checkpoint_commands import export

    megatron = export(ckpt, job.family_dir, all_budgets=True, format="megatron",
                      overwrite=True, allow_unordered=True)
    hf = {}
    if importlib.util.find_spec("transformers") is None:
        logger.warning("transformers is not installed: no Hugging Face export (pip install "
                       "'nemo_elastic[hf]'; `make run` installs it); the Megatron checkpoints "
                       "are in %s", job.family_dir)
        return {"megatron": megatron, "hf": hf}
    from nemo_elastic.export.hf_adapter import HFConfigError

    for row in family:
        try:
            hf.update(export(ckpt, job.hf_dir, budget=row["name"], format="hf",
                             overwrite=True, allow_unordered=True))
        except HFConfigError as err:
            logger.warning("budget %r: no Hugging Face export: %s", row["name"], err)
    return {"megatron": megatron, "hf": hf}


# ------------------------------------------------------------------------ evaluation

def evaluation_protocol(cfg: Config) -> dict:
    """What every number of the report is measured on (one protocol for every model)."""
    from nemo_elastic.training.evaluation import eval_microbatches

    d, t = cfg.data, cfg.train
    micro = t.eval_iters * eval_microbatches(cfg)
    return {"seq_length": d.seq_length, "micro_batch_size": d.micro_batch_size,
            "val_micro_batches": micro, "val_sequences": micro * d.micro_batch_size,
            "accuracy_problems": t.eval_accuracy_samples, "data": d.source}


def _eval_config(cfg: Config) -> Config:
    return cfg.single_process()


def evaluate_exported(cfg: Config, models: dict[str, str], *, progress: bool = False) -> dict:
    """Each exported checkpoint loaded as a plain model: parameters, validation loss, answer
    accuracy, greedy decoding tokens/s (see `evaluate_checkpoint.evaluate_models`)."""
    from nemo_elastic.training.evaluate_checkpoint import evaluate_models

    run_cfg = _eval_config(cfg)
    rows = evaluate_models(run_cfg, {name: Path(p) for name, p in models.items()},
                           speed=True, progress=progress)
    return {"checkpoints": stamped(models), "protocol": evaluation_protocol(cfg),
            "models": rows}


def training_curve(cfg: Config, prepared: Path, checkpoints: dict[int, Path],
                   final_family: list[dict], *, progress: bool = False) -> dict:
    """Validation loss and answer accuracy of every budget at every saved elastic checkpoint
    (each checkpoint's own family, i.e. the router's choice at that point), and at iteration 0
    (the prepared parent with the final family: the zero-shot prefixes)."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import CheckpointMeta, load_checkpoint
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.training.evaluation import eval_microbatches, evaluate_subnetwork

    run_cfg = _eval_config(cfg)
    tokens = _tokens_per_iteration(cfg)
    points = [(0, prepared, final_family)] + [
        (it, path, CheckpointMeta.read(path).family) for it, path in sorted(checkpoints.items())]
    records = []
    from tqdm import tqdm

    bar = tqdm(total=sum(len(family) for _, _, family in points), unit="budget",
               desc="training curve (checkpoints x budgets)", disable=not progress,
               dynamic_ncols=True)
    info = runtime.initialize(run_cfg.parallel, cfg.train.seed)
    try:
        data = build_training_data(run_cfg, info)
        model = build_elastic_model(run_cfg)
        for iteration, path, family in points:
            load_checkpoint(path, model=model, restore_rng=False)
            model.eval()
            for row in family:
                logger.debug("training curve: iteration %d, budget %r", iteration, row["name"])
                bar.set_postfix_str(f"iteration {iteration}, {row['name']}")
                metrics = evaluate_subnetwork(run_cfg, model, data, info,
                                              SubNetwork.from_dict(row["subnetwork"]),
                                              num_microbatches=eval_microbatches(run_cfg),
                                              progress=progress)
                records.append({"iteration": iteration, "tokens": tokens(iteration),
                                "budget": row["name"], "parameters": row["parameters"],
                                **metrics})
                bar.update()
    finally:
        bar.close()
        runtime.destroy()
    logger.info("training curve: %d evaluations (%d checkpoints x their budgets)",
                len(records), len(points))
    return {"checkpoints": stamped({str(k): str(v) for k, v in checkpoints.items()}),
            "protocol": evaluation_protocol(cfg), "records": records}


def _tokens_per_iteration(cfg: Config) -> Callable[[int], int]:
    """iteration -> training tokens the student saw up to it (curriculum stages in order)."""
    from nemo_elastic.training.elastic.schedule import Curriculum

    return Curriculum.of(cfg).tokens_at


def zero_shot_budgets(cfg: Config, checkpoints: dict[str, Path],
                      fractions: Sequence[float]) -> dict:
    """Masked prefix sub-networks of each checkpoint: parameters, val loss, answer accuracy."""
    from nemo_elastic import runtime
    from nemo_elastic.cost_model import count_parameters
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
    params = record["parameters"]
    return (record["weights"], f"{record['fraction']:.0%}",
            f"{params:,} ({params / full_parameters:.1%})", fmt_loss(record["val_loss"]),
            fmt_pct(record["answer_accuracy"]))


def _checkpoint_budgets(run_cfg: Config, ckpt: Path, data, info,
                        fractions: Sequence[float]) -> list[dict]:
    """One record per fraction for the elastic model of `ckpt` (one process, TP=PP=1)."""
    from nemo_elastic.cost_model import subnetwork_parameters
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.importance.zero_shot import fractional_subnetwork
    from nemo_elastic.training.evaluation import eval_microbatches, evaluate_subnetwork

    model = build_elastic_model(run_cfg)
    load_checkpoint(ckpt, model=model, restore_rng=False)
    model.eval()
    records = []
    for fraction in fractions:
        subnet = fractional_subnetwork(run_cfg.model, fraction)
        # The report's one protocol: `train.eval_iters` global batches (`eval_microbatches`).
        metrics = evaluate_subnetwork(run_cfg, model, data, info, subnet,
                                      num_microbatches=eval_microbatches(run_cfg))
        records.append({"fraction": fraction,
                        "parameters": subnetwork_parameters(run_cfg.model, subnet), **metrics,
                        "subnetwork": subnet.to_dict()})
    return records


