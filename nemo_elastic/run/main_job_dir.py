"""The main job's folder (`nemo-elastic run`: `output_dir`): the pretraining run's files plus
each later stage's output, and `finished(stage)`: whether a stage's output exists and was made
from the same inputs (then the job reuses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nemo_elastic.checkpoint.errors import CheckpointError
from nemo_elastic.checkpoint.meta import CheckpointMeta
from nemo_elastic.run.run_dir import CONFIG_FILE, RunDir, checkpoint_iteration, \
    elastic_run_dir, read_json

STAGES_FILE = "pipeline.json"  # per stage: seconds it took when it ran, and whether reused
STAGE_OUTPUTS = {"prepare": "prepared", "zero_shot": "zero_shot.json",
                 "evaluate": "evaluation.json", "training_curve": "training_curve.json"}


def stamped(paths: dict[str, str]) -> dict[str, list]:
    """{name: [path, iteration]}: what a stage's inputs were."""
    return {name: [str(p), checkpoint_iteration(p)] for name, p in paths.items()}


class MainJobDir(RunDir):
    """`output_dir` of `nemo-elastic run` (the pretraining run's folder too)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg.output_dir, "output_dir")
        self.cfg = cfg

    # paths of the stages' outputs
    @property
    def stages_file(self) -> Path:
        return self.root / STAGES_FILE

    def output(self, stage: str) -> Path:
        """The file or folder a stage writes (prepare, zero_shot, evaluate, training_curve)."""
        return self.root / STAGE_OUTPUTS[stage]

    @property
    def zero_shot_plot(self) -> Path:
        return self.root / "zero_shot.png"

    @property
    def family_dir(self) -> Path:
        """The exported Megatron checkpoints, one folder per budget."""
        return self.root / "family"

    @property
    def hf_dir(self) -> Path:
        """The exported Hugging Face folders, one per budget."""
        return self.root / "hf"

    def elastic(self, cfg=None) -> RunDir:
        return elastic_run_dir(cfg or self.cfg)

    # finished stages
    def pretrained(self) -> Optional[dict]:
        """The finished pretraining run's summary with its checkpoint, or None."""
        done = self.finished(self.cfg.train.iters)
        return None if done is None else {**done[0], "checkpoint": str(done[1])}

    def prepared_from(self) -> Optional[str]:
        """The checkpoint the prepared parent was made from, or None."""
        try:
            meta = CheckpointMeta.read(self.output("prepare"))
            return meta.extra.get("importance", {}).get("source")
        except CheckpointError:
            return None

    def trained(self, elastic_cfg) -> Optional[dict]:
        """The finished elastic run (summary at the final iteration, from this init) or None."""
        run = self.elastic(elastic_cfg)
        total = elastic_cfg.elastic.total_iters
        done = run.finished(total)
        stored = run.read_config() or {}
        if done is None or (stored.get("elastic") or {}).get("init_checkpoint") \
                != elastic_cfg.elastic.init_checkpoint:
            return None
        summary, latest = done
        return {"checkpoint": str(latest), "family": summary["family"],
                "teacher": summary["teacher"], "iterations": total}

    def exported(self, ckpt: Path, family: list[dict]) -> Optional[dict]:
        """The exported family (paths) if every budget was exported from `ckpt`, else None."""
        megatron, hf = {}, {}
        for row in family:
            path = self.family_dir / row["name"]
            try:
                meta = CheckpointMeta.read(path)
            except CheckpointError:
                return None
            if meta.extra.get("parent") != str(ckpt):
                return None
            megatron[row["name"]] = path
            if (self.hf_dir / row["name"] / CONFIG_FILE).is_file():
                hf[row["name"]] = self.hf_dir / row["name"]
        return {"megatron": megatron, "hf": hf}

    def finished(self, iterations_or_stage, **inputs):
        """A training run's `finished(iterations)` (see RunDir), or for a stage of the main
        job, its recorded output when it was made from `inputs` (else None):

        * `finished("prepare", source=CKPT)`: the prepared parent's path;
        * `finished(STAGE, checkpoints={...}, **more)` for zero_shot / evaluate /
          training_curve: the stage's JSON when its recorded `checkpoints` (and every other
          given key) equal the inputs."""
        if not isinstance(iterations_or_stage, str):
            return super().finished(iterations_or_stage)
        stage = iterations_or_stage
        if stage == "prepare":
            prepared = self.output("prepare")
            ok = prepared.is_dir() and self.prepared_from() == str(inputs["source"])
            return prepared if ok else None
        old = read_json(self.output(stage))
        if not old or any(old.get(k) != v for k, v in inputs.items()):
            return None
        return old
