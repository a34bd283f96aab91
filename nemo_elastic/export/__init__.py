"""Conversions between nemo_elastic checkpoints and other formats (Hugging Face NemotronH)."""

from nemo_elastic.export.hf_adapter import (
    HFConfigError, hf_config_from_model, load_hf_config, model_config_from_hf, tensor_maps)
from nemo_elastic.export.hf_export import DEFAULT_MAX_SHARD_BYTES, export_hf
from nemo_elastic.export.hf_import import import_hf

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES", "HFConfigError", "export_hf", "hf_config_from_model", "import_hf",
    "load_hf_config", "model_config_from_hf", "tensor_maps",
]
