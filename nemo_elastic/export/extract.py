"""Parent checkpoint + hard `SubNetwork` -> a standalone checkpoint of the smaller plain model.

    extract_checkpoint("runs/x/checkpoints", subnet, "runs/x/extracted_4b")
    extract_checkpoints("runs/x/checkpoints", {"out/4b": subnet_4b, "out/6b": subnet_6b})

The parent is loaded whole in one process (TP=1/PP=1, any stored layout is resharded on load),
sliced by `nemo_elastic.export.slicing.slice_model`, and the child saved as an ordinary
nemo_elastic checkpoint (kind "extract") whose config is the child's (heterogeneous sizes in
`model.per_layer`); `nemo_elastic.json` also records the sub-network and the parent path.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from nemo_elastic.checkpoint import (
    CheckpointError, config_from_checkpoint, load_checkpoint, read_meta, resolve_checkpoint,
    save_checkpoint)
from nemo_elastic.errors import check_output_path
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.export.common import (
    build_tp1_model, peak_rss_mib, tp1_runtime)
from nemo_elastic.export.slicing import slice_model

logger = logging.getLogger(__name__)

SubNetworkLike = Union[SubNetwork, Mapping[str, Any]]


def extract_checkpoint(ckpt: str | Path, subnet: SubNetworkLike, out: str | Path, *,
                       overwrite: bool = False, extra_meta: Optional[dict] = None) -> Path:
    """Write the checkpoint of `subnet` (a SubNetwork or its `to_dict()`) of parent `ckpt`.

    `ckpt` may be a checkpoint directory or a run's `checkpoints/` (its `latest` is used).
    Raises CheckpointError if `out` exists and not `overwrite` or the parent is unreadable,
    ConfigError if `subnet` is not a sub-network of the parent.  Returns `out`.
    """
    return extract_checkpoints(ckpt, {out: subnet}, overwrite=overwrite,
                               extra_meta={out: extra_meta or {}})[0]


def extract_checkpoints(ckpt: str | Path, targets: Mapping[str | Path, SubNetworkLike], *,
                        overwrite: bool = False,
                        extra_meta: Optional[Mapping[str | Path, dict]] = None) -> list[Path]:
    """`extract_checkpoint` for several sub-networks: {out dir: subnet}; the parent is loaded
    once.  Every output and sub-network is checked before anything is loaded or written, and the
    outputs are written all or none: each child is saved into a hidden staging folder next to
    its output and moved into place only once every child is written (a failure, Ctrl-C or
    SIGTERM leaves nothing).  No output may overlap the parent checkpoint or another run
    (`paths.check_output_location`); each output folder is locked while written
    (`output_lock`), so a second writer refuses.  `extra_meta[out]` goes into that child's
    `nemo_elastic.json`.  Returns the output paths in the order given."""
    from nemo_elastic.export.staging import staging as staged_output
    from nemo_elastic.run.output_lock import output_locks
    from nemo_elastic.run.paths import check_output_location, checkpoint_inputs

    start = time.perf_counter()
    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    cfg = config_from_checkpoint(ckpt).single_process()
    paths = [Path(out) for out in targets]
    groups: dict[Path, list[Path]] = {}  # output parent -> outputs (one staging folder each)
    for path in paths:
        groups.setdefault(Path(os.path.abspath(path)).parent, []).append(path)
    # lock the folder a command creates: the shared parent of several outputs (extract --all's
    # --out), else the output itself
    units = [parent if len(outs) > 1 else outs[0] for parent, outs in groups.items()]
    inputs = checkpoint_inputs(ckpt)
    for path in dict.fromkeys([*units, *paths]):  # the folder the user named first
        check_output_location(path, "--out", inputs, error=CheckpointError)
    with output_locks(units, "--out", error=CheckpointError):
        plan: list[tuple[Path, SubNetwork, dict]] = []
        for out, subnet in targets.items():
            path = Path(out)
            check_output_path(path, "--out", overwrite, CheckpointError)
            if not isinstance(subnet, SubNetwork):
                subnet = SubNetwork.from_dict(subnet)
            subnet.validate(cfg.model)  # fail before loading the parent weights
            extra = {"subnetwork": subnet.to_dict(), "parent": str(ckpt),
                     "parent_iteration": meta.get("iteration"),
                     **((extra_meta or {}).get(out) or {})}
            if meta.get("hf_passthrough"):  # token ids of an imported HF model: keep them
                extra["hf_passthrough"] = meta["hf_passthrough"]
            plan.append((path, subnet, extra))
        with tp1_runtime():
            parent = build_tp1_model(cfg)  # local spec, uninitialized: overwritten by the load
            load_checkpoint(ckpt, model=parent, restore_rng=False)
            for folder, outs in groups.items():
                name = None if len(outs) > 1 else outs[0].name  # the locked folder's name
                with staged_output(folder, name, overwrite=overwrite) as (staging, commit):
                    staged = {}
                    for path, subnet, extra in plan:
                        if path not in outs:
                            continue
                        child_cfg, child = slice_model(parent, cfg, subnet, spec_backend="local")
                        staged[str(path)] = staging / path.name
                        save_checkpoint(staged[str(path)], cfg=child_cfg, model=child,
                                        kind="extract", extra_meta=extra, field_name="--out")
                        del child  # one child in memory at a time next to the parent
                        logger.info("extracted %s (%s) -> %s", ckpt,
                                    subnet.describe(cfg.model), path)
                    commit(staged, {str(path): path for path in outs})
            del parent
    logger.info("extracted %d sub-network(s) of %s in %.1f s, peak RSS %.0f MiB", len(plan),
                ckpt, time.perf_counter() - start, peak_rss_mib())
    return [path for path, _, _ in plan]
