"""`nemo-elastic eval`: load checkpoints as plain models; validation loss, answer accuracy and
greedy decoding speed.

    evaluate_checkpoint("runs/tiny")                      # CLI: its stored config, prints a table
    evaluate_models(cfg, {"50pct": Path("runs/tiny/family/50pct"), ...}, speed=True)

`evaluate_models` evaluates several checkpoints (of any shapes, e.g. an exported budget family)
in one process on ONE protocol - `cfg`'s data section and `train.eval_iters` /
`train.eval_accuracy_samples` - so their numbers compare; the main job's report uses it.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

from nemo_elastic import runtime
from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint, read_meta, \
    resolve_checkpoint
from nemo_elastic.config import Config
from nemo_elastic.data.loaders import build_training_data
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.report.common import fmt_loss, fmt_pct, format_table
from nemo_elastic.training.evaluation import answer_accuracy_of, eval_microbatches, \
    validation_loss

logger = logging.getLogger(__name__)

SPEED_PROMPTS = 4  # validation prompts decoded greedily for tokens/s
SPEED_NEW_TOKENS = 32
SPEED_ROUNDS = 2


def decode_speed(model, data, *, prompts: int = SPEED_PROMPTS,
                 max_new_tokens: int = SPEED_NEW_TOKENS) -> Optional[float]:
    """Greedy decoding tokens/s of a one-process model on the first validation prompts (one
    prompt at a time, stateful: prompt prefilled once, then one token's forward per new token,
    as `generate`); one warm-up prompt first.  None without prompts (indexed data)."""
    from nemo_elastic.data.protocol import document_ids
    from nemo_elastic.inference import generate_ids

    problems = (data.val_problems or [])[:prompts]
    if not problems:
        return None
    tok = data.tokenizer
    ids = [document_ids(tok, p.prompt, append_eod=False) for p in problems]
    kwargs = dict(max_new_tokens=max_new_tokens, eod_id=tok.eod_id, vocab_size=tok.vocab_size)
    generate_ids(model, [ids[0]], **kwargs)  # warm-up
    start, produced = time.perf_counter(), 0
    for prompt in ids:
        produced += len(generate_ids(model, [prompt], **kwargs)[0].tokens)
    seconds = time.perf_counter() - start
    return produced / seconds if seconds > 0 else None


def evaluate_models(cfg: Config, checkpoints: dict[str, Path], *, speed: bool = False,
                    progress: bool = False) -> list[dict]:
    """One row per checkpoint: {name, checkpoint, iteration, budget, parameters, val_loss,
    answer_accuracy, tokens_per_s}.  Each model is built from its own checkpoint's model
    section; data and evaluation settings are `cfg`'s.  One process (TP=PP=1)."""
    from nemo_elastic.training.loop import global_param_count

    run_cfg = cfg.single_process()
    rows, models = [], []
    info = runtime.initialize(run_cfg.parallel, cfg.train.seed)
    try:
        data = build_training_data(run_cfg, info)
        from tqdm import tqdm

        for name, path in tqdm(checkpoints.items(), total=len(checkpoints), unit="checkpoint",
                               desc="evaluation (checkpoints)", disable=not progress or
                               len(checkpoints) < 2, dynamic_ncols=True):
            path = resolve_checkpoint(path)
            meta = read_meta(path)
            model_cfg = config_from_checkpoint(path).single_process().model
            model = build_hybrid_model(run_cfg.with_model(model_cfg))
            load_checkpoint(path, model=model, restore_rng=False)
            model.eval()
            logger.info("evaluating %s (%s): validation loss, greedy answer accuracy",
                        name, path)
            loss = validation_loss(run_cfg, model, data, eval_microbatches(run_cfg, info), info)
            accuracy = answer_accuracy_of(run_cfg, model, data, info, progress=progress)
            rows.append({
                "name": name, "checkpoint": str(path), "iteration": meta.get("iteration"),
                "budget": meta.get("budget"), "parameters": global_param_count(model),
                "val_loss": loss,
                "answer_accuracy": None if accuracy is None else accuracy["accuracy"],
                "tokens_per_s": None})
            if speed:
                models.append(model)
        if speed:
            for row, speed_value in zip(rows, interleaved_speeds(models, data,
                                                                 progress=progress)):
                row["tokens_per_s"] = speed_value
    finally:
        runtime.destroy()
    return rows


def interleaved_speeds(models: list, data, rounds: int = SPEED_ROUNDS, *,
                       progress: bool = False) -> list[Optional[float]]:
    """Median decoding tokens/s of each model over `rounds` rounds that visit every model in
    turn, so a slower or busier moment of the machine hits every model alike."""
    import statistics

    from tqdm import tqdm

    if not models:
        return []
    logger.info("greedy decoding speed of %d model(s): %d interleaved rounds of %d prompts",
                len(models), rounds, SPEED_PROMPTS)
    samples: list[list[float]] = [[] for _ in models]
    with tqdm(total=rounds * len(models), desc="decoding speed (models x rounds)", unit="model",
              disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for _ in range(rounds):
            for k, model in enumerate(models):
                value = decode_speed(model, data)
                if value is not None:
                    samples[k].append(value)
                bar.update()
    return [statistics.median(v) if v else None for v in samples]


def evaluate_checkpoint(ckpt: str, overrides=(), *, speed: bool = False,
                        progress: bool = True) -> dict:
    """`nemo-elastic eval`: the checkpoint (or a run's latest) with its stored config (+
    overrides): validation loss over `train.eval_iters` x `data.global_batch_size` sequences,
    answer accuracy, optionally decoding speed.  Logs a table; returns the result."""
    path = resolve_checkpoint(ckpt)
    cfg = config_from_checkpoint(path, overrides)
    if cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size > 1:
        return _evaluate_parallel(path, cfg)
    # One "eval iteration" covers a global batch (as in training: `eval_microbatches`), so the
    # loss matches the one logged while training.
    row = evaluate_models(cfg, {"model": path}, speed=speed, progress=progress)[0]
    return result_record(path, cfg, row["val_loss"], row["answer_accuracy"], row["parameters"],
                   row["iteration"], row["tokens_per_s"])


def _evaluate_parallel(path: Path, cfg: Config) -> dict:
    """TP/PP > 1 (under torchrun): loss through the pipeline schedule, accuracy skipped."""
    info = runtime.initialize(cfg.parallel, cfg.train.seed)
    try:
        model = build_hybrid_model(cfg)
        load_checkpoint(path, model=model, restore_rng=False)
        data = build_training_data(cfg, info)
        loss = validation_loss(cfg, model, data, eval_microbatches(cfg, info), info)
        accuracy = answer_accuracy_of(cfg, model, data, info)
        from nemo_elastic.training.evaluation import to_every_stage

        loss = to_every_stage(loss)
    finally:
        runtime.destroy()
    return result_record(path, cfg, loss, None if accuracy is None else accuracy["accuracy"], None,
                   read_meta(path).get("iteration"), None)


def result_record(path: Path, cfg: Config, loss: float, accuracy: Optional[float],
            parameters: Optional[int], iteration, tokens_per_s: Optional[float]) -> dict:
    from nemo_elastic.data.loaders import build_tokenizer

    d, t = cfg.data, cfg.train
    return {"checkpoint": str(path), "iteration": iteration, "parameters": parameters,
            "val_loss": loss, "uniform_loss": math.log(build_tokenizer(cfg).vocab_size),
            "answer_accuracy": accuracy, "tokens_per_s": tokens_per_s,
            "protocol": {"seq_length": d.seq_length,
                         "val_sequences": t.eval_iters * d.global_batch_size,
                         "accuracy_problems": t.eval_accuracy_samples if accuracy is not None
                         else 0}}


def format_result(result: dict) -> str:
    """The `eval` table (the same number formats as every other report)."""
    p = result["protocol"]
    rows = [("checkpoint", result["checkpoint"]), ("iteration", str(result["iteration"])),
            ("parameters", "n/a" if result["parameters"] is None else f"{result['parameters']:,}"),
            ("validation loss", f"{fmt_loss(result['val_loss'])} (first {p['val_sequences']} "
                                f"validation sequences of {p['seq_length']} tokens)"),
            ("uniform-guess loss", fmt_loss(result["uniform_loss"])),
            ("answer accuracy (greedy)", fmt_pct(result["answer_accuracy"]) + (
                f" ({p['accuracy_problems']} problems)" if result["answer_accuracy"] is not None
                else "")),
            ("decoding speed", "not measured (add --speed)" if result["tokens_per_s"] is None
             else f"{result['tokens_per_s']:.1f} tokens/s (greedy, batch 1, KV cache + Mamba state)")]
    return format_table(("metric", "value"), rows)


def check_result(result: dict) -> None:
    """A non-finite validation loss means the checkpoint's weights are not usable (the run that
    wrote it diverged): one line, not a table or JSON holding NaN."""
    from nemo_elastic.errors import UserError

    loss = result.get("val_loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        raise UserError(f"checkpoint {result['checkpoint']!r}: validation loss is {loss}: its "
                        "weights are not usable (the training that wrote it diverged); "
                        "evaluate an earlier checkpoint or retrain with a lower learning rate")


def result_json(result: dict) -> str:
    """The result as strict JSON (a non-finite number becomes null, never NaN)."""
    from nemo_elastic.report.common import strict_json

    return strict_json(result, indent=2)


def check_result_path(path: Path, field_name: str = "--out") -> None:
    """The result file `path` is not a directory (checked before an evaluation, too)."""
    from nemo_elastic.errors import UserError

    if Path(path).is_dir():
        raise UserError(f"{field_name}={str(path)!r} is a directory; pass a file name, e.g. "
                        f"{field_name} {Path(path) / 'eval.json'}")
    if Path(path).exists() and not _is_result(Path(path)):
        raise UserError(f"{field_name}={str(path)!r} exists and is not an earlier `eval` result "
                        "(which it would replace); choose another file name, or move it")


def _is_result(path: Path) -> bool:
    """`path` holds a result `write_result` wrote (one checkpoint's, or --all-budgets')."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "checkpoint" in data and \
        ("val_loss" in data or "budgets" in data)


def write_result(result: dict, path: Path, field_name: str = "--out") -> Path:
    from nemo_elastic.checkpoint import write_text_durably
    from nemo_elastic.errors import output_path_error

    path = Path(path)
    check_result_path(path, field_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_durably(path, result_json(result))
    except OSError as err:
        raise output_path_error(field_name, path, err) from None
    return path
