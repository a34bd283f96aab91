"""The hybrid Mamba2 / attention / MLP parent model on Megatron-Core."""

from nemo_elastic.model.build import build_hybrid_model, module_parameters, transformer_config
from nemo_elastic.model.mamba import NemoMambaMixer
from nemo_elastic.model.specs import hybrid_stack_spec, local_hybrid_stack_spec, te_hybrid_stack_spec
from nemo_elastic.model.stack import NemoHybridStack

__all__ = [
    "NemoHybridStack", "NemoMambaMixer", "build_hybrid_model", "module_parameters",
    "hybrid_stack_spec", "local_hybrid_stack_spec", "te_hybrid_stack_spec", "transformer_config",
]
