"""`nemo elastic ...`: the plugin's commands inside NeMo-Run's `nemo` CLI (the `nemo` extra).

Registered through the entry-point group `nemo_run.cli` (setup.py: `elastic = this module`), so
`nemo elastic pretrain | prepare | train | export | info | generate` take NeMo-Run's
`key=value` overrides, `--factory`, `run.executor=...`, `--dryrun`, `--yes`.  Each command is
a thin call of what `nemo-elastic` runs (same options, checks and outputs; a user error is one
line and exit status 2, spelled `overwrite=true` rather than `--overwrite`):

    nemo elastic train --factory tiny recipe.elastic.init_checkpoint=runs/tiny/prepared \\
        recipe.elastic.curriculum[0].iters=20 run.executor=elastic_local \
        run.executor.ntasks_per_node=2 --yes
    nemo elastic export ckpt=runs/tiny/elastic budget=50pct out=runs/hf_50pct --yes
    nemo elastic info ckpt=runs/tiny/elastic

The training commands take the whole recipe (`nemo_elastic.config.Config`) as `recipe`, a
`run.Config` tree of the YAML recipe: every field is a `recipe.<section>.<field>=value` override
and is validated by the recipe's own dataclasses when the task is built.  Recipe factories:
`tiny` (conf/tiny.yaml, CPU) and `nemotron_nano_12b` (the paper's 12B parent -> 9B / 6B).
Executors: `elastic_local` (torchrun with N processes on this machine) and `elastic_slurm`
(nodes, GPUs per node, container image, mounts, account, partition; `--dryrun` prints the sbatch
script).  Without an executor the command runs in this process.
"""


import contextlib
import dataclasses
import json as _json
import logging
import re
import typing
from pathlib import Path
from typing import Any, Optional

import nemo_run as run

from nemo_elastic.config import Config, load_config

logger = logging.getLogger("nemo_elastic")

NAMESPACE = "elastic"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RECIPES = {"tiny": "tiny.yaml", "nemotron_nano_12b": "nemotron_nano_12b.yaml"}


# `nemo-elastic` flags that are booleans: `--overwrite` is `overwrite=true` here.
_BOOLEAN_FLAGS = {"overwrite", "all", "hf_per_layer", "json", "verbose", "yes",
                  "allow_unordered"}


def nemo_spelling(message: str) -> str:
    """A message written for `nemo-elastic` (flags `--format x`, `--overwrite`) in the
    `key=value` spelling of `nemo elastic` (`format=x`, `overwrite=true`)."""
    def one(match: "re.Match") -> str:
        name, separator = match.group(1).replace("-", "_"), match.group(2)
        if name in _BOOLEAN_FLAGS:  # takes no value: what followed the flag stays apart
            return f"{name}=true" + (" " if separator else "")
        return f"{name}="

    # `--flag=value` and `--flag VALUE` (a quoted, capitalised or numeric value) -> `flag=value`
    return re.sub(r"--([a-z][a-z0-9-]*)(=| (?=['\"A-Z0-9<]))?", one, message)


@contextlib.contextmanager
def _job(verbose: bool = False):
    """The same logging as `nemo-elastic`, and its error contract: a user error (bad option,
    missing or damaged file, existing output) is one line on stderr and exit status 2, in the
    `key=value` spelling of this CLI; anything else is a bug and keeps its traceback."""
    from nemo_elastic.errors import UserError, setup_logging, user_error_line

    setup_logging(verbose)
    try:
        yield
    except (UserError, OSError) as err:
        logger.error("%s", nemo_spelling(user_error_line(err)))
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------------ recipes

def _resolve_init_annotations(cls: type, seen: Optional[set] = None) -> None:
    """NeMo-Run types `key=value` overrides by `inspect.signature(cls)`, which leaves the string
    annotations of modules with `from __future__ import annotations` (ours) unresolved ('int'
    instead of int) and then refuses every value.  Give each recipe dataclass's generated
    `__init__` the resolved types (introspection only; the classes are unchanged otherwise)."""
    seen = set() if seen is None else seen
    if cls in seen or not dataclasses.is_dataclass(cls):
        return
    seen.add(cls)
    hints = typing.get_type_hints(cls.__init__)
    cls.__init__.__annotations__ = hints
    stack = list(hints.values())
    while stack:  # every class inside Optional[...], list[...], dict[..., ...]
        hint = stack.pop()
        stack.extend(typing.get_args(hint))
        if isinstance(hint, type):
            _resolve_init_annotations(hint, seen)


_resolve_init_annotations(Config)


def to_run_config(value: Any) -> Any:
    """A validated recipe (nested kw-only dataclasses) -> a `run.Config` tree NeMo-Run can
    override field by field and serialize; building it re-runs every validation."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        _resolve_init_annotations(type(value))  # e.g. StageConfig, held in an untyped list
        kwargs = {f.name: to_run_config(getattr(value, f.name))
                  for f in dataclasses.fields(value) if f.init}
        return run.Config(type(value), **kwargs)
    if isinstance(value, (list, tuple)):
        return [to_run_config(v) for v in value]
    if isinstance(value, dict):
        return {k: to_run_config(v) for k, v in value.items()}
    return value


def recipe(name: str, overrides: tuple[str, ...] | list[str] = ()) -> run.Config[Config]:
    """The named YAML recipe (`RECIPES`) with `nemo-elastic`-style overrides, as a run.Config."""
    if name not in RECIPES:
        from nemo_elastic.errors import ConfigError

        raise ConfigError(f"recipe={name!r}: unknown; choose one of {', '.join(RECIPES)}")
    return to_run_config(load_config(CONF_DIR / RECIPES[name], list(overrides)))


@run.cli.factory(name="tiny")
def tiny() -> run.Config[Config]:
    """conf/tiny.yaml: the 185k-parameter CPU hybrid, budgets 100 / 75 / 50 % (`recipe=tiny`)."""
    return recipe("tiny")


@run.cli.factory(name="nemotron_nano_12b")
def nemotron_nano_12b() -> run.Config[Config]:
    """conf/nemotron_nano_12b.yaml: the paper's 12B parent (TP=8) and its 9B / 6B budgets."""
    return recipe("nemotron_nano_12b")


# ------------------------------------------------------------------------------------ executors

@run.cli.factory(name="elastic_local")
def elastic_local(ntasks_per_node: int = 1) -> run.Config[run.LocalExecutor]:
    """This machine: torchrun with `ntasks_per_node` processes (gloo on CPU, NCCL on GPUs)."""
    return run.Config(run.LocalExecutor, ntasks_per_node=ntasks_per_node, launcher="torchrun",
                      env_vars={"OMP_NUM_THREADS": "1", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"})


def slurm_executor(*, account: str, partition: Optional[str] = None, nodes: int = 1,
                   gpus_per_node: int = 8, container_image: Optional[str] = None,
                   container_mounts: Optional[list[str]] = None, time: str = "04:00:00",
                   job_dir: str = "runs/nemo_run_jobs", max_requeues: int = 20) -> run.SlurmExecutor:
    """Slurm: `nodes` x `gpus_per_node` GPUs; every node runs one torchrun with a worker per GPU
    (NeMo-Run's torchrun launcher).  Exclusive nodes; SIGTERM 5 minutes before the time limit
    makes every rank checkpoint and exit non-zero; the script then requeues the job (at most
    `max_requeues` times) and the rerun resumes from the checkpoint.  Submits with
    `sbatch` on this machine (a login node); scripts and logs go to `job_dir`."""
    return run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node, container_image=container_image,
        container_mounts=list(container_mounts or []), time=time, exclusive=True,
        signal="TERM@300", additional_parameters={"requeue": True}, launcher="torchrun",
        retries=max_requeues,
        env_vars={"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "240"},
        tunnel=run.LocalTunnel(job_dir=str(Path(job_dir).resolve())), packager=run.Packager())


@run.cli.factory(name="elastic_slurm")
def elastic_slurm() -> run.Config[run.SlurmExecutor]:
    """`run.executor=elastic_slurm run.executor.account=A run.executor.partition=P
    run.executor.nodes=2 run.executor.gpus_per_node=8 run.executor.container_image=IMG
    run.executor.container_mounts=[/data:/data]` (see `slurm_executor`)."""
    return run.Config(slurm_executor, account="REPLACE_ME")


def sbatch_script(task, executor: run.SlurmExecutor, name: str = "elastic") -> str:
    """The sbatch script NeMo-Run would submit for `task` (a run.Partial) on `executor`,
    rendered without submitting (`Experiment.dryrun`)."""
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name)
        exp.dryrun(log=False, delete_exp_dir=False)
        scripts = sorted(Path(exp._exp_dir).rglob("*.sh"))
    if not scripts:
        raise RuntimeError(f"NeMo-Run wrote no sbatch script under {exp._exp_dir}")
    return scripts[-1].read_text()


# ------------------------------------------------------------------------------------ commands

def _names(budget: Optional[str]) -> Optional[list[str]]:
    """`budget=9b,6b` -> ["9b", "6b"] (NeMo-Run lists would need quoted strings)."""
    return None if budget is None else [n.strip() for n in str(budget).split(",") if n.strip()]


@run.cli.entrypoint(namespace=NAMESPACE, help="train the hybrid parent (nemo-elastic pretrain)")
def pretrain(recipe: Config, resume: bool = True, verbose: bool = False) -> None:
    from nemo_elastic.training.pretrain import pretrain as _pretrain

    with _job(verbose):
        result = _pretrain(recipe, resume=resume, progress=False)
        logger.info("validation loss %.4f vs uniform-guess %.4f (ratio %.2f)",
                    result.final_val_loss, result.uniform_loss,
                    result.final_val_loss / result.uniform_loss)


@run.cli.entrypoint(namespace=NAMESPACE, help="elastic distillation of every budget "
                    "(nemo-elastic train): router + budgets from a frozen teacher, curriculum")
def train(recipe: Config, resume: bool = True, verbose: bool = False) -> None:
    from nemo_elastic.training.train import train as _train

    with _job(verbose):
        _train(recipe, resume=resume, progress=False)


@run.cli.entrypoint(namespace=NAMESPACE, help="importance scores + reordering "
                    "(nemo-elastic prepare)")
def prepare(ckpt: str, out: str, config: Optional[str] = None, num_batches: int = 16,
            depth_batches: Optional[int] = None, aggregation: str = "mean/l2",
            depth_method: str = "iterative", mamba_signal: str = "output",
            mamba_channel_order: str = "per_head", overwrite: bool = False,
            verbose: bool = False) -> None:
    from nemo_elastic.importance.prepare import prepare as _prepare

    with _job(verbose):
        data_config = load_config(config).data if config else None
        path = _prepare(ckpt, out, num_batches=num_batches, aggregation=aggregation,
                        depth_method=depth_method, overwrite=overwrite, depth_batches=depth_batches,
                        mamba_signal=mamba_signal, mamba_channel_order=mamba_channel_order,
                        data_config=data_config, progress=False)
        logger.info("prepared (importance-reordered) checkpoint: %s; rankings in %s", path,
                    Path(path) / "ranking.json")


@run.cli.entrypoint(namespace=NAMESPACE, help="a checkpoint, or trained budgets of it, -> "
                    "verified Hugging Face or Megatron folders (nemo-elastic export)")
def export(ckpt: str, out: str, budget: Optional[str] = None, all: bool = False,
           format: str = "hf", hf_per_layer: bool = False, overwrite: bool = False,
           allow_unordered: bool = False, verbose: bool = False) -> None:
    """`budget=9b,6b` or `all=true`: one folder per budget under `out` (all or none);
    `allow_unordered=true` exports a family whose sizes are out of order."""
    from nemo_elastic.checkpoint_commands import export as _export

    with _job(verbose):
        _export(ckpt, out, budget=_names(budget), format=format, overwrite=overwrite,
                all_budgets=all, hf_per_layer=hf_per_layer, allow_unordered=allow_unordered)


@run.cli.entrypoint(namespace=NAMESPACE, enable_executor=False, help="a checkpoint's kind, "
                    "iteration and budget family (nemo-elastic info); runs here, read-only")
def info(ckpt: str, json: bool = False, verbose: bool = False) -> None:
    from nemo_elastic.checkpoint_commands import checkpoint_info, format_info

    with _job(verbose):
        data = checkpoint_info(ckpt)
        if json:
            print(_json.dumps(data, indent=2), flush=True)
            return
        table = format_info(data)
        if table is not None:
            print(table, flush=True)


@run.cli.entrypoint(namespace=NAMESPACE, help="complete a prompt at trained budgets "
                    "(nemo-elastic generate)")
def generate(ckpt: str, budget: str, prompt: str, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: Optional[int] = None, seed: Optional[int] = None,
             verbose: bool = False) -> None:
    from nemo_elastic.checkpoint_commands import generate as _generate, print_completion

    with _job(verbose):
        _generate(ckpt, _names(budget), prompt, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, seed=seed, on_completion=print_completion)


# `nemo elastic train --factory tiny` / `--factory nemotron_nano_12b`: whole tasks per recipe.
for _name in RECIPES:
    for _fn in (pretrain, train):
        def _task(_fn=_fn, _name=_name) -> run.Partial:
            return run.Partial(_fn, recipe=recipe(_name))

        _task.__name__ = f"{_name}_{_fn.__name__}"
        _task.__doc__ = f"`{_fn.__name__}` on the {RECIPES[_name]} recipe"
        run.cli.factory(_task, target=_fn, name=_name)
