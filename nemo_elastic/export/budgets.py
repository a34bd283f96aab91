"""Export trained budgets of a nested (elastic) checkpoint by name: verified, atomic, all or none.

    export_budgets("runs/x/elastic", "out", ["50pct"], format="megatron")  # out/50pct
    export_budgets("runs/x/elastic", "out", None, format="hf")             # every budget

One pass: every name, output and format restriction is checked before any weight is loaded;
the nested checkpoint is loaded once into the elastic model; per budget the trained sub-network
(`family_of`) is sliced (`slicing.slice_model`, the one slicing path), written into a hidden
staging folder next to the output, reloaded from disk and its logits compared on a few tokens
with the masked nested model.  Only when every budget passed are the folders moved into place
(one rename when the output folder is new).  Any error, Ctrl-C or SIGTERM removes the staging
folder: an interrupted export leaves no folder behind.

Formats: `megatron` (`megatron_format`: a plain megatron-core HybridModel loads it, heterogeneous
budgets need our loader) and `hf` (transformers' NemotronHForCausalLM + the tokenizer;
heterogeneous budgets only with `hf_per_layer=True`, see `hf_per_layer`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from nemo_elastic.checkpoint import (
    CheckpointError, add_checksummed_files, config_from_checkpoint, load_checkpoint, read_meta,
    resolve_checkpoint, save_checkpoint)
from nemo_elastic.config import ConfigError
from nemo_elastic.errors import check_output_path
from nemo_elastic.export.common import honour_umask
from nemo_elastic.run.output_lock import output_lock
from nemo_elastic.run.paths import check_output_location, checkpoint_inputs
from nemo_elastic.report.common import strict_json
from nemo_elastic.export.family import folder_name
from nemo_elastic.export.megatron_format import is_heterogeneous, why_not_plain
from nemo_elastic.export.staging import staging as staged_output

logger = logging.getLogger(__name__)

FORMATS = ("megatron", "hf")
EXPORT_RECORD = "export.json"
VERIFY_TOKENS = 32
# Relative logit error (||reloaded - masked|| / ||masked||) an export must stay under: fp32
# masked == sliced holds to ~1e-6; transformers computes Mamba2 in another order (~1e-5).
TOLERANCE = {"float32": {"megatron": 1e-4, "hf": 1e-3}, "bfloat16": {"megatron": 3e-2, "hf": 3e-2},
             "float16": {"megatron": 1e-2, "hf": 1e-2}}


class ExportError(RuntimeError):
    """An exported folder, reloaded, does not compute what the nested model computes (a bug)."""


@dataclasses.dataclass(frozen=True)
class BudgetExport:
    """One exported budget: where, how large, how close to the masked nested model."""

    name: str
    path: Path
    format: str
    parameters: int
    rel_error: float
    seconds: float
    plain: bool  # loads without this plugin (megatron-core HybridModel / stock transformers)


def plan_targets(out: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """{name: out/<name>}: one sub-folder per budget."""
    return {name: Path(out) / folder_name(name) for name in names}


def export_budgets(ckpt: str | Path, out: str | Path, budgets: Optional[Sequence[str]] = None,
                   *, format: str = "megatron", overwrite: bool = False,
                   hf_per_layer: bool = False, allow_unordered: bool = False
                   ) -> list[BudgetExport]:
    """Budgets `budgets` (None: every trained one) of `ckpt` into `out/<name>`, all or none.
    A family whose sizes are out of the order of their targets (`family_check`) is refused
    unless `allow_unordered`."""
    from nemo_elastic.export.family import family_of

    family = family_of(ckpt)
    names = list(family) if budgets is None else list(dict.fromkeys(budgets))
    check_family_order(ckpt, allow_unordered)
    # the folder the user named holds every budget: never into, over or under the input
    check_output_location(out, "--out", checkpoint_inputs(resolve_checkpoint(ckpt)),
                          error=CheckpointError)
    return export_to(ckpt, plan_targets(out, names), format=format, overwrite=overwrite,
                     hf_per_layer=hf_per_layer)


def check_family_order(ckpt, allow_unordered: bool) -> None:
    """Refuse (or, allowed, warn about) a family whose sizes are not in the order of their
    targets: such a family is not a nested family one can deploy by size."""
    from nemo_elastic.family_check import check_family

    try:
        check = check_family(read_meta(resolve_checkpoint(ckpt)).get("family") or [])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return  # rows without sizes (family_of has checked what export needs)
    if check.in_order:
        return
    if not allow_unordered:
        raise ConfigError(f"checkpoint {str(ckpt)!r}: the family's sizes are "
                          f"{check.order_text()}; train longer or with more router updates per "
                          "budget, or export anyway with --allow-unordered")
    logger.warning("exporting a family whose sizes are %s", check.order_text())


def export_to(ckpt: str | Path, targets: Mapping[str, str | Path], *, format: str = "megatron",
              overwrite: bool = False, hf_per_layer: bool = False) -> list[BudgetExport]:
    """{budget name: output folder} (all in one parent folder) -> exported, verified folders."""
    from nemo_elastic.export.family import budget_subnetwork

    if format not in FORMATS:
        raise ConfigError(f"--format={format!r}: choose one of {', '.join(FORMATS)}")
    if not targets:
        raise ConfigError("no budget to export: name one with --budget NAME, or pass --all")
    start = time.perf_counter()
    ckpt = resolve_checkpoint(ckpt)
    cfg = config_from_checkpoint(ckpt).single_process()
    meta = read_meta(ckpt)
    targets = {name: Path(path) for name, path in targets.items()}
    parents = {path.parent.resolve() for path in targets.values()}
    if len(parents) != 1:
        raise ConfigError(f"export targets must share one folder, got {sorted(map(str, parents))}")
    subnets = {name: budget_subnetwork(ckpt, name) for name in targets}  # unknown names refused
    folder = next(iter(targets.values())).parent
    # never into, over or under the checkpoint read: each output, and the folder they share
    # when there are several (as extract does; a single output's parent only gets its staging)
    for path in dict.fromkeys([*([folder] if len(targets) > 1 else []), *targets.values()]):
        check_output_location(path, "--out", checkpoint_inputs(ckpt), error=CheckpointError)
    with output_lock(folder, "--out", error=CheckpointError):  # one writer per output folder
        for name, path in targets.items():
            check_output_path(path, "--out", overwrite, CheckpointError)
        children = {name: s.model_config(cfg.model) for name, s in subnets.items()}
        tokenizer, passthrough = _hf_preflight(cfg, meta, children, hf_per_layer) \
            if format == "hf" else (None, {})
        with staged_output(folder, overwrite=overwrite) as (staging, commit):
            staged = {name: staging / path.name for name, path in targets.items()}
            results = _export_all(ckpt, cfg, meta, subnets, staged, format, tokenizer,
                                  passthrough)
            commit(staged, targets)
    logger.info("exported %d budget(s) of %s as %s in %.1f s", len(results), ckpt, format,
                time.perf_counter() - start)
    return [dataclasses.replace(r, path=targets[r.name]) for r in results]


def _hf_preflight(cfg, meta, children, hf_per_layer):
    """Refusals of the HF format (before loading), the tokenizer and config.json token ids."""
    from nemo_elastic.export.hf_adapter import HFConfigError, hf_config_from_model

    hetero = [name for name, m in children.items() if is_heterogeneous(m)]
    if hetero and not hf_per_layer:
        raise HFConfigError(
            f"budget(s) {', '.join(map(repr, hetero))} cannot be exported for stock "
            "transformers: the router chose different sizes for layers of the same type, and "
            "transformers' NemotronH config has one size per layer type; export them with "
            "--format megatron, or with --hf-per-layer (a per-layer extension of config.json "
            "that nemo_elastic.export.load_hf_per_layer loads)")
    for m in children.values():  # any other refusal (e.g. layernorm eps), before loading
        hf_config_from_model(dataclasses.replace(m, per_layer=None), meta.get("hf_passthrough"))
    passthrough = dict(meta.get("hf_passthrough") or {})
    tokenizer = None
    if meta.get("hf_passthrough") and cfg.data.source == "synthetic":
        logger.warning("the checkpoint was imported from Hugging Face and its data section names "
                       "no tokenizer: no tokenizer files are written (copy the source model's)")
    else:
        from nemo_elastic.data.loaders import build_tokenizer
        from nemo_elastic.export.tokenizer_files import token_ids

        tokenizer = build_tokenizer(cfg)
        passthrough.update(token_ids(tokenizer))
    return tokenizer, passthrough


def _export_all(ckpt, cfg, meta, subnets, staged, format, tokenizer, passthrough):
    from nemo_elastic.cost_model import subnetwork_parameters
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.export.common import tp1_runtime
    from nemo_elastic.export.slicing import slice_model

    vocab = tokenizer.vocab_size if tokenizer is not None else cfg.model.vocab_size
    tokens = torch.randint(0, vocab, (1, min(VERIFY_TOKENS, cfg.model.max_sequence_length)),
                           generator=torch.Generator().manual_seed(0))
    results = []
    with tp1_runtime():
        parent = build_elastic_model(cfg, perform_initialization=False).eval()
        load_checkpoint(ckpt, model=parent, restore_rng=False)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        for name, subnet in subnets.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                masked = parent(tokens, positions, None, subnetwork=subnet).float()
            child_cfg, child = slice_model(parent, cfg, subnet, spec_backend="local")
            child.eval()
            params = sum(p.numel() for p in child.parameters())
            expected = subnetwork_parameters(cfg.model, subnet)
            if params != expected:
                raise ExportError(f"budget {name!r}: the sliced model has {params:,} parameters, "
                                  f"the cost model counts {expected:,}")
            folder = staged[name]
            extra = {"budget": name, "subnetwork": subnet.to_dict(), "parent": str(ckpt),
                     "parent_iteration": meta.get("iteration")}
            if meta.get("hf_passthrough"):
                extra["hf_passthrough"] = meta["hf_passthrough"]
            if format == "megatron":
                plain = _write_megatron(folder, child_cfg, child, extra)
            else:
                plain = _write_hf(folder, child_cfg, child, tokenizer, passthrough)
            del child
            logits = _reload_logits(folder, format, plain, tokens)
            err = ((logits[..., :masked.shape[-1]] - masked).norm() / masked.norm()).item()
            tol = TOLERANCE[cfg.model.params_dtype][format]
            if not err <= tol:
                raise ExportError(f"budget {name!r}: the exported {format} model reloaded from "
                                  f"{folder} differs from the masked nested model by {err:.2e} "
                                  f"(relative logit error, tolerance {tol:.0e})")
            seconds = time.perf_counter() - t0
            row = next(r for r in meta["family"] if r["name"] == name)
            record = {"budget": name, "format": format, "parameters": params, "plain": plain,
                      # the budget as trained: its target in its unit, its memory at its spec
                      **{k: row[k] for k in ("target", "budget_type", "memory_bytes",
                                             "memory_spec") if k in row},
                      "parent": str(ckpt), "parent_iteration": meta.get("iteration"),
                      "subnetwork": subnet.to_dict(), "seconds": round(seconds, 3),
                      "verification": {"tokens": tokens.shape[1], "rel_logit_error": err,
                                       "tolerance": tol, "against": "masked nested model"}}
            (folder / EXPORT_RECORD).write_text(strict_json(record, indent=2) + "\n")
            if format == "megatron":  # a checkpoint: every file it holds is checksummed
                add_checksummed_files(folder, [EXPORT_RECORD])
            logger.info("budget %r: %s export verified (relative logit error %.1e vs the masked "
                        "nested model, %s parameters) in %.2f s", name, format, err,
                        f"{params:,}", seconds)
            results.append(BudgetExport(name=name, path=folder, format=format,
                                        parameters=params, rel_error=err, seconds=seconds,
                                        plain=plain))
    return results


def _write_megatron(folder: Path, child_cfg, child, extra) -> bool:
    from nemo_elastic.export.megatron_format import MEGATRON_CONFIG_FILE, write_megatron_config

    save_checkpoint(folder, cfg=child_cfg, model=child, kind="export",
                    extra_meta={**extra, "format": "megatron"}, field_name="--out")
    write_megatron_config(folder, child_cfg.model)
    add_checksummed_files(folder, [MEGATRON_CONFIG_FILE])  # verified by every load (the reload)
    return why_not_plain(child_cfg.model) is None


def _write_hf(folder: Path, child_cfg, child, tokenizer, passthrough) -> bool:
    from nemo_elastic.export.hf_adapter import hf_config_from_model
    from nemo_elastic.export.hf_export import write_hf_weights
    from nemo_elastic.export.hf_per_layer import write_hf_per_layer_config
    from nemo_elastic.export.tokenizer_files import check_tokenizer, write_tokenizer

    m = child_cfg.model
    folder.mkdir(parents=True)
    write_hf_weights(child, m, folder)
    plain = not is_heterogeneous(m)
    if plain:
        hf_config_from_model(m, passthrough).save_pretrained(str(folder))
    else:
        write_hf_per_layer_config(folder, m, passthrough)
    if tokenizer is not None:
        sample = write_tokenizer(tokenizer, folder, model_vocab_size=m.vocab_size,
                                 max_length=m.max_sequence_length)
        check_tokenizer(tokenizer, folder, sample)
    honour_umask(folder)  # safetensors writes 0600 files
    return plain


def _reload_logits(folder: Path, format: str, plain: bool, tokens) -> torch.Tensor:
    """Logits of the exported folder, loaded from disk the way a user loads it."""
    with torch.no_grad():
        if format == "megatron":
            from nemo_elastic.export.megatron_format import load_exported_model

            _, model = load_exported_model(folder)
            return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()
        if plain:
            from transformers import NemotronHForCausalLM

            model = NemotronHForCausalLM.from_pretrained(str(folder)).eval()
        else:
            from nemo_elastic.export.hf_per_layer import load_hf_per_layer

            model = load_hf_per_layer(folder)
        return model(input_ids=tokens, use_cache=False).logits.float()


def export_budget_hf(ckpt: str | Path, name: str, out: str | Path, *,
                     overwrite: bool = False, per_layer: bool = False) -> Path:
    """Budget `name` as a Hugging Face nemotron_h directory `out` (with its tokenizer), verified
    against the masked nested model (`export_to`).  Refuses, before any weight is loaded, an
    existing `out` (without `overwrite`) and a heterogeneous budget (unless `per_layer`: the
    per-layer config extension of `hf_per_layer`)."""
    return export_to(ckpt, {name: out}, format="hf", overwrite=overwrite,
                     hf_per_layer=per_layer)[0].path
