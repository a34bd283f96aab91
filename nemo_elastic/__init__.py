"""nemo_elastic: one hybrid Mamba2 / attention / MLP LLM as a family of nested models
(Nemotron Elastic) on Megatron-Core.  See README.md; the CLI is `nemo-elastic`."""

__version__ = "0.1.0"
