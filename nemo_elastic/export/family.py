"""The trained budget family of an elastic checkpoint, by name: extract or export one budget.

    family_of("runs/x/elastic/checkpoints")            # {"full": SubNetwork, "50pct": ...}
    extract_budget(ckpt, "50pct", "out")               # -> out (Megatron checkpoint)
    extract_family(ckpt, "out")                        # every budget -> out/<name>
    budgets.export_budget_hf(ckpt, "50pct", "hf_50pct")   # -> Hugging Face nemotron_h
    budgets.export_budgets(ckpt, "out", None, format="megatron")   # verified, all or none

`nemo-elastic train` writes the family (one row per budget, `subnetwork` = SubNetwork.to_dict())
into every checkpoint's `nemo_elastic.json`; everything here reads it from there, so a budget
is always the sub-network that was trained, never a re-derived one.  All slicing goes through
`extract.extract_checkpoints` (-> `slicing.slice_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_elastic.checkpoint import CheckpointError, read_meta, resolve_checkpoint
from nemo_elastic.config import ConfigError
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.export.extract import extract_checkpoints

logger = logging.getLogger(__name__)


def family_of(ckpt: str | Path) -> dict[str, SubNetwork]:
    """{budget name: trained SubNetwork} of an elastic checkpoint, in training order.

    Raises CheckpointError when the checkpoint holds no family (not written by `nemo-elastic
    train`)."""
    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    rows = meta.get("family")
    if not rows:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} (kind {meta.get('kind')!r}) holds no trained budget family: "
            "it was not written by `nemo-elastic train`; pass a checkpoint of an elastic run"
            f"{_elastic_run_inside(ckpt)} (explicit sizes: `nemo-elastic extract --subnet FILE` "
            "or its size flags)")
    family = {}
    for row in rows:
        try:
            family[row["name"]] = SubNetwork.from_dict(row["subnetwork"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: nemo_elastic.json is corrupt (the sub-network of "
                f"budget {row['name']!r} is unreadable: {type(err).__name__}: {err}); restore "
                "the file from a copy or use an earlier checkpoint") from None
    return family


def _elastic_run_inside(ckpt: Path) -> str:
    """', e.g. RUN/elastic' when `ckpt` is the latest checkpoint (the parent) of a main job's
    run folder that holds an elastic run (`run_dir.elastic_run_beside`)."""
    from nemo_elastic.run.run_dir import elastic_run_beside

    inner = elastic_run_beside(ckpt)
    return f", e.g. {str(inner)!r}" if inner is not None else ""


def budget_subnetwork(ckpt: str | Path, name: str) -> SubNetwork:
    """The trained SubNetwork of budget `name`; ConfigError listing the trained names if unknown."""
    family = family_of(ckpt)
    if name not in family:
        where = str(resolve_checkpoint(ckpt))
        raise ConfigError(f"--budget {name!r}: no such trained budget in {where!r}; "
                          f"trained budgets: {', '.join(family)}")
    return family[name]


def folder_name(name: str) -> str:
    """A budget name as one path component (names come from the recipe: refuse '/', '..')."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"budget name {name!r} cannot be used as a folder name; extract it "
                          "alone with --budget and an explicit --out")
    return name


def extract_budget(ckpt: str | Path, name: str, out: str | Path, *,
                   overwrite: bool = False) -> Path:
    """Megatron checkpoint of trained budget `name` in `out`."""
    subnet = budget_subnetwork(ckpt, name)
    return extract_checkpoints(ckpt, {out: subnet}, overwrite=overwrite,
                               extra_meta={out: {"budget": name}})[0]


def extract_family(ckpt: str | Path, out: str | Path, *,
                   overwrite: bool = False) -> dict[str, Path]:
    """Every trained budget as a Megatron checkpoint `out/<name>` (parent loaded once);
    returns {name: path}."""
    family = family_of(ckpt)
    targets = {name: Path(out) / folder_name(name) for name in family}
    paths = extract_checkpoints(
        ckpt, {targets[name]: subnet for name, subnet in family.items()}, overwrite=overwrite,
        extra_meta={targets[name]: {"budget": name} for name in family})
    return dict(zip(family, paths))
