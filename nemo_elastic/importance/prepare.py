"""`prepare`: score a parent checkpoint, reorder its weights, write the prepared checkpoint.

    from nemo_elastic.importance.prepare import prepare
    prepare("runs/tiny", "runs/tiny/prepared", num_batches=32)

Steps (paper-digest §4): load the parent at TP=1, PP=1 with its stored config -> calibration
batches from the training data -> width scores (activation hooks) and depth rankings
(normalized-MSE of logits, iterative / one-shot, and 1 - cosine) -> permute every width axis
once, most important first -> `save_checkpoint(kind="prepared")`.  The prepared model computes
the same function as the parent; every `SubNetwork` budget is now its most important prefix.

Runs at TP=1 / PP=1 because reordering needs whole tensors (`permute.py`); any checkpoint
reshards on load, and the prepared checkpoint loads at any TP / PP.  Launched on several
processes (torchrun), the processes are data-parallel replicas: each scores its share of the
calibration batches and the sums are all-reduced (the scores themselves work at any TP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from tqdm import tqdm

from nemo_elastic import runtime
from nemo_elastic.checkpoint import (CheckpointError, config_from_checkpoint, load_checkpoint,
                                     resolve_checkpoint, save_checkpoint)
from nemo_elastic.config import Config, ConfigError, load_config, to_dict
from nemo_elastic.errors import check_output_path
from nemo_elastic.importance.aggregate import Aggregation
from nemo_elastic.importance.depth import METHODS, depth_rankings
from nemo_elastic.importance.hooks import DEFAULT_MAMBA_SIGNAL
from nemo_elastic.importance.order import (DEFAULT_MAMBA_CHANNEL_ORDER, MAMBA_CHANNEL_ORDERS,
                                           permutations_from_scores)
from nemo_elastic.importance.permute import permute_model_
from nemo_elastic.report.importance import plot_layer_importance, ranking_document, write_ranking
from nemo_elastic.importance.scores import compute_scores

logger = logging.getLogger(__name__)

RANKING_FILE = "ranking.json"
PLOT_FILE = "layer_importance.png"
PREPARED_KIND = "prepared"


def calibration_batches(data, num_batches: int, *, progress: bool = True) -> list[dict]:
    """The next `num_batches` micro-batches of this rank's training iterator."""
    return [next(data.train_iter) for _ in tqdm(range(num_batches), desc="calibration data",
                                                 unit="batch", disable=not progress,
                                                 dynamic_ncols=True)]


def prepare(ckpt: Union[str, Path], out: Union[str, Path], *, num_batches: int = 16,
            aggregation: Union[Aggregation, str, None] = "mean/l2",
            depth_method: str = "iterative", overwrite: bool = False,
            mamba_top_channels: float = 1.0, mamba_signal: str = DEFAULT_MAMBA_SIGNAL,
            mamba_channel_order: str = DEFAULT_MAMBA_CHANNEL_ORDER,
            depth_batches: Optional[int] = None,
            depth_max_rounds: Optional[int] = None, overrides: Sequence[str] = (),
            data_config=None, progress: bool = True) -> Path:
    """Importance-reorder the parent checkpoint `ckpt`; write the prepared checkpoint to `out`.

    Args:
        ckpt: a checkpoint directory, or a run's output / `checkpoints` directory (-> latest).
        out: the new checkpoint directory; it also receives `ranking.json` (per axis and layer:
            the permutation applied and the sorted scores; every depth method's order and
            scores) and `layer_importance.png` (per-layer normalized MSE, coloured by type).
        num_batches: calibration micro-batches (of `data.micro_batch_size` x `data.seq_length`
            tokens) from the training data, per data-parallel rank.
        aggregation: reductions over sequence and samples: 'SEQ/BATCH' with each of sum, mean,
            l2 (default 'mean/l2', Minitron's best; 'sum' is the paper's plain sums).
        depth_method: 'iterative' (paper), 'one_shot' or 'cosine': which ranking becomes the
            checkpoint's `layer_ranking` (all three are computed and written to ranking.json).
        overwrite: replace `out` if it exists.
        mamba_top_channels: fraction of head channels (by score) used to score Mamba heads.
        mamba_signal: activations that score Mamba heads/channels: 'output' (default: what
            out_proj reads; better zero-shot prefixes on the tiny model) or 'x' (the paper's
            in_proj x block).
        mamba_channel_order: 'per_head' (default: each Mamba head's channels sorted by that
            head's own scores, so a head-dim prefix keeps every head's own best channels) or
            'shared' (paper Eq. 3: one channel order for all heads of a layer).
        depth_batches: calibration batches used for the depth rankings (default: all); the
            iterative ranking costs about L^2/2 forwards per batch for L layers.
        depth_max_rounds: stop the iterative removal after this many rounds.
        overrides: `key=value` config overrides (e.g. data settings for calibration).
        data_config: a `DataConfig` replacing the stored `data` section (calibration data from
            another recipe), applied before `overrides`.
        progress: show progress bars.

    Returns the prepared checkpoint's path.  The stored config is the parent's (unchanged); the
    metadata adds `importance` (a summary) and `layer_ranking` (least important layer first).
    """
    if mamba_channel_order not in MAMBA_CHANNEL_ORDERS:
        raise ConfigError(f"mamba_channel_order (--mamba-channel-order)={mamba_channel_order!r}: "
                          f"must be one of {MAMBA_CHANNEL_ORDERS}")
    if depth_method not in METHODS:
        raise ConfigError(f"depth_method={depth_method!r}: must be one of {METHODS}")
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ConfigError(f"num_batches (--num-batches)={num_batches!r}: must be a positive "
                          "integer")
    if depth_batches is not None and not 1 <= depth_batches <= num_batches:
        raise ConfigError(f"depth_batches (--depth-batches)={depth_batches!r}: must be in [1, "
                          f"num_batches={num_batches}] (or None for all)")
    agg = Aggregation.parse(aggregation)
    src = resolve_checkpoint(ckpt)
    out = Path(out)
    from nemo_elastic.run.paths import check_output_location, checkpoint_inputs

    # never into, over or under the parent it reads (nor into another run's checkpoints)
    check_output_location(out, "--out", checkpoint_inputs(src), error=CheckpointError)
    check_output_path(out, "--out", overwrite, CheckpointError)
    cfg = config_from_checkpoint(src)
    if data_config is not None:
        cfg = dataclasses.replace(cfg, data=data_config)
    if overrides:
        from nemo_elastic.checkpoint import check_model_matches

        stored, cfg = cfg, load_config(base=to_dict(cfg), overrides=overrides)
        check_model_matches(src, stored, cfg)
    run_cfg = cfg.single_process()
    from nemo_elastic.run.output_lock import output_lock

    # one writer per output folder (rank 0 holds the lock; the other ranks write nothing)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with output_lock(out, "--out", error=CheckpointError) if main_rank else \
            contextlib.nullcontext():
        return _prepare_locked(src, out, cfg, run_cfg, agg=agg, num_batches=num_batches,
                               depth_method=depth_method, overwrite=overwrite,
                               mamba_top_channels=mamba_top_channels, mamba_signal=mamba_signal,
                               mamba_channel_order=mamba_channel_order,
                               depth_batches=depth_batches, depth_max_rounds=depth_max_rounds,
                               progress=progress)


def _prepare_locked(src, out, cfg, run_cfg, *, progress, **kwargs) -> Path:
    info = runtime.initialize(run_cfg.parallel, cfg.train.seed)
    try:
        return _prepare(src, out, cfg, run_cfg, info, progress=progress and info.is_main, **kwargs)
    finally:
        runtime.destroy()


def _prepare(src: Path, out: Path, cfg: Config, run_cfg: Config, info, *, agg, num_batches,
             depth_method, overwrite, mamba_top_channels, mamba_signal, mamba_channel_order,
             depth_batches, depth_max_rounds, progress) -> Path:
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.data.loaders import build_training_data

    model = build_elastic_model(run_cfg)
    load_checkpoint(src, model=model, restore_rng=False)
    data = build_training_data(run_cfg, info)
    batches = calibration_batches(data, num_batches, progress=progress)

    scores = compute_scores(model, batches, run_cfg.model, agg,
                            mamba_top_channels=mamba_top_channels, mamba_signal=mamba_signal,
                            num_batches=len(batches),
                            progress=progress)
    started = time.perf_counter()
    depth = depth_rankings(model, batches[:depth_batches], run_cfg.model,
                           max_rounds=depth_max_rounds, progress=progress)
    depth_seconds = time.perf_counter() - started
    perms = permutations_from_scores(scores, run_cfg.model,
                                     mamba_channel_order=mamba_channel_order)
    permute_model_(model, run_cfg.model, perms)

    summary = {**scores.summary(), "num_batches": num_batches, "mamba_signal": mamba_signal,
               "mamba_channel_order": mamba_channel_order,
               "source": str(src),
               "depth_method": depth_method, "depth_batches": depth_batches or num_batches,
               "depth_seconds": round(depth_seconds, 3), "data_parallel_size": info.dp_size,
               "ranking_file": RANKING_FILE}
    save_checkpoint(out, cfg=cfg, model=model, kind=PREPARED_KIND, overwrite=overwrite,
                    field_name="--out", extra_meta={"importance": summary,
                                "layer_ranking": depth[depth_method].order})
    if info.is_main:
        write_ranking(out / RANKING_FILE, ranking_document(scores, perms, depth, depth_method))
        plot_layer_importance(depth, run_cfg.model, out / PLOT_FILE, selected=depth_method)
        from nemo_elastic.checkpoint import add_checksummed_files

        add_checksummed_files(out, [RANKING_FILE])  # read by `train` (the layer ranking)
        _log_summary(run_cfg, depth, depth_method, scores.seconds, depth_seconds, out)
    return out


def _log_summary(cfg: Config, depth, selected: str, score_s: float, depth_s: float,
                 out: Path) -> None:
    from nemo_elastic.report.common import format_table

    symbols = cfg.model.layer_symbols
    position = {j: k + 1 for k, j in enumerate(depth[selected].order)}
    fmt = lambda r, j: "-" if r not in depth or j not in depth[r].scores else f"{depth[r].scores[j]:.4g}"  # noqa: E731
    rows = [(j, symbols[j], fmt("one_shot", j), fmt("iterative", j), fmt("cosine", j), position[j])
            for j in range(len(symbols))]
    logger.info("layer importance (drop order: 1 = first)\n%s", format_table(
        ("layer", "type", "one-shot nMSE", "iterative nMSE", "1-cos", f"{selected} order"), rows))
    logger.info("prepared checkpoint %s (width scores %.1f s, depth %.1f s)", out, score_s, depth_s)
