"""Conversions of nemo_elastic checkpoints: Hugging Face NemotronH import/export, and slicing a
parent into a smaller sub-network model (`slicing`, `extract`), and a trained budget of an
elastic checkpoint by name (`family`); `budgets.export_budgets`: trained budgets as verified
Megatron (`megatron_format`) or Hugging Face (+ tokenizer, `hf_per_layer`) folders."""

from nemo_elastic.export.hf_adapter import (
    HFConfigError, hf_config_from_model, load_hf_config, model_config_from_hf, tensor_maps)
from nemo_elastic.export.hf_export import DEFAULT_MAX_SHARD_BYTES, export_hf
from nemo_elastic.export.extract import extract_checkpoint, extract_checkpoints
from nemo_elastic.export.budgets import (
    FORMATS, BudgetExport, ExportError, export_budget_hf, export_budgets, export_to)
from nemo_elastic.export.family import (
    budget_subnetwork, extract_budget, extract_family, family_of)
from nemo_elastic.export.hf_per_layer import load_hf_per_layer
from nemo_elastic.export.megatron_format import load_exported_model, load_plain_hybrid_model
from nemo_elastic.export.hf_import import import_hf
from nemo_elastic.export.slicing import SlicingError, child_config, slice_model, slice_state_dict

__all__ = [
    "FORMATS", "BudgetExport", "ExportError", "export_budgets", "export_to", "load_hf_per_layer",
    "load_exported_model", "load_plain_hybrid_model",
    "DEFAULT_MAX_SHARD_BYTES", "HFConfigError", "SlicingError", "budget_subnetwork",
    "child_config", "export_budget_hf", "export_hf", "extract_budget", "extract_checkpoint",
    "extract_checkpoints", "extract_family", "family_of", "hf_config_from_model", "import_hf",
    "load_hf_config", "model_config_from_hf", "slice_model", "slice_state_dict", "tensor_maps",
]
