"""The one decoding loop of the package: batched, greedy or seeded sampling, stop at eod per row.

    completions = generate_ids(model, [[bos, 7, 9], [bos, 3]], max_new_tokens=16,
                               eod_id=tok.eod_id, vocab_size=tok.vocab_size)

`decode_batch(stepper_factory, prompts, ...)` is the loop; what computes the next-token logits is
a *stepper*:

* `cached(model)`: stateful decoding through Megatron-Core's `StaticInferenceContext` - the
  prompt is prefilled once (chunked scan: it also returns the final Mamba conv and SSM states;
  attention keys / values go to the KV cache), then one forward of ONE token per step.  Works on
  any one-process model and on every budget's sliced model (heterogeneous, dropped layers).
  On a GPU with mamba-ssm the mixer's step uses its kernels (upstream `_ssm_decode`).
* `uncached(logits_fn)`: re-runs the whole prefix each step (the reference the cached path is
  tested against, and the baseline of `bench/bench_decode.py`); any `tokens -> logits` callable,
  e.g. a masked elastic model under a sub-network.

Prompts of different lengths need no padding: the common prefix (the shortest prompt's length)
is prefilled for every row, then every row advances one token per step - a row still inside its
prompt is fed its next prompt token (its sampled token is ignored), the others their sampled
token.  All rows are therefore at the same position, attention needs no padding mask and the
Mamba states never see a pad token, so each row's tokens equal decoding it alone.

Rows that stopped (eod or `max_new_tokens`) keep being fed eod until every row stopped; their
extra tokens are discarded.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, Sequence

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [b, s] int64 -> logits [b, s, v']


@dataclasses.dataclass(frozen=True)
class Completion:
    """New token ids after a prompt (eod stripped); `terminated`: it ended with eod."""

    tokens: list[int]
    terminated: bool


class Stepper(Protocol):
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] (the first s tokens of every row) -> next-token logits [b, v']."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b] (one more token per row) -> next-token logits [b, v']."""


StepperFactory = Callable[[int, int], Stepper]  # (batch, max total length) -> Stepper


def _without_torch_function_modes():
    """On CPU, `nemo_elastic.runtime` keeps a process-wide TorchFunctionMode that rewrites
    `device="cuda"` arguments (for Megatron's schedules / optimizer); it intercepts every torch
    call, ~40 % of a tiny model's decoding step.  An inference forward allocates nothing on
    "cuda" (the context's buffers are preallocated on the model's device), so it runs without."""
    import contextlib

    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return torch._C.DisableTorchFunction()


class _Cached:
    """Megatron-Core's static inference context; one model forward per prefill / step."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int) -> None:
        from nemo_elastic.inference.context import static_context

        self.model = model
        self.device = next(model.parameters()).device
        self.ctx = static_context(model, batch, max_len)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from megatron.core.inference.utils import InferenceMode

        b, s = tokens.shape
        offset = self.ctx.sequence_len_offset
        positions = torch.arange(offset, offset + s, device=self.device).expand(b, s)
        if offset > 0:
            self.ctx.enable_decode_mode()
        with torch.no_grad(), InferenceMode.active(), _without_torch_function_modes():
            # the full vocabulary on every tensor-parallel rank (Megatron requires the gather
            # in inference mode); [b, 1, v']: the context materializes the last token only
            logits = self.model(tokens.to(self.device), positions, None,
                                inference_context=self.ctx, runtime_gather_output=True)
        self.ctx.sequence_len_offset += s
        return logits[:, -1]

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens[:, None])


class _FullForward:
    """The whole prefix through `logits_fn` at every step (no state)."""

    def __init__(self, logits_fn: LogitsFn, device) -> None:
        self.logits_fn, self.device = logits_fn, device
        self.tokens: Optional[torch.Tensor] = None

    def _forward(self) -> torch.Tensor:
        with torch.no_grad(), _without_torch_function_modes():  # as the cached path
            logits = self.logits_fn(self.tokens)
        if logits.dim() != 3 or logits.shape[:2] != self.tokens.shape:
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for tokens "
                             f"{tuple(self.tokens.shape)}; expected [b, s, vocab]")
        return logits[:, -1]

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = tokens.to(self.device)
        return self._forward()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens[:, None].to(self.device)], dim=1)
        return self._forward()


def cached(model: torch.nn.Module) -> StepperFactory:
    """Stateful decoding of a (one-process or tensor-parallel) HybridModel in eval mode."""
    return lambda batch, max_len: _Cached(model, batch, max_len)


def uncached(logits_fn: LogitsFn, device=None) -> StepperFactory:
    """Full forward over the whole prefix per token (reference / baseline)."""
    return lambda batch, max_len: _FullForward(logits_fn, device)


def sample_next(logits: torch.Tensor, vocab_size: int, *, temperature: float = 0.0,
                top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [b, v'] -> next ids [b] (CPU int64), only ids < `vocab_size` (Megatron pads the
    vocabulary).  temperature 0: argmax; > 0: sample softmax(logits / T) among the `top_k` most
    likely ids (None: all), drawing from `generator` (a seed reproduces the text)."""
    logits = logits[:, :vocab_size].float().cpu()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < vocab_size:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def decode_batch(steppers: StepperFactory, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, eod_id: int, vocab_size: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 threads: Optional[int] = 1) -> list[Completion]:
    """One `Completion` per prompt (see the module doc for the batching rule).

    `threads`: torch's CPU intra-op threads while decoding (restored after; None leaves them).
    A decoding step is hundreds of small ops; with 2 threads on a 2-core machine that is busy
    with other work, each op waits on OpenMP hand-offs: 10-50x slower than 1 thread (measured
    on the tiny model at batch 1 and 64; see bench/bench_decode.py)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _decode_batch(steppers, prompts, max_new_tokens=max_new_tokens, eod_id=eod_id,
                             vocab_size=vocab_size, temperature=temperature, top_k=top_k,
                             generator=generator)
    finally:
        torch.set_num_threads(before)


def _decode_batch(steppers: StepperFactory, prompts: Sequence[Sequence[int]], *,
                  max_new_tokens: int, eod_id: int, vocab_size: int, temperature: float,
                  top_k: Optional[int], generator: Optional[torch.Generator]) -> list[Completion]:
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("decode_batch: every prompt needs at least one token (e.g. bos)")
    if max_new_tokens <= 0:
        return [Completion([], False) for _ in prompts]
    b, start = len(prompts), min(lengths)
    end = max(lengths) + max_new_tokens  # a row's last new token sits at len + max_new - 1
    # stopped rows are fed eod (any valid id: eod_id=-1 means "never stop")
    tokens = torch.full((b, end), eod_id if eod_id >= 0 else 0, dtype=torch.int64)
    for i, ids in enumerate(prompts):
        tokens[i, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.int64)
    stepper = steppers(b, end)
    logits = stepper.prefill(tokens[:, :start])
    new: list[list[int]] = [[] for _ in prompts]
    done, terminated = [False] * b, [False] * b
    pos = start
    while True:
        choice = sample_next(logits, vocab_size, temperature=temperature, top_k=top_k,
                             generator=generator).tolist()
        for i in range(b):
            if done[i] or pos < lengths[i]:
                continue  # stopped, or still reading its prompt
            token = choice[i]
            tokens[i, pos] = token
            if token == eod_id:
                done[i] = terminated[i] = True
            else:
                new[i].append(token)
                done[i] = len(new[i]) == max_new_tokens
        if all(done):
            break
        logits = stepper.step(tokens[:, pos])
        pos += 1
    return [Completion(ids, term) for ids, term in zip(new, terminated)]


def generate_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, eod_id: int, vocab_size: int, cache: bool = True,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> list[Completion]:
    """`decode_batch` on a HybridModel: stateful (`cache=True`) or full forward per token."""
    if cache:
        steppers = cached(model)
    else:
        from nemo_elastic.training.evaluation import greedy_logits_fn

        steppers = uncached(greedy_logits_fn(model), next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        return decode_batch(steppers, prompts, max_new_tokens=max_new_tokens, eod_id=eod_id,
                            vocab_size=vocab_size, temperature=temperature, top_k=top_k,
                            generator=generator)
    finally:
        model.train(was_training)
