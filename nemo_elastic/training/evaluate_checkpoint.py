"""`nemo-elastic eval`: load a checkpoint with its stored config; report loss and accuracy."""

from __future__ import annotations

import logging
import math

from nemo_elastic import runtime
from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint, resolve_checkpoint
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.data.loaders import build_training_data
from nemo_elastic.training.evaluation import answer_accuracy_of, validation_loss
from nemo_elastic.report import format_table

logger = logging.getLogger(__name__)


def evaluate_checkpoint(ckpt: str, overrides=()) -> dict:
    path = resolve_checkpoint(ckpt)
    cfg = config_from_checkpoint(path, overrides)
    info = runtime.initialize(cfg.parallel, cfg.train.seed)
    try:
        model = build_hybrid_model(cfg)
        load_checkpoint(path, model=model, restore_rng=False)
        data = build_training_data(cfg, info)
        per_step = cfg.data.micro_batch_size * info.dp_size
        num_micro = max(1, cfg.data.global_batch_size // per_step)
        loss = validation_loss(cfg, model, data, num_micro, info)
        accuracy = answer_accuracy_of(cfg, model, data, info)
        result = {"checkpoint": str(path), "val_loss": loss,
                  "uniform_loss": math.log(data.tokenizer.vocab_size),
                  "answer_accuracy": None if accuracy is None else accuracy["accuracy"]}
        if info.is_main:
            rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()]
            logger.info("evaluation\n%s", format_table(("metric", "value"), rows))
        return result
    finally:
        runtime.destroy()
