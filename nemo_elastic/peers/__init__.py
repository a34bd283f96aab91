"""Adapters to peer tools that derive smaller models from a parent (optional `peers` extra).

`nemo_elastic.peers.modelopt_minitron`: NVIDIA ModelOpt's `mcore_minitron` pruning of this
project's `HybridModel` on CPU.  Nothing here is imported by the core package.
"""
