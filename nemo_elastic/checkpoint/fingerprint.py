"""What defines an elastic run's family and training, recorded in every checkpoint and compared on
resume, so that a changed recipe can never silently continue (or corrupt) a run.

Every elastic checkpoint's `nemo_elastic.json` holds `"fingerprint"`: the budgets by name and
target, the budget type and memory spec, the axes and their resolved choice lists, heterogeneity,
depth choices, the router's shape and mode, the init and teacher checkpoints (path + SHA-256 of
their `nemo_elastic.json`, which lists the SHA-256 of every tensor file), budget sampling, the
seed and the curriculum.  On resume every difference is either

* refused: one line naming the field, the checkpoint's value, the recipe's value and the way out
  (another `elastic.output_dir`); nothing is written, the checkpoint stays untouched; or
* accepted and logged when it is safe by construction: extending the stage in progress (or the
  last one), adding or changing stages not yet started, a moved (same-checksum) init/teacher
  checkpoint, a new order of the same budgets (the router's rows are bound to budget names:
  `permute_router_state`), and the hyperparameters a resume is meant to change
  (`LOGGED_FIELDS`: learning rates, loss weights, execution mode, ...).

`--no-resume` is a deliberate fresh start in the folder: a difference is logged as a WARNING
naming what the new run replaces.  Checkpoints written before the fingerprint existed: the
budgets (names and targets) and budget type recorded in their family are still compared; the
rest cannot be, and a warning says so.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

from nemo_elastic.config import ConfigError

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "fingerprint"
VERSION = 1

# field -> the recipe key a user edits (named in the refusal)
REFUSED_FIELDS = {
    "budget_type": "elastic.budget_type",
    "budgets": "elastic.budgets",
    "memory_spec": "elastic.memory",
    "axes": "elastic.axes",
    "width_fractions": "elastic.width_fractions",
    "choices": "elastic.choices",
    "heterogeneous": "elastic.heterogeneous",
    "depth_choices": "elastic.depth_choices",
    "router_hidden_dim": "elastic.router.hidden_dim",
    "router_mode": "elastic.router.mode",
    # where the router started (its zero-shot offsets are part of its saved state)
    "router_init": "elastic.router (init, init_margin, init_batches)",
    "teacher_mode": "elastic.distill.teacher_mode",
    "budget_sampling": "elastic.budget_sampling",
    "seed": "elastic.seed",
}
# Changes a resume may make on purpose (Megatron-LM's --override-opt_param-scheduler spirit):
# accepted, each logged with both values.
LOGGED_FIELDS = {
    "execution": "elastic.execution",
    "loss": "elastic.loss",
    "distill_temperature": "elastic.distill.temperature",
    "distill_ce_weight": "elastic.distill.ce_weight",
    "router_schedule": "elastic.router (lr, warmup, tau, scale, clipping)",
    "router_options": "elastic.router (family_choice, hard_scale)",
}
# Every `elastic.router` field is recorded: hidden_dim, mode and the init group (refused),
# these two groups (logged).  tests/test_resume_guard.py checks that a new RouterConfig field lands in one.
ROUTER_SCHEDULE_KEYS = ("lr", "warmup_iters", "weight_decay", "clip_grad", "tau_start",
                        "tau_end", "scale_start", "scale_end", "init_std")
ROUTER_OPTION_KEYS = ("family_choice", "hard_scale")  # which choice deploys; the hard scale
ROUTER_INIT_KEYS = ("init", "init_margin", "init_batches")
# Refused fields recorded only since a later version: what every run written before them did
# (a fingerprint without the key), compared on these keys.  Without it a run trained before
# router.init existed (a random start) passed the guard under a zero_shot recipe and failed
# later loading its router ("Missing key(s) prior_hidden ..." blamed on the budgets).
IMPLIED_BEFORE_RECORDED = {"router_init": {"init": "random"}}
CHECKPOINT_FIELDS = {"init_checkpoint": "elastic.init_checkpoint",
                      "teacher": "elastic.distill.teacher"}


def recorded_checkpoints(meta: dict) -> dict[str, str]:
    """{recipe field: path} of the checkpoints the run that wrote `meta` read (its init and
    teacher, as its fingerprint records them); {} for a checkpoint without a fingerprint."""
    recorded = meta.get("fingerprint") or {}
    return {field_name: entry["path"] for key, field_name in CHECKPOINT_FIELDS.items()
            if isinstance(entry := recorded.get(key), dict) and entry.get("path")}


_STAGE_KEYS = ("name", "budget_probs", "seq_length", "global_batch_size", "micro_batch_size")


def checkpoint_digest(ckpt: Optional[Path]) -> Optional[dict]:
    """{"path", "sha256"} of a checkpoint: the SHA-256 of its `nemo_elastic.json`, which itself
    records the size and SHA-256 of every file of the checkpoint (its content identity)."""
    if ckpt is None:
        return None
    from nemo_elastic.checkpoint.names import META_FILE

    path = Path(ckpt)
    meta = path / META_FILE
    digest = hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None
    return {"path": str(path.resolve()), "sha256": digest}


def training_fingerprint(cfg, router, init: Path, teacher: Optional[Path]) -> dict:
    """The fingerprint of the run `cfg` with its built `router` (resolved choice lists)."""
    import dataclasses

    e = cfg.elastic
    r = e.router
    curriculum = []
    for stage in e.curriculum or []:
        curriculum.append({
            "name": stage.name, "iters": int(stage.iters),
            "budget_probs": _normalized(stage.budget_probs, e.budget_names),
            "seq_length": stage.seq_length or cfg.data.seq_length,
            "global_batch_size": stage.global_batch_size or cfg.data.global_batch_size,
            "micro_batch_size": stage.micro_batch_size or cfg.data.micro_batch_size})
    if not curriculum:
        curriculum.append({"name": "elastic", "iters": int(e.iters),
                           "budget_probs": _normalized(None, e.budget_names),
                           "seq_length": cfg.data.seq_length,
                           "global_batch_size": cfg.data.global_batch_size,
                           "micro_batch_size": cfg.data.micro_batch_size})
    return {
        "version": VERSION,
        "budgets": {name: float(target) for name, target in e.budgets.items()},
        "budget_order": list(e.budgets),  # nemo_elastic.json sorts keys: the recipe's order
        "budget_type": e.budget_type,
        "memory_spec": dataclasses.asdict(router.memory_spec) if router.memory_spec else None,
        "axes": list(e.axes),
        "width_fractions": [float(f) for f in e.width_fractions],
        "choices": {axis: [int(c) for c in sizes] for axis, sizes in router.choices.items()},
        "heterogeneous": sorted(e.heterogeneous),
        "depth_choices": sorted(int(c) for c in e.depth_choices),
        "router_hidden_dim": int(r.hidden_dim),
        "router_mode": r.mode,
        "router_init": {k: getattr(r, k) for k in ROUTER_INIT_KEYS},
        "teacher_mode": e.distill.teacher_mode,
        "budget_sampling": e.budget_sampling,
        "seed": int(e.seed),
        "init_checkpoint": checkpoint_digest(init),
        "teacher": None if e.distill.teacher_mode == "trainable" else checkpoint_digest(teacher),
        "execution": e.execution,
        "loss": dataclasses.asdict(e.loss),
        "distill_temperature": float(e.distill.temperature),
        "distill_ce_weight": float(e.distill.ce_weight),
        "router_schedule": {k: getattr(r, k) for k in ROUTER_SCHEDULE_KEYS},
        "router_options": {k: getattr(r, k) for k in ROUTER_OPTION_KEYS},
        "curriculum": curriculum,
    }


def run_fingerprint(cfg, init: Path, teacher: Optional[Path]) -> dict:
    """`training_fingerprint` with a router built here (small, CPU): usable before the model."""
    from nemo_elastic.checkpoint.meta import read_meta
    from nemo_elastic.router import ElasticRouter

    router = ElasticRouter(cfg.model, cfg.elastic, total_iters=cfg.elastic.total_iters,
                           layer_ranking=read_meta(init).get("layer_ranking"))
    return training_fingerprint(cfg, router, init, teacher)


def guard_run_folder(ckpt_root: Path, fingerprint: dict, resume: bool) -> None:
    """Refuse to resume the run in `ckpt_root` (a run's `checkpoints/`) when `fingerprint`
    differs from its latest checkpoint's where unsafe; with --no-resume (`resume=False`, a
    deliberate fresh start in this folder) the difference is a WARNING instead."""
    from nemo_elastic.checkpoint.errors import CheckpointError
    from nemo_elastic.checkpoint.meta import read_meta
    from nemo_elastic.checkpoint.series import latest_checkpoint

    try:
        latest = latest_checkpoint(ckpt_root)
    except CheckpointError:
        if resume:
            raise
        return  # --no-resume over an unreadable checkpoint: the new run replaces it
    if latest is None:
        return
    meta = read_meta(latest)
    try:
        check_resume(latest, meta, fingerprint, int(meta.get("iteration") or 0))
    except ConfigError as err:
        if resume:
            raise
        # --no-resume: the user starts over in this folder on purpose (`run --no-resume`
        # redoes everything); say loudly what is being replaced
        logger.warning("--no-resume in %s, which holds a run of another family or training "
                       "(%s): the new run replaces its checkpoints", ckpt_root.parent,
                       str(err).split(";")[0])


def _normalized(probs: Optional[dict], names: list[str]) -> dict:
    """{budget: probability} as the sampler draws them (missing names: 0; None: uniform)."""
    weights = {n: float((probs or {}).get(n, 0.0)) if probs else 1.0 for n in names}
    total = sum(weights.values())
    return {n: round(w / total, 12) for n, w in weights.items()}


def legacy_fingerprint(meta: dict) -> Optional[dict]:
    """What a checkpoint written before the fingerprint still tells: budgets and budget type."""
    rows = meta.get("family") or []
    if not rows:
        return None
    return {"budgets": {row["name"]: float(row["target"]) for row in rows if "target" in row},
            "budget_type": meta.get("budget_type") or rows[0].get("budget_type")}


def check_resume(ckpt: Path, meta: dict, new: dict, iteration: int) -> None:
    """Refuse (ConfigError, one line) a recipe whose family/training differs from the one that
    wrote checkpoint `ckpt` (at `iteration`); log the differences that are safe."""
    old = meta.get(FINGERPRINT_KEY)
    if not isinstance(old, dict):
        old = legacy_fingerprint(meta)
        if old is None:
            logger.warning("checkpoint %s has no training fingerprint and no family (written by "
                           "an older version): the recipe's budgets, axes, router and teacher "
                           "cannot be compared with the run's; make sure they are unchanged",
                           ckpt)
            return
        logger.warning("checkpoint %s predates the training fingerprint: only the budgets and "
                       "budget type are compared with the recipe (axes, router, teacher, seed "
                       "and sampling cannot be); make sure they are unchanged", ckpt)
    for key, implied in IMPLIED_BEFORE_RECORDED.items():
        now = {k: (new.get(key) or {}).get(k) for k in implied}
        if key not in old and now != implied:
            _refuse(ckpt, REFUSED_FIELDS[key], implied, now, what="the run was written before "
                    "this option was recorded, when every run had it")
    for key, field_name in REFUSED_FIELDS.items():
        if key in old and old[key] != new.get(key):
            before, after = old[key], new.get(key)
            if key == "budgets":  # shown in the recipes' order
                before = {n: before[n] for n in old.get("budget_order", before) if n in before}
            _refuse(ckpt, field_name, before, after)
    for key, field_name in CHECKPOINT_FIELDS.items():
        if key not in old:
            continue
        before, after = old[key], new.get(key)
        if (before or {}).get("sha256") != (after or {}).get("sha256") or \
                (before is None) != (after is None):
            _refuse(ckpt, field_name, _describe(before), _describe(after),
                    what="its contents differ from the checkpoint the run started from" if
                    before and after else None)
        if before and after and before.get("path") != after.get("path"):
            logger.info("%s moved from %s to %s (same contents, SHA-256 %s): accepted",
                        field_name, before["path"], after["path"], after["sha256"][:12])
    if old.get("budget_order") and old["budget_order"] != new["budget_order"]:
        logger.info("the budgets are listed in a new order %s (was %s): the router's rows "
                    "follow the names", new["budget_order"], old["budget_order"])
    for key, field_name in LOGGED_FIELDS.items():
        if key in old and old[key] != new.get(key):
            logger.warning("resuming %s with %s changed: %s -> %s (applies from iteration %d)",
                           ckpt, field_name, old[key], new.get(key), iteration + 1)
    if "curriculum" in old:
        _check_curriculum(ckpt, old["curriculum"], new["curriculum"], iteration)


def _check_curriculum(ckpt: Path, old: list, new: list, iteration: int) -> None:
    """Stages that had started at `iteration` must be unchanged, except the length of the one in
    progress (or of the last, finished one), which may grow or shrink down to `iteration`.
    Stages not yet started may change freely (logged)."""
    begin = 0
    for k, stage in enumerate(old):
        if begin >= iteration:
            break  # stage k had not started
        field_name = f"elastic.curriculum[{k}]"
        if k >= len(new):
            _refuse(ckpt, field_name, stage, None, what="the run had already started it")
        for key in _STAGE_KEYS:
            if stage.get(key) != new[k].get(key):
                _refuse(ckpt, f"{field_name}.{key}", stage.get(key), new[k].get(key),
                        what="the run had already started this stage")
        end_old, end_new = begin + stage["iters"], begin + new[k]["iters"]
        if end_old != end_new:
            if end_old < iteration:
                _refuse(ckpt, f"{field_name}.iters", stage["iters"], new[k]["iters"],
                        what=f"the run finished this stage before iteration {iteration}")
            if end_new < iteration:
                _refuse(ckpt, f"{field_name}.iters", stage["iters"], new[k]["iters"],
                        what=f"the checkpoint is at iteration {iteration}, past the new end")
            logger.warning("stage %r now ends at iteration %d (was %d): accepted; the router's "
                           "temperature and the learning rates follow the new run length",
                           stage["name"], end_new, end_old)
        begin = end_old
    if [s["name"] for s in old] != [s["name"] for s in new] or old != new:
        logger.info("curriculum on resume: %s (was %s)",
                    [(s["name"], s["iters"]) for s in new], [(s["name"], s["iters"]) for s in old])


def _describe(entry: Optional[dict]) -> Any:
    if not entry:
        return None
    return f"{entry.get('path')} (sha256 {str(entry.get('sha256'))[:12]})"


def _refuse(ckpt: Path, field_name: str, old, new, what: Optional[str] = None) -> None:
    reason = f" ({what})" if what else ""
    raise ConfigError(
        f"{field_name}={new!r} differs from the run in {str(ckpt.parent.parent)!r}, whose "
        f"checkpoint {ckpt.name} was trained with {field_name}={old!r}{reason}; a run resumes "
        "with the family and training it started with: restore the old value, or start a new "
        "run in another elastic.output_dir")


def permute_router_state(state: dict, saved_names: list, names: list, ckpt: Path) -> dict:
    """The router's weights (and Adam moments) with its input columns in the order of `names`.

    Each axis router's first layer `routers.<axis>.net.0.weight` is [hidden, n_budgets]: column j
    is budget j's one-hot embedding, so the rows a budget trained are bound to its name, not to
    its position in the recipe.  `state`: {"router": state_dict, "router_optimizer": AdamW
    state_dict} as saved; returned with the columns reordered.  Different name sets are refused
    earlier by the fingerprint; here they would be one line too."""
    import torch

    if list(saved_names) == list(names):
        return state
    if sorted(saved_names) != sorted(names):
        _refuse(ckpt, "elastic.budgets", list(saved_names), list(names),
                what="the router was trained for these budget names")
    from nemo_elastic.router import PRIOR_PREFIX

    order = torch.tensor([list(saved_names).index(n) for n in names])
    # router.init=zero_shot offsets `prior_<axis>` are [n_budgets, rows, choices]: rows by budget
    router = {k: (v[:, order] if k.endswith("net.0.weight") else
                  v[order] if k.startswith(PRIOR_PREFIX) else v)
              for k, v in state["router"].items()}
    opt = state.get("router_optimizer")
    if opt is not None:
        param_names = [k for k in state["router"] if k.endswith(".weight")]
        first = {i for i, k in enumerate(param_names) if k.endswith("net.0.weight")}
        opt = {**opt, "state": {
            i: ({k: (v[:, order] if i in first and torch.is_tensor(v) and v.dim() == 2 else v)
                 for k, v in s.items()}) for i, s in opt["state"].items()}}
    return {**state, "router": router, "router_optimizer": opt}
