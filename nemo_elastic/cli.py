"""`nemo-elastic` command line.

    nemo-elastic run        [--config conf/tiny.yaml] [key=value ...]   the main job (embedded default):
                                                                        pretrain, prepare, zero-shot budgets, train,
                                                                        export, evaluate, report.md
    nemo-elastic pretrain   [--config conf/tiny.yaml] [key=value ...]   train the parent
    nemo-elastic train      [--config conf/tiny.yaml] [key=value ...]   elastic distillation (all budgets)
    nemo-elastic info       CKPT [--json]                               a checkpoint's budget family
    nemo-elastic eval       --ckpt CKPT [--all-budgets] [--json] [--out FILE] [key=value ...]
                                                                        validation loss + answer accuracy
    nemo-elastic prepare    --ckpt CKPT --out CKPT [--config CONF]       importance scores + reordering
    nemo-elastic preprocess --input FILE --tokenizer tokenizer.json --out PREFIX
    nemo-elastic import-hf  DIR --out CKPT                              nemotron_h -> Megatron checkpoint
    nemo-elastic export     --ckpt CKPT (--budget NAME [--budget NAME ...] | --all)
                            --format megatron|hf --out DIR             trained budgets -> DIR/<name>,
                                                                        each reloaded and verified
    nemo-elastic extract    --ckpt CKPT --out CKPT (--budget NAME | --all | --subnet FILE |
                            --hidden-size N ...)                        slice a sub-network out
    nemo-elastic generate   --ckpt CKPT --budget NAME [--budget NAME ...] --prompt TEXT
                            [--max-new-tokens N] [--temperature T --top-k K --seed S]
                                                                        text at trained budgets

Errors in user input (config, checkpoint, data files) print one line naming the field/path and
the fix, and exit with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from nemo_elastic.config import ConfigError, load_config
from nemo_elastic.errors import UserError, setup_logging, user_error_line
from nemo_elastic.sizes import MOE_FIELDS, SIZE_FIELDS
from nemo_elastic.checkpoint_commands import budget_size_line as _budget_size, \
    size_line as _size_line

logger = logging.getLogger("nemo_elastic")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "tiny.yaml"


def _default_config() -> Path:
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    return Path("conf/tiny.yaml")


# ------------------------------------------------------------------------------------ commands

def cmd_run(args) -> int:
    from nemo_elastic.main_job import run

    cfg = load_config(args.config or _default_config(), args.overrides)
    result = run(cfg, resume=not args.no_resume, progress=not args.no_progress)
    if result and result.get("report"):
        print(f"report: {result['report']}", flush=True)
    return 0


def cmd_pretrain(args) -> int:
    from nemo_elastic.training.pretrain import pretrain

    cfg = load_config(args.config or _default_config(), args.overrides)
    result = pretrain(cfg, resume=not args.no_resume, progress=not args.no_progress)
    ratio = result.final_val_loss / result.uniform_loss
    logger.info("validation loss %.4f vs uniform-guess %.4f (ratio %.2f)", result.final_val_loss,
                result.uniform_loss, ratio)
    return 0


def cmd_train(args) -> int:
    from nemo_elastic.training.train import train

    cfg = load_config(args.config or _default_config(), args.overrides)
    train(cfg, resume=not args.no_resume, progress=not args.no_progress)
    return 0


def cmd_check(args) -> int:
    """Validate a recipe (+ overrides) for a world size without running anything: what a Slurm
    dry run calls, so a job that would fail at start-up fails before it is queued."""
    cfg = load_config(args.config or _default_config(), args.overrides)
    par = cfg.parallel
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if args.world_size is not None and (args.world_size < 1 or args.world_size % model_parallel):
        raise ConfigError(f"--world-size={args.world_size}: not a multiple of "
                          f"parallel.tensor_model_parallel_size x pipeline_model_parallel_size = "
                          f"{model_parallel}; change TP, PP or the number of ranks")
    if args.command_name == "train" and cfg.elastic is None:
        raise ConfigError("train: the recipe has no elastic: section (budgets, curriculum); "
                          "add one (see conf/tiny.yaml)")
    dp = "" if args.world_size is None else f", DP={args.world_size // model_parallel}"
    print(f"recipe OK for {args.command_name}: TP={par.tensor_model_parallel_size} "
          f"PP={par.pipeline_model_parallel_size}{dp}, pattern {cfg.model.hybrid_layer_pattern}",
          flush=True)
    return 0


def cmd_info(args) -> int:
    import json

    from nemo_elastic.checkpoint_commands import checkpoint_info, format_info

    info = checkpoint_info(args.ckpt)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = format_info(info)
    if table is not None:
        print(table)
    return 0


def cmd_eval(args) -> int:
    from nemo_elastic.training.evaluate_checkpoint import check_result, check_result_path, \
        evaluate_checkpoint, format_result, result_json, write_result

    if args.out:  # before the evaluation, not after it
        from nemo_elastic.checkpoint import resolve_checkpoint
        from nemo_elastic.run.paths import check_output_location, checkpoint_inputs

        check_output_location(args.out, "--out",
                              checkpoint_inputs(resolve_checkpoint(args.ckpt)))
        check_result_path(Path(args.out))
    if args.all_budgets:
        from nemo_elastic.training.evaluate_budgets import check_all_budgets, \
            evaluate_all_budgets, format_all_budgets

        result = evaluate_all_budgets(args.ckpt, overrides=args.overrides, speed=args.speed,
                                      progress=not args.no_progress)
        check_all_budgets(result)
        if args.out:
            write_result(result, Path(args.out))
        print(result_json(result) if args.json else format_all_budgets(result), flush=True)
        return 0
    result = evaluate_checkpoint(args.ckpt, overrides=args.overrides, speed=args.speed,
                                 progress=not args.no_progress)
    check_result(result)
    if args.out:
        write_result(result, Path(args.out))
        logger.info("wrote %s", args.out)
    # stdout carries the result: a table, or JSON for scripts
    print(result_json(result) if args.json else format_result(result), flush=True)
    return 0


def cmd_prepare(args) -> int:
    from nemo_elastic.importance.prepare import prepare

    data_config = load_config(args.config).data if args.config else None
    path = prepare(args.ckpt, args.out, num_batches=args.num_batches,
                   aggregation=args.aggregation, depth_method=args.depth_method,
                   overwrite=args.overwrite, depth_batches=args.depth_batches,
                   mamba_signal=args.mamba_signal,
                   mamba_channel_order=args.mamba_channel_order,
                   overrides=args.overrides, data_config=data_config,
                   progress=not args.no_progress)
    logger.info("prepared (importance-reordered) checkpoint: %s; rankings in %s", path,
                Path(path) / "ranking.json")
    return 0


def cmd_preprocess(args) -> int:
    from nemo_elastic.data import HFTokenizer, preprocess_to_indexed
    from nemo_elastic.data.preprocess import check_preprocess_output
    from nemo_elastic.run.paths import check_outputs

    # (a missing or directory input is refused by its own, more precise check below)
    check_outputs([f"{args.out}.bin", f"{args.out}.idx"], "--out",
                  {flag: path for flag, path in (("--input", args.input),
                                                 ("--tokenizer", args.tokenizer))
                   if Path(path).is_file()})
    check_preprocess_output(args.out, overwrite=args.overwrite)
    tokenizer = HFTokenizer(args.tokenizer, eod_token=args.eod_token)
    stats = preprocess_to_indexed(args.input, tokenizer, args.out, json_key=args.json_key,
                                  append_eod=not args.no_eod, show_progress=not args.no_progress)
    logger.info("wrote %s.bin/.idx: %s", args.out, stats)
    return 0


def cmd_import_hf(args) -> int:
    from nemo_elastic.export import import_hf

    path = import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    logger.info("imported %s -> %s", args.hf_dir, path)
    return 0


def cmd_export(args) -> int:
    from nemo_elastic.checkpoint_commands import export

    export(args.ckpt, args.out, budget=args.budget, format=args.format, overwrite=args.overwrite,
           all_budgets=args.all, hf_per_layer=args.hf_per_layer,
           allow_unordered=args.allow_unordered)
    return 0


SIZE_FLAGS = ("hidden_size", *SIZE_FIELDS, "drop_layers")


def _subnetwork_from_args(args, model_cfg):
    """--subnet FILE (YAML/JSON of SubNetwork.to_dict()) or uniform per-axis flags."""
    from nemo_elastic.elastic import SubNetwork

    if args.subnet:
        from nemo_elastic.config_io import load_yaml

        data = load_yaml(args.subnet, "--subnet")
        if not isinstance(data, dict):
            raise ConfigError(f"--subnet={args.subnet!r}: holds {type(data).__name__}, not a "
                              "sub-network mapping (SubNetwork.to_dict(): hidden_size, layers)")
        try:
            return SubNetwork.from_dict(data)
        except (KeyError, TypeError, AttributeError) as err:  # a wrong shape of the mapping
            raise ConfigError(f"--subnet={args.subnet!r}: not a sub-network file ({type(err).__name__}"
                              f": {err}); write it with SubNetwork.to_dict()") from None
    drop = parse_int_list(args.drop_layers, "--drop-layers", low=0, high=model_cfg.num_layers - 1,
                          what="global layer indices")
    if len(drop) >= model_cfg.num_layers:
        raise ConfigError(f"--drop-layers={args.drop_layers!r}: drops all {model_cfg.num_layers} "
                          "layers; keep at least one")
    sizes = [getattr(args, f) for f in SIZE_FLAGS if f != "drop_layers"]
    if not drop and all(v is None for v in sizes):
        raise ConfigError("extract: no size given, so the output would be a copy of the parent; "
                          "pass --budget NAME, --all, --subnet FILE or at least one size flag "
                          "(e.g. --hidden-size N, --drop-layers 1,3)")
    return SubNetwork.uniform(
        model_cfg, hidden_size=args.hidden_size, mamba_num_heads=args.mamba_num_heads,
        mamba_head_dim=args.mamba_head_dim, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, drop_layers=drop,
        **{f: getattr(args, f) for f in MOE_FIELDS})


def parse_int_list(text: Optional[str], flag: str, *, low: int, high: int, what: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5]; a malformed number, an index outside [low, high] or a repeated one
    raises one line naming the flag."""
    if not text or not text.strip():
        return []
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"{flag}={text!r}: {item!r} is not an integer; pass comma-separated "
                              f"{what}, e.g. {flag} 1,3") from None
        if not low <= value <= high:
            raise ConfigError(f"{flag}={text!r}: {value} is outside [{low}, {high}] ({what})")
        if value in values:
            raise ConfigError(f"{flag}={text!r}: {value} is given twice")
        values.append(value)
    return values


def _check_extract_selection(args) -> None:
    """Exactly one way to choose the sub-network: a trained budget (--budget / --all), a file
    (--subnet) or the size flags; mixing them would leave one silently ignored."""
    sizes = [f"--{f.replace('_', '-')}" for f in SIZE_FLAGS if getattr(args, f)]
    chosen = [flag for flag, given in (("--budget", args.budget is not None), ("--all", args.all),
                                       ("--subnet", bool(args.subnet))) if given]
    if len(chosen) + (1 if sizes else 0) > 1:
        raise ConfigError(
            f"extract: {' and '.join(chosen + sizes)} cannot be combined; choose the sub-network "
            "with one of --budget NAME, --all, --subnet FILE or the size flags")


def cmd_extract(args) -> int:
    from nemo_elastic.checkpoint import config_from_checkpoint, resolve_checkpoint
    from nemo_elastic.export import extract_budget, extract_checkpoint, extract_family

    _check_extract_selection(args)
    ckpt = resolve_checkpoint(args.ckpt)
    parent = config_from_checkpoint(ckpt).model
    if args.all:
        paths = extract_family(ckpt, args.out, overwrite=args.overwrite)
        for name, path in paths.items():
            logger.info("extracted budget %r -> %s: %s", name, path, _budget_size(ckpt, name))
        return 0
    if args.budget is not None:
        path = extract_budget(ckpt, args.budget, args.out, overwrite=args.overwrite)
        logger.info("extracted budget %r of %s -> %s: %s", args.budget, ckpt, path,
                    _budget_size(ckpt, args.budget))
        return 0
    subnet = _subnetwork_from_args(args, parent).validate(parent)
    if subnet.is_full(parent):
        given = " ".join(f"--{f.replace('_', '-')} {getattr(args, f)}" for f in SIZE_FLAGS
                         if getattr(args, f)) or f"--subnet {args.subnet}"
        raise ConfigError(f"extract: {given} keeps every size of the parent, so the output "
                          "would be a copy of it; pass a smaller size (e.g. --hidden-size "
                          f"{parent.hidden_size // 2}) or --drop-layers")
    path = extract_checkpoint(ckpt, subnet, args.out, overwrite=args.overwrite)
    logger.info("extracted %s -> %s: %s", ckpt, path, _size_line(parent, subnet))
    return 0


def cmd_generate(args) -> int:
    from nemo_elastic.checkpoint_commands import generate, print_completion

    generate(args.ckpt, args.budget, args.prompt, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, seed=args.seed,
             on_completion=print_completion)
    return 0


# ------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nemo-elastic", description="Nested (many-in-one) hybrid Mamba2/attention/MLP LLMs "
        "on Megatron-Core (Nemotron Elastic).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def train_args(p, config_required: bool):
        p.add_argument("--config", required=config_required, default=None, action=_Once,
                       help="YAML recipe (default: the embedded conf/tiny.yaml); one per run: "
                            "override keys with key=value, replace a mapping with "
                            "key={a: 1, b: 2}")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="OmegaConf overrides, e.g. train.iters=100 parallel.tensor_model_parallel_size=2")
        p.add_argument("--no-resume", action="store_true",
                       help="ignore checkpoints in output_dir and start from scratch")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("run", help="the main job: pretrain, importance-reorder, zero-shot "
                       "budgets, elastic distillation, export and evaluate every budget, "
                       "OUTPUT_DIR/report.md (default config: the embedded conf/tiny.yaml)")
    train_args(p, config_required=False)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("pretrain", help="train the hybrid parent")
    train_args(p, config_required=False)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="elastic distillation: router + every budget from a frozen "
                       "teacher, curriculum stages (the recipe's `elastic:` section)")
    train_args(p, config_required=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="validate a recipe (+ overrides) for a world size, run "
                       "nothing (the Slurm scripts' dry run calls it)")
    train_args(p, config_required=False)
    p.add_argument("--world-size", type=int, default=None, help="number of ranks of the job")
    p.add_argument("--for", dest="command_name", default="pretrain",
                   choices=["pretrain", "train", "run"], help="the command the recipe is for")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("info", help="a checkpoint's kind, iteration and trained budget family")
    p.add_argument("ckpt", help="checkpoint dir (or a run's output dir: latest)")
    p.add_argument("--json", action="store_true", help="machine-readable: one entry per budget")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="validation loss and greedy answer accuracy of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint dir (or a run's output dir: latest)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--speed", action="store_true",
                   help="also measure greedy decoding tokens/s (one process)")
    p.add_argument("--all-budgets", action="store_true",
                   help="an elastic checkpoint: every trained budget, each sliced out and "
                        "evaluated as the model it exports to (one table)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prepare", help="score every axis and layer on calibration data, then "
                       "reorder the weights so every budget is a prefix")
    p.add_argument("--ckpt", required=True, help="parent checkpoint (or a run's output dir)")
    p.add_argument("--out", required=True, help="output (prepared) checkpoint directory")
    p.add_argument("--config", default=None,
                   help="recipe whose `data` section supplies the calibration data "
                        "(default: the checkpoint's own)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--num-batches", type=int, default=16, help="calibration micro-batches")
    p.add_argument("--depth-batches", type=int, default=None,
                   help="batches for the depth ranking (default: all)")
    p.add_argument("--aggregation", default="mean/l2",
                   help="SEQUENCE/BATCH reductions, each of sum|mean|l2 (or 'sum')")
    p.add_argument("--depth-method", default="iterative",
                   choices=["iterative", "one_shot", "cosine"])
    p.add_argument("--mamba-signal", default="output", choices=["x", "output"],
                   help="activations scoring Mamba heads/channels: output (default: what "
                        "out_proj reads) or x (paper: in_proj's x block)")
    p.add_argument("--mamba-channel-order", default="per_head", choices=["per_head", "shared"],
                   help="Mamba head channels: per_head (default: each head sorted by its own "
                        "scores) or shared (paper Eq. 3: one order for every head)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("preprocess", help="text/jsonl -> Megatron indexed dataset (.bin/.idx)")
    p.add_argument("--input", required=True, help=".txt (documents separated by blank lines) "
                   "or .jsonl (one document per line)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--json-key", default="text", help="jsonl field holding the text")
    p.add_argument("--eod-token", default=None, help="end-of-document token (default: auto)")
    p.add_argument("--no-eod", action="store_true", help="do not append the eod token")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing PREFIX.bin/.idx that preprocess wrote")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("import-hf", help="Hugging Face nemotron_h folder -> Megatron checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export", help="trained budgets of an elastic checkpoint -> one verified "
                       "Megatron or Hugging Face folder each (or a checkpoint -> nemotron_h)")
    p.add_argument("--ckpt", required=True, help="checkpoint dir (or a run's output dir: latest)")
    p.add_argument("--budget", action="append", default=None, metavar="NAME",
                   help="a trained budget (see `info`), exported to OUT/NAME; repeatable")
    p.add_argument("--all", action="store_true", help="every trained budget, OUT/<name> each")
    p.add_argument("--format", default="hf", choices=["megatron", "hf"],
                   help="megatron: dist checkpoint + megatron_config.json (plain megatron-core "
                        "HybridModel); hf: nemotron_h safetensors + tokenizer (default)")
    p.add_argument("--hf-per-layer", action="store_true",
                   help="hf: write heterogeneous budgets with a per-layer config.json extension "
                        "(loads with nemo_elastic.export.load_hf_per_layer, not stock transformers)")
    p.add_argument("--out", required=True, help="output folder (budgets: one sub-folder each)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-unordered", action="store_true",
                   help="export a family whose sizes are not in the order of their targets "
                        "(refused by default; see `nemo-elastic info`)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("extract", help="slice a sub-network out of a checkpoint (zero-shot)")
    p.add_argument("--ckpt", required=True, help="parent checkpoint (or a run's output dir)")
    p.add_argument("--out", required=True, help="output checkpoint directory (--all: one "
                   "sub-folder per budget under it)")
    p.add_argument("--budget", default=None, metavar="NAME",
                   help="a trained budget of an elastic checkpoint (see `nemo-elastic info`)")
    p.add_argument("--all", action="store_true", help="every trained budget, into OUT/<name>")
    p.add_argument("--subnet", help="YAML/JSON sub-network (SubNetwork.to_dict() format)")
    for flag in ("hidden-size", "mamba-num-heads", "mamba-head-dim", "num-attention-heads",
                 "ffn-hidden-size", *(f.replace("_", "-") for f in MOE_FIELDS)):
        p.add_argument(f"--{flag}", type=int, default=None,
                       help="uniform size for every layer (default: the parent's)")
    p.add_argument("--drop-layers", default="", help="comma-separated global layer indices")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("generate", help="complete a prompt at one or more trained budgets of "
                       "an elastic checkpoint (loaded once; each budget runs sliced)")
    p.add_argument("--ckpt", required=True, help="elastic checkpoint (or a run's output dir)")
    p.add_argument("--budget", action="append", required=True, metavar="NAME",
                   help="a trained budget (see `nemo-elastic info`); repeat for several "
                        "(each completion is then printed as '[NAME] text')")
    p.add_argument("--prompt", required=True,
                   help="text to complete (a newline in bash: $'Q:1+2=?\\nS:')")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    previous = _sigterm_interrupts()
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines print above progress bars, not through them
            return args.func(args)
    except (UserError, OSError) as err:  # errors.user_error_line: one line, exit 2
        return _user_error(user_error_line(err))
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (see _sigterm_interrupts): one line
        signum = getattr(err, "signum", signal.SIGINT)
        logger.error("%s interrupted by %s: an unfinished output is never published (its "
                     "hidden staging folder is removed now or by the next run); rerun the same "
                     "command", args.command,
                     signal.Signals(signum).name)
        return 128 + int(signum)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (staging removed)."""

    signum = signal.SIGTERM


def _sigterm_interrupts():
    """SIGTERM unwinds as an exception (cleanup runs, one line, exit 143) instead of killing the
    process mid-write.  Training installs its own handler (StopRequest: checkpoint, then exit)
    while it runs, which takes precedence."""
    def handler(signum, frame):
        raise _Terminated(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)  # the previous handler, restored after


def _user_error(line: str) -> int:
    """Log the one-line error; under torchrun also hand it to torchelastic's error file, so
    the `ChildFailedError` summary torchrun prints last shows this line (not only 'To enable
    traceback see ...')."""
    import json
    import time

    logger.error("%s", line)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as fp:
                json.dump({"message": f"nemo_elastic: {line}", "timestamp": int(time.time())},
                          fp)
        except OSError:
            pass  # the log line above is still there
    return 2


class _Once(argparse.Action):
    """An option that may be given once: a second --config would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        previous = getattr(namespace, self.dest, None)
        if previous is not None:
            parser.error(f"{option_string} is given twice ({previous!r}, {values!r}); one recipe "
                         "per run: change keys with key=value overrides (a mapping value "
                         "such as elastic.budgets={full: 1.0, half: 0.5} replaces the recipe's)")
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the command, the problem, where to look)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


if __name__ == "__main__":
    sys.exit(main())
