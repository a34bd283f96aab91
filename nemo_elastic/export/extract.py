"""Parent checkpoint + hard `SubNetwork` -> a standalone checkpoint of the smaller plain model.

    extract_checkpoint("runs/x/checkpoints", subnet, "runs/x/extracted_4b")

The parent is loaded whole in one process (TP=1/PP=1, any stored layout is resharded on load),
sliced by `nemo_elastic.export.slicing.slice_model`, and the child saved as an ordinary
nemo_elastic checkpoint (kind "extract") whose config is the child's (heterogeneous sizes in
`model.per_layer`); `nemo_elastic.json` also records the sub-network and the parent path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Union

from nemo_elastic.checkpoint import (
    CheckpointError, config_from_checkpoint, load_checkpoint, read_meta, resolve_checkpoint,
    save_checkpoint)
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.export.common import (
    build_tp1_model, peak_rss_mib, tp1_runtime)
from nemo_elastic.export.slicing import slice_model

logger = logging.getLogger(__name__)


def extract_checkpoint(ckpt: str | Path, subnet: Union[SubNetwork, Mapping[str, Any]],
                       out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the checkpoint of `subnet` (a SubNetwork or its `to_dict()`) of parent `ckpt`.

    `ckpt` may be a checkpoint directory or a run's `checkpoints/` (its `latest` is used).
    Raises CheckpointError if `out` exists and not `overwrite` or the parent is unreadable,
    ConfigError if `subnet` is not a sub-network of the parent.  Returns `out`.
    """
    start = time.perf_counter()
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{str(out)!r} already exists; pass overwrite=True (--overwrite) "
                              "to replace it")
    if not isinstance(subnet, SubNetwork):
        subnet = SubNetwork.from_dict(subnet)
    meta = read_meta(ckpt)
    cfg = config_from_checkpoint(ckpt).single_process()
    subnet.validate(cfg.model)  # fail before loading the parent weights
    extra = {"subnetwork": subnet.to_dict(), "parent": str(ckpt),
             "parent_iteration": meta.get("iteration")}
    if meta.get("hf_passthrough"):  # token ids of an imported HF model: keep them for export
        extra["hf_passthrough"] = meta["hf_passthrough"]
    with tp1_runtime():
        parent = build_tp1_model(cfg)  # local spec, uninitialized: overwritten by the load
        load_checkpoint(ckpt, model=parent, restore_rng=False)
        child_cfg, child = slice_model(parent, cfg, subnet, spec_backend="local")
        del parent
        save_checkpoint(out, cfg=child_cfg, model=child, kind="extract", extra_meta=extra,
                        overwrite=overwrite)
    logger.info("extracted %s (%s) -> %s in %.1f s, peak RSS %.0f MiB", ckpt,
                subnet.describe(cfg.model), out, time.perf_counter() - start, peak_rss_mib())
    return out
