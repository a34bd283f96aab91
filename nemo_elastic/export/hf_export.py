"""nemo_elastic checkpoint -> Hugging Face directory that `transformers` loads with no custom code.

    export_hf("runs/x/checkpoints", "hf_out")
    AutoModelForCausalLM.from_pretrained("hf_out")      # NemotronHForCausalLM

Writes `config.json` (`hf_adapter.hf_config_from_model`) and the weights as `model.safetensors`,
or, above `max_shard_bytes`, as `model-0000i-of-0000n.safetensors` shards plus
`model.safetensors.index.json` (transformers' layout and names, `backbone.` prefix).  Everything
goes to a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch

from nemo_elastic.checkpoint import (
    CheckpointError, config_from_checkpoint, load_checkpoint, read_meta, replace_durably,
    resolve_checkpoint)
from nemo_elastic.errors import check_output_path
from nemo_elastic.export.common import (
    build_tp1_model, honour_umask, peak_rss_mib, same_filesystem_tmp, tp1_runtime)
from nemo_elastic.export.hf_adapter import (
    TensorMap, hf_config_from_model, model_tensors, split_qkv, tensor_maps)

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _nbytes(param: torch.Tensor, dtype: torch.dtype) -> int:
    return param.numel() * (torch.finfo(dtype).bits // 8)


def plan_shards(maps: list[TensorMap], params: dict[str, torch.Tensor], max_shard_bytes: int,
                dtype: torch.dtype) -> list[list[TensorMap]]:
    """Greedy, order-preserving grouping of parameters into shards of at most `max_shard_bytes`
    (a single larger tensor gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be a positive byte count")
    shards: list[list[TensorMap]] = [[]]
    size = 0
    for tm in maps:
        nbytes = _nbytes(params[tm.megatron], dtype) if tm.megatron in params else 0
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tm)
        size += nbytes
    return shards


def _hf_tensors(tm: TensorMap, params: dict[str, torch.Tensor], model_cfg,
                dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """HF name/tensor pairs for one parameter, in the config's `dtype` (views where possible)."""
    if tm.kind == "zero_bias":  # a router without expert bias: HF's bias is zero
        yield tm.hf[0], torch.zeros(params[tm.megatron.replace("expert_bias", "weight")].shape[0])
        return
    if tm.kind == "copy32":  # transformers keeps the MoE gate and its bias in fp32
        yield tm.hf[0], params[tm.megatron].detach().cpu().float().contiguous()
        return
    param = params[tm.megatron].detach().cpu()  # no-op on CPU; safetensors writes host memory
    if param.dtype != dtype:
        # Megatron keeps A_log, D and the torch norms in fp32 under bf16/fp16 params; a HF
        # checkpoint holds one dtype (config.json "dtype"), the one from_pretrained casts to.
        logger.debug("casting %s from %s to %s", tm.megatron, param.dtype, dtype)
        param = param.to(dtype)
    if tm.kind == "qkv":
        yield from zip(tm.hf, split_qkv(param, model_cfg, tm.layer))
    elif tm.kind == "copy":
        yield tm.hf[0], param.contiguous()
    else:
        raise ValueError(f"{tm.megatron}: cannot export tensor kind {tm.kind!r}")


def _write_weights(tmp: Path, maps: list[TensorMap], params: dict[str, torch.Tensor],
                   model_cfg, max_shard_bytes: int) -> int:
    """Write the safetensors file(s) (+ index when sharded); returns the number of tensors."""
    from safetensors.torch import save_file

    dtype = getattr(torch, model_cfg.params_dtype)  # validated: float32 | bfloat16 | float16
    shards = plan_shards(maps, params, max_shard_bytes, dtype)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(pair for tm in shard for pair in _hf_tensors(tm, params, model_cfg, dtype))
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        total += sum(_nbytes(t, t.dtype) for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(weight_map)


def write_hf_weights(model: torch.nn.Module, model_cfg, directory: Path,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> int:
    """The weights of a whole TP=1 model (local spec) as HF safetensors in `directory`
    (per-layer sizes allowed); returns the number of tensors."""
    params = model_tensors(model)
    return _write_weights(Path(directory), tensor_maps(model_cfg), params, model_cfg,
                          max_shard_bytes)


def export_hf(ckpt: str | Path, out_dir: str | Path, *, overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Export a nemo_elastic checkpoint as a Hugging Face NemotronH directory; returns its path.

    `ckpt` may be a checkpoint directory or a run's `checkpoints/` (its `latest` is used).
    Raises `CheckpointError` when `out_dir` exists and not `overwrite` or the checkpoint is
    unreadable, `HFConfigError` when the model cannot be expressed as a NemotronH config.
    Runs in one process at TP=1 (any TP/PP checkpoint is resharded on load).
    """
    from nemo_elastic.run.output_lock import output_lock
    from nemo_elastic.run.paths import check_output_location, checkpoint_inputs

    ckpt, out_dir = resolve_checkpoint(ckpt), Path(out_dir)
    check_output_location(out_dir, "--out", checkpoint_inputs(ckpt), error=CheckpointError)
    with output_lock(out_dir, "--out", error=CheckpointError):  # one writer; stale tmp removed
        return _export_hf(ckpt, out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def _export_hf(ckpt: Path, out_dir: Path, *, overwrite: bool, max_shard_bytes: int) -> Path:
    start = time.perf_counter()
    check_output_path(out_dir, "--out", overwrite, CheckpointError)
    meta = read_meta(ckpt)
    cfg = config_from_checkpoint(ckpt)
    hf_cfg = hf_config_from_model(cfg.model, meta.get("hf_passthrough"))  # fail before loading
    tmp = Path(same_filesystem_tmp(out_dir))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tp1_runtime():
            model = build_tp1_model(cfg)
            load_checkpoint(ckpt, model=model, restore_rng=False)
            params = model_tensors(model)
            maps = tensor_maps(cfg.model)
            count = _write_weights(tmp, maps, params, cfg.model, max_shard_bytes)
            del model, params
        hf_cfg.save_pretrained(str(tmp))  # config.json
        honour_umask(tmp)  # safetensors writes 0600 files
        if out_dir.exists():
            shutil.rmtree(out_dir)
        replace_durably(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s -> %s: %d tensors in %.1f s, peak RSS %.0f MiB", ckpt, out_dir,
                count, time.perf_counter() - start, peak_rss_mib())
    return out_dir

