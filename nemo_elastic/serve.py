"""One loaded elastic checkpoint answers at any of its trained budgets.

    with ElasticGenerator.load("runs/x/elastic") as gen:       # parent loaded once
        gen.generate("Q:1+2=?\\nS:", budget="50pct").text      # sliced on first use, cached
        gen.generate("Q:1+2=?\\nS:", budget="full")            # the parent itself
        gen.generate(prompt, budget="50pct", temperature=0.8, top_k=5, seed=0)

A budget runs on the physically SLICED weights (`export.slicing.slice_model`, the same path as
`nemo-elastic extract`), not on masks, so a smaller budget is actually cheaper per token.  Each
sliced model is built once, on first use, and kept in memory next to the parent; switching
budgets between calls reloads nothing.  `budget=None` and a budget equal to the whole model use
the parent.

Decoding matches `data.evaluate`: prompt = ``[bos] + encode(prompt)``, a full forward over the
whole prefix per new token (no KV cache), stop at eod, sample only real tokenizer ids (Megatron
pads the vocabulary).  Everything runs in one process at TP=PP=1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from nemo_elastic.config import ConfigError

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [1, s] int64 -> logits [1, s, v]


@dataclasses.dataclass(frozen=True)
class Generation:
    """One completion: its text, its new token ids (eod stripped), and decode speed.

    `seconds` covers the decode loop only (not the one-off slicing of a budget's first call),
    so `tokens_per_s` compares budgets fairly."""

    budget: Optional[str]
    text: str
    tokens: list[int]
    seconds: float
    tokens_per_s: float


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: Optional[int],
                   prefix: str = "") -> None:
    """Refuse sampling options that cannot work (one line naming the option, value and fix):
    a negative `max_new_tokens`, a temperature that is negative or not finite (NaN/inf would
    make softmax produce NaN), a `top_k` below 1.  `prefix` "--" names them as CLI flags."""
    import math

    def name(field: str) -> str:
        return f"{prefix}{field.replace('_', '-')}" if prefix else field

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ConfigError(f"{name('max_new_tokens')}={max_new_tokens!r}: must be an integer "
                          ">= 0")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"{name('temperature')}={temperature!r}: must be a finite number "
                          ">= 0 (0 = greedy, e.g. 0.8 to sample)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ConfigError(f"{name('top_k')}={top_k!r}: must be an integer >= 1 (or leave it "
                          "out to sample among all tokens)")


def decode(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int, eod_id: int,
           vocab_size: int, temperature: float = 0.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None,
           device: Optional[torch.device] = None) -> list[int]:
    """New token ids after `prompt_ids` (up to and without eod).

    temperature 0: greedy (argmax, as `data.evaluate`); > 0: sample from softmax(logits / T)
    restricted to the `top_k` most likely ids (None: all), drawing from `generator` so a seed
    reproduces the text.  Only ids < `vocab_size` (the tokenizer's) are ever produced.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = logits_fn(tokens)[0, -1, :vocab_size].float().cpu()  # [v]
            if temperature == 0:
                next_id = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None and top_k < vocab_size:
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
            if next_id == eod_id:
                break
            new.append(next_id)
            tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    return new


def model_logits_fn(model, subnetwork=None) -> LogitsFn:
    """tokens -> logits of a one-process model (`subnetwork`: a masked nested elastic model)."""
    from nemo_elastic.training.evaluation import greedy_logits_fn

    return greedy_logits_fn(model, subnetwork)


class ElasticGenerator:
    """A loaded elastic checkpoint that generates text at any trained budget (see module doc).

    Owns the one-process Megatron runtime when it had to set one up (it reuses an initialized
    TP=1 one): use it as a context manager or call `close()`.
    """

    def __init__(self, ckpt: Path, cfg, parent, tokenizer, family: dict, runtime_stack) -> None:
        self.ckpt, self.cfg, self.parent, self.tokenizer = ckpt, cfg, parent, tokenizer
        self.family = family  # {name: SubNetwork}, training order
        self._models: dict[str, torch.nn.Module] = {}  # budget -> sliced model (lazy)
        self._stack = runtime_stack

    @classmethod
    def load(cls, ckpt: str | Path) -> "ElasticGenerator":
        """Load the nested checkpoint (or a run output dir's latest) once, as a plain model."""
        from nemo_elastic.checkpoint import (
            config_from_checkpoint, load_checkpoint, resolve_checkpoint)
        from nemo_elastic.data.loaders import build_tokenizer
        from nemo_elastic.export.common import build_tp1_model, tp1_runtime
        from nemo_elastic.export.family import family_of

        ckpt = resolve_checkpoint(ckpt)
        family = family_of(ckpt)  # refuses a checkpoint without trained budgets, before loading
        cfg = config_from_checkpoint(ckpt).single_process()
        tokenizer = build_tokenizer(cfg)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(tp1_runtime())
            start = time.perf_counter()
            # The elastic checkpoint has the plain model's parameter names (as extract uses).
            parent = build_tp1_model(cfg)
            load_checkpoint(ckpt, model=parent, restore_rng=False)
        except BaseException:
            stack.close()
            raise
        logger.info("loaded %s in %.1f s; trained budgets: %s", ckpt,
                    time.perf_counter() - start, ", ".join(family))
        return cls(ckpt, cfg, parent, tokenizer, family, stack)

    def close(self) -> None:
        self._models.clear()
        self._stack.close()

    def __enter__(self) -> "ElasticGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model(self, budget: Optional[str]) -> torch.nn.Module:
        """The model that runs `budget`: the parent for None / the whole model, else its
        sliced model (built on first use, then cached).  ConfigError names the trained ones."""
        from nemo_elastic.export.slicing import slice_model

        if budget is None:
            return self.parent
        if budget not in self.family:
            raise ConfigError(f"--budget {budget!r}: no such trained budget in "
                              f"{str(self.ckpt)!r}; trained budgets: {', '.join(self.family)}")
        subnet = self.family[budget]
        if subnet.is_full(self.cfg.model):
            return self.parent  # slicing would only copy the weights
        if budget not in self._models:
            start = time.perf_counter()
            _, child = slice_model(self.parent, self.cfg, subnet, spec_backend="local")
            self._models[budget] = child.eval()
            logger.info("budget %r sliced in %.2f s: %s", budget, time.perf_counter() - start,
                        subnet.describe(self.cfg.model))
        return self._models[budget]

    def generate(self, prompt: str, budget: Optional[str] = None, *, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 seed: Optional[int] = None) -> Generation:
        """Complete `prompt` at `budget` (greedy by default; see `decode` for sampling).

        `seed` makes sampled decoding reproducible (None: a fresh random seed)."""
        from nemo_elastic.data.protocol import document_ids

        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        vocab = self.tokenizer.vocab_size
        if top_k is not None and top_k > vocab:
            logger.warning("top_k=%d is larger than the vocabulary: using top_k=%d (every "
                           "token of the tokenizer)", top_k, vocab)
            top_k = vocab
        try:
            prompt_ids = document_ids(self.tokenizer, prompt, append_eod=False)
        except ValueError as err:  # a character the tokenizer cannot encode: user input
            raise ConfigError(f"--prompt: {err}") from err
        model = self.model(budget)
        limit = self.cfg.model.max_sequence_length
        if len(prompt_ids) + max_new_tokens > limit:
            raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens="
                              f"{max_new_tokens} exceeds the model's max_sequence_length={limit}")
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        start = time.perf_counter()
        ids = decode(model_logits_fn(model), prompt_ids, max_new_tokens=max_new_tokens,
                     eod_id=self.tokenizer.eod_id, vocab_size=self.tokenizer.vocab_size,
                     temperature=temperature, top_k=top_k, generator=gen,
                     device=next(model.parameters()).device)
        seconds = time.perf_counter() - start
        result = Generation(budget=budget, text=self.tokenizer.decode(ids), tokens=ids,
                            seconds=seconds, tokens_per_s=len(ids) / seconds if seconds else 0.0)
        logger.info("budget %s: %d tokens in %.3f s (%.1f tokens/s)",
                    "(full)" if budget is None else repr(budget), len(ids), seconds,
                    result.tokens_per_s)
        return result
