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

Decoding is the package's one decoder (`nemo_elastic.inference`), as in `data.evaluate`:
prompt = ``[bos] + encode(prompt)``, the prompt prefilled once, then one token's forward per new
token with the attention KV cache and the Mamba conv / SSM states (`generate_batch` decodes
several prompts of any lengths at once); stop at eod, sample only real tokenizer ids (Megatron
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
    """New token ids after `prompt_ids` (up to and without eod) from a full forward over the
    whole prefix per token: the package's decoding loop (`inference.decode_batch`) with the
    uncached stepper - the reference the cached decoding is tested against, and the only way to
    decode an arbitrary `tokens -> logits` callable (e.g. a masked nested model)."""
    from nemo_elastic.inference import decode_batch, uncached

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    return decode_batch(uncached(logits_fn, device), [list(prompt_ids)],
                        max_new_tokens=max_new_tokens, eod_id=eod_id, vocab_size=vocab_size,
                        temperature=temperature, top_k=top_k, generator=generator)[0].tokens


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
        """Complete `prompt` at `budget` (greedy by default; see `inference.sample_next`).

        `seed` makes sampled decoding reproducible (None: a fresh random seed)."""
        return self.generate_batch([prompt], budget, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, seed=seed)[0]

    def generate_batch(self, prompts: Sequence[str], budget: Optional[str] = None, *,
                       max_new_tokens: int = 32, temperature: float = 0.0,
                       top_k: Optional[int] = None,
                       seed: Optional[int] = None) -> list[Generation]:
        """Complete several prompts (any lengths) at `budget` in one batch, stateful decoding;
        each row stops at its own eod.  Greedy rows equal decoding each prompt alone.
        `seconds` / `tokens_per_s` of each result are the batch's (all its new tokens)."""
        from nemo_elastic.data.protocol import document_ids
        from nemo_elastic.inference import generate_ids

        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        vocab = self.tokenizer.vocab_size
        if top_k is not None and top_k > vocab:
            logger.warning("top_k=%d is larger than the vocabulary: using top_k=%d (every "
                           "token of the tokenizer)", top_k, vocab)
            top_k = vocab
        try:
            prompt_ids = [document_ids(self.tokenizer, p, append_eod=False) for p in prompts]
        except ValueError as err:  # a character the tokenizer cannot encode: user input
            raise ConfigError(f"--prompt: {err}") from err
        model = self.model(budget)
        limit = self.cfg.model.max_sequence_length
        longest = max((len(ids) for ids in prompt_ids), default=0)
        if longest + max_new_tokens > limit:
            raise ConfigError(f"--max-new-tokens={max_new_tokens}: with the prompt ({longest} "
                              f"tokens) exceeds the model's max_sequence_length={limit}; pass "
                              f"--max-new-tokens {max(limit - longest, 0)} or less, or a shorter "
                              "prompt")
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        start = time.perf_counter()
        completions = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens,
                                   eod_id=self.tokenizer.eod_id, vocab_size=vocab,
                                   temperature=temperature, top_k=top_k, generator=gen)
        seconds = time.perf_counter() - start
        produced = sum(len(c.tokens) for c in completions)
        speed = produced / seconds if seconds else 0.0
        logger.info("budget %s: %d prompt(s), %d tokens in %.3f s (%.1f tokens/s, KV cache + "
                    "Mamba state)", "(full)" if budget is None else repr(budget), len(prompts),
                    produced, seconds, speed)
        return [Generation(budget=budget, text=self.tokenizer.decode(c.tokens), tokens=c.tokens,
                           seconds=seconds, tokens_per_s=speed) for c in completions]
