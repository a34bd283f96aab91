"""Elastic distillation of every budget at once (paper-digest §5-§6).

- `schedule`: the curriculum (stages, their iterations, data sizes, budget probabilities,
  tokens seen) and the router's learning-rate factor; pure Python, the one place every reader
  (trainer, main job, report, recipe validation, Bridge) asks;
- `step`: the forward step (budget sampling, student forward, KD + budget loss);
- `trainer`: `ElasticTrainer`, the shared `Trainer` loop with the router's own optimizer.

The command itself (`nemo-elastic train`: build, run, closing report) is `training.train`.
This file imports nothing, so recipe validation can use `schedule` without torch.
"""
