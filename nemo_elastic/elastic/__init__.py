"""Elastic (nested) sub-networks of the hybrid parent: description, masks, Megatron subclasses."""

from nemo_elastic.elastic.subnet import LayerChoice, SubNetwork

__all__ = ["LayerChoice", "SubNetwork"]
