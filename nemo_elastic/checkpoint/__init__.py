"""Checkpoints: a store of stateful parts on Megatron-Core distributed checkpoints.

    store.py           save / load a mapping of stateful parts (model, optimizer, scheduler,
                       data position, router, RNG); the keyword form `save_checkpoint` /
                       `load_checkpoint`
    meta.py            `CheckpointMeta`: the typed `nemo_elastic.json` (family included)
    integrity.py       checksums of every file, the metadata's seal, verification
    durable.py         fsync'd writes and renames
    series.py          a run's `checkpoints/` folder: `iter_*`, `latest`, retention
    stored_config.py   the recipe a checkpoint holds; model-shape checks
    rng.py, optimizer_state.py, writer.py, collective.py, errors.py, names.py   the parts' details
    fingerprint.py     what defines a family and its training; the resume check

This module is the package's public API (what commands, tests and users import).
"""

from nemo_elastic.checkpoint.durable import fsync_tree, replace_durably, write_text_durably
from nemo_elastic.checkpoint.errors import CheckpointError, root_cause
from nemo_elastic.checkpoint.integrity import CHECKSUMS_KEY, META_SHA_KEY, \
    add_checksummed_files, meta_digest, verify_files
from nemo_elastic.checkpoint.meta import FORMAT_VERSION, TRAINING_KINDS, CheckpointMeta, \
    read_json_file, read_meta, verify_checkpoint
from nemo_elastic.checkpoint.names import CHECKPOINTS_DIR, LATEST_FILE, META_FILE
from nemo_elastic.checkpoint.series import latest_checkpoint, prune_checkpoints, \
    resolve_checkpoint
from nemo_elastic.checkpoint.store import Stateful, checkpoint_meta, load_checkpoint, \
    load_parts, save_checkpoint, save_parts
from nemo_elastic.checkpoint.stored_config import check_model_matches, config_from_checkpoint
from nemo_elastic.checkpoint.writer import start_writer_processes


__all__ = [
    "CHECKPOINTS_DIR", "CHECKSUMS_KEY", "FORMAT_VERSION", "LATEST_FILE", "META_FILE",
    "META_SHA_KEY", "TRAINING_KINDS", "CheckpointError", "CheckpointMeta", "Stateful",
    "add_checksummed_files", "checkpoint_meta", "check_model_matches", "config_from_checkpoint",
    "fsync_tree",
    "latest_checkpoint", "load_checkpoint", "load_parts", "meta_digest", "prune_checkpoints",
    "read_json_file", "read_meta", "replace_durably", "resolve_checkpoint", "root_cause",
    "save_checkpoint", "save_parts", "start_writer_processes", "verify_checkpoint",
    "verify_files", "write_text_durably"]
