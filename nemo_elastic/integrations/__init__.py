"""Adapters to NVIDIA's NeMo stack; optional, and nothing else in the package imports them.

- `nemo_run_cli`: the `nemo elastic ...` commands (NeMo-Run entry points, recipe factories,
  local torchrun and Slurm executors).  Needs the `nemo` extra (`nemo-run`).
- `bridge`: Megatron-Bridge forward step, router callback, model provider and recipes.  Needs
  the `bridge` extra; `bridge_import` makes its CPU-importable part load without
  Transformer-Engine.

Both are thin: they call the same functions as the `nemo-elastic` command
(`nemo_elastic.checkpoint_commands`, `training/`, `importance/`).
"""
