"""Zero-shot quality of prefixes: the uniform-fraction `SubNetwork` of a parent.

Used to check what reordering buys before any elastic training: after `prepare`, the prefix
sub-network at 50% of every width axis should lose far less than a prefix of a randomly ordered
model (`bench/bench_importance.py`).  Its loss and accuracy come from the one evaluation path,
`nemo_elastic.training.evaluation` (`validation_loss(..., subnetwork=)`).
"""

from __future__ import annotations

from nemo_elastic.config import ModelConfig
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.sizes import GROUPED


def _scaled(full: int, fraction: float, multiple: int = 1) -> int:
    """round(full * fraction) as a positive multiple of `multiple` (groups keep equal sizes)."""
    units = full // multiple
    return multiple * max(1, min(units, int(units * fraction + 0.5)))


def fractional_subnetwork(model: ModelConfig, fraction: float) -> SubNetwork:
    """`fraction` of every width axis in every layer: hidden, Mamba heads (per group) and head
    channels, attention heads (per query group), FFN neurons; no layer dropped."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r}: must be in (0, 1]")
    subnet = SubNetwork.full(model)
    subnet = SubNetwork(hidden_size=_scaled(model.hidden_size, fraction), layers=subnet.layers)
    for i, layer in enumerate(subnet.layers):
        changes = {f: _scaled(v, fraction, getattr(model, GROUPED[f]) if f in GROUPED else 1)
                   for f, v in layer.sizes().items()}
        subnet = subnet.replace_layer(i, **changes)
    return subnet.validate(model)
