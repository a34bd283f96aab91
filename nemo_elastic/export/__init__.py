"""Conversions of nemo_elastic checkpoints: Hugging Face NemotronH import/export, and slicing a
parent into a smaller sub-network model (`slicing`, `extract`)."""

from nemo_elastic.export.hf_adapter import (
    HFConfigError, hf_config_from_model, load_hf_config, model_config_from_hf, tensor_maps)
from nemo_elastic.export.hf_export import DEFAULT_MAX_SHARD_BYTES, export_hf
from nemo_elastic.export.extract import extract_checkpoint
from nemo_elastic.export.hf_import import import_hf
from nemo_elastic.export.slicing import SlicingError, child_config, slice_model, slice_state_dict

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES", "HFConfigError", "SlicingError", "child_config", "export_hf",
    "extract_checkpoint", "hf_config_from_model", "import_hf", "load_hf_config",
    "model_config_from_hf", "slice_model", "slice_state_dict", "tensor_maps",
]
