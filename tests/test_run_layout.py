"""The run folder has one owner and the checkpoint store serves any trainer.

* No module outside `nemo_elastic/run/` builds a path from a file name of the run layout
  (`out / "checkpoints"`, `out / "summary.json"`, ...): the names are spelled once, in
  `run/run_dir.py`, `run/main_job_dir.py` and `checkpoint/names.py`.
* `CheckpointMeta` reads the metadata of every format written so far (before checksums, before
  the seal, with a family) and writes back exactly what it read, so old checkpoints keep their
  seal; a corrupt field is one line naming it.
* The store saves and loads a mapping of stateful parts it knows nothing about: a part with
  `state_dict` / `load_state_dict` is restored, a plain value comes back as it was.
"""

import ast
import json
from pathlib import Path

import pytest
import torch

from nemo_elastic.checkpoint import CheckpointError, CheckpointMeta, checkpoint_meta, \
    load_parts, meta_digest, save_parts
from nemo_elastic.checkpoint.integrity import META_SHA_KEY
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.runtime import set_seed
from tests.conftest import perturb, tiny_config

PACKAGE = Path(__file__).resolve().parent.parent / "nemo_elastic"
# (`config.json` is left out: it is also the Hugging Face folder format's file, which export/
# spells as that format's own)
LAYOUT_NAMES = {"checkpoints", "summary.json", "pipeline.json", "zero_shot.json",
                "evaluation.json", "training_curve.json", "family.json", "answer_examples.json",
                "metrics.jsonl",
                "prepared", "elastic", "bridge", "latest", ".lock"}
OWNERS = {"run", "checkpoint"}  # nemo_elastic/run/*, nemo_elastic/checkpoint/*


def test_no_module_outside_the_owners_builds_a_run_layout_path():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
                    and isinstance(node.right, ast.Constant) and node.right.value in LAYOUT_NAMES:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} / "
                                 f"{node.right.value!r}")
    assert not offenders, offenders


def _family_row(name: str) -> dict:
    return {"name": name, "subnetwork": {"hidden_size": 32}, "target": 0.5,
            "budget_type": "params", "parameters": 1000, "parameter_fraction": 0.5}


@pytest.mark.parametrize("fmt", ["no checksums", "no seal", "sealed, with a family"])
def test_checkpoint_meta_reads_every_format_and_writes_it_back_unchanged(fmt):
    raw = {"format_version": 1, "kind": "pretrain", "iteration": 30, "config": {"model": {}},
           "has_optimizer": True, "parallel_layout": [1, 1], "segment": "pretrain"}
    if fmt != "no checksums":
        raw["checksums"] = {"__0_0.distcp": {"bytes": 3, "sha256": "ab"}}
    if fmt == "sealed, with a family":
        raw.update(kind="elastic", family=[_family_row("full"), _family_row("half")],
                   fingerprint={"seed": 1})
        raw[META_SHA_KEY] = meta_digest(raw)
    meta = CheckpointMeta.from_dict(json.loads(json.dumps(raw)))
    assert (meta.kind, meta.iteration, meta.has_optimizer) == (raw["kind"], 30, True)
    assert meta.family == raw.get("family")
    assert meta.extra.get("segment") == "pretrain"
    written = meta.sealed() if META_SHA_KEY in raw else meta.as_dict()
    assert written == raw  # the same keys and values: the seal of an old file still holds


def test_checkpoint_meta_names_a_corrupt_field():
    raw = {"kind": "elastic", "iteration": 3, "config": {},
           "family": [{"name": "full", "subnetwork": {}, "parameters": "many"}]}
    with pytest.raises(CheckpointError, match=r"family\['full'\]\.parameters\W+ is 'many'"):
        CheckpointMeta.from_dict(raw, "ckpt")


class Counter:
    """A stateful part the store has never heard of."""

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_the_store_saves_and_restores_parts_it_does_not_know(megatron_env, tmp_path):
    cfg = tiny_config()
    set_seed(1)
    source = perturb(build_hybrid_model(cfg))
    meta = checkpoint_meta(cfg, kind="test", iteration=7, has_optimizer=False,
                           extra={"note": "kept"})
    path = save_parts(tmp_path / "ckpt", {"model": source, "counter": Counter(5),
                                          "iteration": 7, "label": "x"}, meta)
    set_seed(2)
    target, counter = build_hybrid_model(cfg), Counter(0)
    state = load_parts(path, {"model": target, "counter": counter})
    assert counter.value == 5 and state["label"] == "x" and state["iteration"] == 7
    assert state["meta"]["note"] == "kept" and state["meta"]["kind"] == "test"
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name
