"""The recipe a checkpoint was trained with, and the check that a model matches it."""

from __future__ import annotations

from pathlib import Path

from nemo_elastic.checkpoint.errors import CheckpointError
from nemo_elastic.checkpoint.meta import read_meta
from nemo_elastic.config import Config, ConfigError, load_config, to_dict


def config_from_checkpoint(ckpt_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The checkpoint's stored config with `overrides` applied.  The model's shape is the
    checkpoint's: an override that changes it (beyond where the pipeline stages split) is an
    error naming the field, the checkpoint's value and the fix."""
    meta = read_meta(ckpt_dir)
    try:
        stored = load_config(base=meta["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: stored config is invalid: {err}") from err
    if not overrides:
        return stored
    cfg = load_config(base=meta["config"], overrides=overrides)
    check_model_matches(ckpt_dir, stored, cfg)
    return cfg


def model_differences(old: dict, new: dict, keys) -> list[str]:
    """The `keys` (in their order) whose values differ between two `model` sections (dicts),
    `hybrid_layer_pattern` compared without its '|' pipeline-stage boundaries."""
    def same(key: str) -> bool:
        a, b = old.get(key), new.get(key)
        if key == "hybrid_layer_pattern" and isinstance(a, str) and isinstance(b, str):
            return a.replace("|", "") == b.replace("|", "")
        return a == b
    return [key for key in keys if not same(key)]


def check_model_matches(ckpt_dir, stored: Config, cfg: Config,
                        fix: str = "the model's shape comes from the checkpoint: drop the "
                        "override (to slice a smaller model use `nemo-elastic extract`)") -> None:
    """`cfg.model` must be the checkpoint's (`stored.model`) up to where the pipeline stages
    split: else one line naming the field, both values and `fix`."""
    old, new = to_dict(stored.model), to_dict(cfg.model)
    differs = model_differences(old, new, old)
    if differs:
        key = differs[0]
        raise ConfigError(
            f"model.{key}={new.get(key)!r} does not match checkpoint {str(ckpt_dir)!r}, which "
            f"holds model.{key}={old[key]!r}; {fix}")


# The data fields that decide which samples a run draws: a checkpoint's data position counts
# samples of that stream, so on resume they must be the run's (the batch shape, the cache folder
# and the dataset's path may change: a moved dataset, stages with their own shapes).
DATA_STREAM_FIELDS = {"synthetic": ("source", "seed", "synthetic"),
                      "indexed": ("source", "seed", "indexed.split", "indexed.eod_token")}


def check_data_matches(ckpt_dir, stored: Config, cfg: Config, fix: str) -> None:
    """`cfg.data` draws the same sample stream as the checkpoint's (`stored.data`): else one
    line naming the first differing field, both values and `fix`."""
    old, new = to_dict(stored.data), to_dict(cfg.data)

    def leaves(d: dict, key: str):
        value = d
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict):
            for sub in value:
                yield from leaves(d, f"{key}.{sub}")
        else:
            yield key, value

    for key in DATA_STREAM_FIELDS.get(old.get("source"), ("source",)):
        for leaf, before in leaves(old, key):
            after = dict(leaves(new, leaf)).get(leaf)
            if before != after:
                raise ConfigError(
                    f"data.{leaf}={after!r} differs from checkpoint {str(ckpt_dir)!r}, which was "
                    f"trained on data.{leaf}={before!r} (its data position counts samples of "
                    f"that stream); {fix}")
