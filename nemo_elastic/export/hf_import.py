"""Hugging Face `NemotronHForCausalLM` directory -> nemo_elastic (Megatron dist) checkpoint.

    import_hf("hf/Nemotron-Nano-12B-v2", "ckpts/nano12b")

Reads `config.json` (mapped and checked by `hf_adapter`) and the safetensors weights (one
`model.safetensors`, or shards listed in `model.safetensors.index.json`).  Tensors are streamed
one at a time with `safetensors.safe_open` straight into the parameters of a TP=1 model, so the
peak memory is the model plus one HF tensor; then `save_checkpoint(kind="import")` writes the
checkpoint atomically (temporary sibling directory, renamed when complete).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch

from nemo_elastic.checkpoint import CheckpointError, save_checkpoint
from nemo_elastic.config import Config, DataConfig
from nemo_elastic.errors import check_output_path
from nemo_elastic.export.common import build_tp1_model, peak_rss_mib, tp1_runtime
from nemo_elastic.export.hf_adapter import (
    HF_PREFIXES, TensorMap, fuse_qkv, hf_passthrough, load_hf_config, model_config_from_hf,
    model_tensors, tensor_maps)

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsReader:
    """Lazy access to the tensors of a HF directory (single file or sharded); a context manager."""

    def __init__(self, hf_dir: Path):
        index, single = hf_dir / INDEX_FILE, hf_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{str(index)!r} is not a safetensors index ({err})") from err
            self.file_of = {name: hf_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            self.file_of = None  # filled on enter from the file's own key list
            self._single = single
        else:
            raise CheckpointError(f"{str(hf_dir)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
                                  "only safetensors Hugging Face checkpoints can be imported")
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "SafetensorsReader":
        if self.file_of is None:
            self.file_of = {name: self._single for name in self._open(self._single).keys()}
        for path in set(self.file_of.values()):
            if not path.is_file():
                raise CheckpointError(f"safetensors shard {str(path)!r} (listed in the index) "
                                      "is missing")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = self._stack.enter_context(safe_open(str(path),
                                                                          framework="pt"))
            except Exception as err:  # SafetensorError (a truncated or foreign file), OSError
                raise _damaged(path, err) from None
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self.file_of[name])
        try:
            return handle.get_tensor(name)
        except Exception as err:  # the header lists it but its bytes cannot be read
            raise _damaged(self.file_of[name], err, name) from None


def _damaged(path: Path, err: Exception, tensor: str = "") -> CheckpointError:
    what = f" (tensor {tensor!r})" if tensor else ""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return CheckpointError(f"{str(path)!r}{what} is not a readable safetensors file: {reason}; "
                           "it is truncated or damaged: download or save it again")


def _detect_prefix(names: set[str]) -> str:
    for prefix in HF_PREFIXES:
        if f"{prefix}embeddings.weight" in names:
            return prefix
    raise CheckpointError(
        "the safetensors hold no NemotronH embedding ('backbone.embeddings.weight' or "
        f"'model.embeddings.weight'); first names: {sorted(names)[:5]}")


def _check_names(maps: list[TensorMap], names: set[str]) -> None:
    expected = {name for tm in maps for name in tm.hf}
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the Hugging Face tensors do not match config.json: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''} (MTP heads, biases or MoE weights are not "
            "supported)")


def _megatron_tensor(tm: TensorMap, reader: SafetensorsReader, model_cfg) -> torch.Tensor | None:
    if tm.kind in ("zeros", "zero_bias"):
        return None
    if tm.kind == "qkv":
        return fuse_qkv(*(reader.get(n) for n in tm.hf), model_cfg, tm.layer)
    return reader.get(tm.hf[0])


def _copy_all(model: torch.nn.Module, maps: list[TensorMap], reader: SafetensorsReader,
              model_cfg) -> None:
    params = model_tensors(model)
    maps = [tm for tm in maps if tm.kind != "zero_bias"]  # no such tensor in the model
    mapped = {tm.megatron for tm in maps}
    if set(params) != mapped:  # a mapping bug, not a user error
        raise RuntimeError(f"hf_adapter.tensor_maps is out of date: unmapped model parameters "
                           f"{sorted(set(params) - mapped)[:5]}, unknown {sorted(mapped - set(params))[:5]}")
    casts: set[tuple[torch.dtype, torch.dtype]] = set()
    with torch.no_grad():
        for tm in maps:
            param = params[tm.megatron]
            src = _megatron_tensor(tm, reader, model_cfg)
            if src is None:
                param.zero_()
                continue
            if src.shape != param.shape:
                raise CheckpointError(f"{'/'.join(tm.hf)}: shape {tuple(src.shape)} does not "
                                      f"match {tm.megatron} {tuple(param.shape)} from config.json")
            if src.dtype != param.dtype and (src.dtype, param.dtype) not in casts:
                casts.add((src.dtype, param.dtype))
                lossless = param.dtype in (torch.float32, torch.float64) and \
                    torch.finfo(src.dtype).bits <= torch.finfo(param.dtype).bits
                logger.log(logging.INFO if lossless else logging.WARNING,
                           "casting %s (and any other such tensor) from %s to %s, %s", tm.hf[0],
                           src.dtype, param.dtype, "exact" if lossless else "ROUNDING values")
            if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                raise CheckpointError(
                    f"{'/'.join(tm.hf)} holds NaN or infinite values: "
                    "the Hugging Face weights are damaged; re-download or re-save them")
            param.copy_(src)
            del src


def import_hf(hf_dir: str | Path, out_ckpt: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a Hugging Face NemotronH directory to a nemo_elastic checkpoint; returns its path.

    Raises `HFConfigError` (a ConfigError) naming any config field we cannot represent,
    `CheckpointError` for missing/mismatched tensors or when `out_ckpt` exists and not
    `overwrite`.  Runs in one process (sets up, then tears down, a TP=1 Megatron runtime unless
    one is already initialized).
    """
    from nemo_elastic.run.output_lock import output_lock
    from nemo_elastic.run.paths import check_output_location

    hf_dir, out_ckpt = Path(hf_dir), Path(out_ckpt)
    check_output_location(out_ckpt, "--out", {"HF_DIR": hf_dir}, error=CheckpointError)
    with output_lock(out_ckpt, "--out", error=CheckpointError):
        return _import_hf(hf_dir, out_ckpt, overwrite=overwrite)


def _import_hf(hf_dir: Path, out_ckpt: Path, *, overwrite: bool) -> Path:
    check_output_path(out_ckpt, "--out", overwrite, CheckpointError)
    start = time.perf_counter()
    hf = load_hf_config(hf_dir)
    model_cfg = model_config_from_hf(hf)
    seq = min(DataConfig().seq_length, model_cfg.max_sequence_length)
    cfg = Config(model=model_cfg, data=DataConfig(seq_length=seq))
    with SafetensorsReader(hf_dir) as reader:  # headers only: fail before building the model
        names = reader.names()
    maps = tensor_maps(model_cfg, hf_prefix=_detect_prefix(names), conv_bias=hf.use_conv_bias)
    _check_names(maps, names)
    with tp1_runtime():
        model = build_tp1_model(cfg)
        with SafetensorsReader(hf_dir) as reader:  # closed (mappings released) before saving
            _copy_all(model, maps, reader, model_cfg)
        meta = {"source": {"format": "hf", "path": str(hf_dir.resolve())},
                "hf_passthrough": hf_passthrough(hf)}
        save_checkpoint(out_ckpt, cfg=cfg, model=model, kind="import", overwrite=overwrite,
                        extra_meta=meta, field_name="--out")
    logger.info("imported %s -> %s: %d tensors in %.1f s, peak RSS %.0f MiB", hf_dir, out_ckpt,
                len(names), time.perf_counter() - start, peak_rss_mib())
    return out_ckpt

