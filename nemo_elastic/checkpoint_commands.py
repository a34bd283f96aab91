"""What every entry point calls: `nemo-elastic` (cli.py) and `nemo elastic` (NeMo-Run,
integrations/nemo_run_cli.py) run the same functions, so both commands have the same options,
checks and outputs.  Heavy imports stay inside the functions (importing this module is cheap
and needs no torch).

Training jobs already live in their modules (`training.pretrain.pretrain`, `training.train.train`,
`importance.prepare.prepare`); this module holds the checkpoint jobs that used to be written
inside cli.py: `checkpoint_info` / `format_info`, `export`, `generate`, and the size lines shared
by `export` and `extract`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

from nemo_elastic.errors import ConfigError
from nemo_elastic.units import parameters_text, readable_bytes, target_text

logger = logging.getLogger("nemo_elastic")

EXPORT_FORMATS = ("megatron", "hf")


# ------------------------------------------------------------------------------------ info

def checkpoint_info(ckpt) -> dict:
    """{checkpoint, kind, iteration, budgets}: a checkpoint's (or a run dir's latest) metadata
    with its trained budget family (`[]` when it has none)."""
    from nemo_elastic.checkpoint import read_meta, resolve_checkpoint, verify_checkpoint

    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)  # refuses an edited or damaged nemo_elastic.json
    verify_checkpoint(path, meta)  # and a damaged tensor file: what it reports is what loads
    family = meta.get("family") or []
    info = {"checkpoint": str(path), "kind": meta.get("kind"), "iteration": meta.get("iteration"),
            "budgets": family}
    if family:
        from nemo_elastic.family_check import check_family

        try:  # per budget: inside its band?  the family: sizes in the order of the targets?
            info["family_check"] = check_family(family).as_dict()
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass  # a corrupt row: format_info names it
    return info


def format_info(info: dict) -> Optional[str]:
    """The family table of `checkpoint_info(...)` (None without a family); logs the header."""
    from nemo_elastic.report.common import format_table

    logger.info("checkpoint %s: kind %s, iteration %s", info["checkpoint"], info["kind"],
                info["iteration"])
    family = info["budgets"]
    if not family:
        from nemo_elastic.run.run_dir import elastic_run_beside

        inner = elastic_run_beside(info["checkpoint"])
        logger.info("no trained budget family in this checkpoint (written by `%s`; the family "
                    "comes from `nemo-elastic train`%s)", info["kind"],
                    "" if inner is None else f": the elastic run beside it is {inner}")
        return None
    from nemo_elastic.family_check import check_family

    try:
        rows = [(r["name"], target_text(r), r["summary"],
                 parameters_text(r),
                 readable_bytes(r["memory_bytes"])) for r in family]
        check = check_family(family)  # after the rows: a bad row is named by its first field
        bands = check.by_name()
        rows = [(*row, bands[row[0]].band_text) for row in rows]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        from nemo_elastic.checkpoint import META_FILE, CheckpointError

        raise CheckpointError(
            f"checkpoint {str(info['checkpoint'])!r}: {META_FILE} is corrupt (a 'family' row "
            f"lacks or mistypes {err}); restore the file from a copy or use an earlier "
            "checkpoint") from None
    spec = family[0].get("memory_spec", {})
    logger.info("memory: weights + KV cache + Mamba state at batch %s x %s tokens, %s bytes per "
                "parameter / cache element", spec.get("batch_size"), spec.get("seq_length"),
                spec.get("bytes_per_param"))
    log = logger.info if check.ok else logger.warning
    log("family: %s", check.summary())
    return format_table(("budget", "target", "sizes", "parameters", "memory", "inside band?"),
                        rows)


# ------------------------------------------------------------------------------------ export

def export(ckpt, out, *, budget=None, format: str = "hf", overwrite: bool = False,
           all_budgets: bool = False, hf_per_layer: bool = False, allow_unordered: bool = False):
    """A checkpoint (a run dir: its latest) -> HF folder `out`; or trained budgets of it
    (`budget`: a name or a list of names, or `all_budgets`) -> one verified `format` folder per
    budget, `out/<name>` (all or none; `export.budgets.export_budgets`).  Returns the path, or
    {name: path} for budgets."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format={format!r}: choose one of "
                          f"{', '.join(map(repr, EXPORT_FORMATS))}")
    from nemo_elastic.checkpoint import resolve_checkpoint
    from nemo_elastic.export import export_budgets, export_hf

    ckpt = str(resolve_checkpoint(ckpt))  # a run's output dir means its latest
    names = [budget] if isinstance(budget, str) else list(budget or [])
    check_budget_names(names)
    if names and all_budgets:
        raise ConfigError("export: --budget and --all cannot be combined; name budgets with "
                          "--budget NAME (repeatable) or export every trained one with --all")
    if not names and not all_budgets:
        if format != "hf":
            raise ConfigError("export --format megatron needs --budget NAME or --all (a "
                              "checkpoint is already a Megatron checkpoint; `extract` slices "
                              "explicit sizes)")
        path = export_hf(ckpt, out, overwrite=overwrite)
        logger.info("exported %s -> %s (Hugging Face nemotron_h)", ckpt, path)
        return path
    results = export_budgets(ckpt, out, None if all_budgets else names, format=format,
                             overwrite=overwrite, hf_per_layer=hf_per_layer,
                             allow_unordered=allow_unordered)
    for r in results:
        logger.info("exported budget %r of %s -> %s (%s%s): %s", r.name, ckpt, r.path, format,
                    "" if r.plain else ", per-layer: needs nemo_elastic's loader",
                    budget_size_line(ckpt, r.name))
    return {r.name: r.path for r in results}


def check_budget_names(names: Sequence[str], flag: str = "--budget") -> None:
    """A budget named twice would be exported / generated twice (or the second overwrite the
    first): refuse it, naming the repeated one."""
    from nemo_elastic.errors import first_repeated

    repeated = first_repeated(names)
    if repeated is not None:
        raise ConfigError(f"{flag} {repeated!r} is given twice; name each budget once")


def budget_size_line(ckpt, name: str) -> str:
    """'N parameters (x% of M); sizes' of a trained budget, for the log line; a memory budget
    also names its memory and target ('N parameters (...), memory 210.30 kB of target 210.00 kB
    (memory); sizes')."""
    from nemo_elastic.checkpoint import config_from_checkpoint, read_meta, resolve_checkpoint
    from nemo_elastic.export import budget_subnetwork
    from nemo_elastic.units import memory_text

    parent = config_from_checkpoint(ckpt).model
    subnet = budget_subnetwork(ckpt, name)
    row = next(r for r in read_meta(resolve_checkpoint(ckpt))["family"] if r["name"] == name)
    memory = memory_text(row)
    if memory:
        memory += f" of target {target_text(row)}"
    return size_line(parent, subnet, memory)


def size_line(parent, subnet, extra: str = "") -> str:
    """'N parameters (x% of M)EXTRA; sizes' of sub-network `subnet` of `parent`."""
    from nemo_elastic.cost_model import count_parameters, subnetwork_parameters

    full, kept = count_parameters(parent), subnetwork_parameters(parent, subnet)
    return (f"{kept:,} parameters ({100 * kept / full:.1f}% of {full:,}){extra}; "
            f"{subnet.describe(parent)}")


# ------------------------------------------------------------------------------------ generate

def generate(ckpt, budgets: Sequence[str], prompt: str, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: Optional[int] = None,
             seed: Optional[int] = None,
             on_completion: Optional[Callable[[str, str, int], None]] = None) -> dict[str, str]:
    """{budget: completion} from one loaded elastic checkpoint (each budget on its sliced
    weights).  An unknown budget name fails before any weight is loaded.  `on_completion(name,
    text, n_budgets)` sees each completion as soon as it is ready (the CLIs print it)."""
    from nemo_elastic.export import budget_subnetwork
    from nemo_elastic.serve import ElasticGenerator, check_sampling

    if not budgets:
        raise ConfigError("budget=[]: name at least one trained budget (see `info`)")
    check_budget_names(budgets)
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   prefix="--")
    for name in budgets:
        budget_subnetwork(ckpt, name)
    out = {}
    with ElasticGenerator.load(ckpt) as gen:
        for name in budgets:
            out[name] = gen.generate(prompt, name, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, seed=seed).text
            if on_completion is not None:
                on_completion(name, out[name], len(budgets))
    return out


def print_completion(name: str, text: str, n_budgets: int) -> None:
    """stdout carries the completions only: bare for one budget, '[NAME] text' for several."""
    print(text if n_budgets == 1 else f"[{name}] {text}", flush=True)
