"""The run folder, with one owner: every file name of a run's layout is spelled here.

A training run (`nemo-elastic pretrain`: `output_dir`; `nemo-elastic train`:
`elastic.output_dir`, default `<output_dir>/elastic`) writes

    RUN/
      .lock                 held while a run writes here (`lock.OutputLock`)
      checkpoints/          iter_NNNNNNN/ + latest (`checkpoint.series`)
      config.json           the resolved recipe, written once the resume checks passed
      metrics.jsonl         one record per logged iteration
      summary.json          written last: the run's closing figures
      answer_examples.json, loss.png                    (pretrain)
      family.json, report.md, kd_by_budget.png, router_choices.png, tb/   (elastic)

and the main job (`nemo-elastic run`, `MainJobDir`) adds, in `output_dir` next to the
pretraining run: prepared/, zero_shot.json/.png, elastic/, family/<budget>, hf/<budget>,
evaluation.json, training_curve.json, pipeline.json (its stages' timings) and report.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from nemo_elastic.checkpoint.durable import write_text_durably
from nemo_elastic.checkpoint.errors import CheckpointError
from nemo_elastic.checkpoint.meta import read_meta
from nemo_elastic.checkpoint.names import CHECKPOINTS_DIR, LATEST_FILE, iteration_dir_name
from nemo_elastic.checkpoint.series import latest_checkpoint
from nemo_elastic.run.lock import OutputLock

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"  # one JSON record per logged iteration
ELASTIC_DIR = "elastic"  # the elastic run's default folder inside output_dir
BRIDGE_DIR = "bridge"  # the Megatron-Bridge run's default folder inside output_dir


def read_json(path: Path) -> Optional[Any]:
    """A JSON file this project wrote, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def checkpoint_iteration(ckpt) -> Optional[int]:
    """The iteration a checkpoint records, or None when it is missing or unreadable."""
    try:
        return read_meta(ckpt).get("iteration")
    except CheckpointError:
        return None


class RunDir:
    """One training run's folder: its paths, its lock, its summary, whether it finished."""

    def __init__(self, root: str | Path, field_name: str = "output_dir") -> None:
        self.root, self.field_name = Path(root), field_name

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # paths
    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, iteration: int) -> Path:
        return self.checkpoints / iteration_dir_name(iteration)

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def answer_examples(self) -> Path:
        return self.root / "answer_examples.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def family_file(self) -> Path:
        """An elastic run's trained family (the table its checkpoints also hold)."""
        return self.root / "family.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    # state
    def lock(self, *, nested: bool = False) -> OutputLock:
        return OutputLock(self.root, self.field_name, nested=nested)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.checkpoints)

    def saved_checkpoints(self) -> dict[int, Path]:
        """{iteration: checkpoint} of every complete checkpoint of the run."""
        found = {}
        for path in sorted(self.checkpoints.glob("iter_*")):
            iteration = checkpoint_iteration(path)
            if iteration is not None:
                found[int(iteration)] = path
        return found

    def has_summary(self) -> bool:
        return self.summary_path.is_file()

    def read_summary(self) -> Optional[dict]:
        return read_json(self.summary_path)

    def read_config(self) -> Optional[dict]:
        return read_json(self.config_path)

    def write_summary(self, text: str) -> None:
        write_text_durably(self.summary_path, text)

    def write_config(self, text: str) -> None:
        write_text_durably(self.config_path, text)

    def finished(self, iterations: int) -> Optional[tuple[dict, Path]]:
        """(summary, latest checkpoint) when the run finished `iterations` iterations (its
        summary and its latest checkpoint both say so), else None."""
        summary = self.read_summary()
        latest = self.latest()
        if not summary or latest is None or summary.get("iterations") != iterations \
                or checkpoint_iteration(latest) != iterations:
            return None
        return summary, latest


def pretrain_run_dir(cfg) -> RunDir:
    """`nemo-elastic pretrain`'s folder: `output_dir`."""
    return RunDir(cfg.output_dir, "output_dir")


def elastic_run_dir(cfg) -> RunDir:
    """`nemo-elastic train`'s folder: `elastic.output_dir`, default `<output_dir>/elastic`."""
    root = cfg.elastic.output_dir if cfg.elastic is not None else None
    return RunDir(root or Path(cfg.output_dir) / ELASTIC_DIR, "elastic.output_dir")


def bridge_run_dir(cfg, output_dir: Optional[str] = None) -> RunDir:
    """The Megatron-Bridge run's folder: `output_dir` if given, else `<output_dir>/bridge`."""
    return RunDir(output_dir or Path(cfg.output_dir) / BRIDGE_DIR, "output_dir")


def elastic_run_beside(ckpt) -> Optional[Path]:
    """RUN/elastic when checkpoint `ckpt` is RUN/checkpoints/iter_N of a folder that also holds
    an elastic run (the main job's layout: its latest checkpoint is the parent), else None:
    what a user who passed the main job's folder where a family is needed meant."""
    ckpt = Path(ckpt)
    if ckpt.parent.name != CHECKPOINTS_DIR:
        return None
    inner = RunDir(ckpt.parent.parent / ELASTIC_DIR)
    return inner.root if (inner.checkpoints / LATEST_FILE).is_file() else None
