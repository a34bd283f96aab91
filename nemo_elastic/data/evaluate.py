"""Exact-match answer accuracy of greedy generation on reasoning problems.

For each problem the prompt is ``document_ids(tokenizer, problem.prompt, append_eod=False)``
(``[bos] + "Q:<question>=?\\nS:"``: the model must continue with the worked steps).  Generation
is greedy with a full forward pass per new token (no KV cache) and stops at eod or after
``max_new_tokens``.  The predicted answer is the integer after the first ``"A:"`` of the
completion; it counts only if the number is terminated (by eod or any non-digit), so a
generation cut off by ``max_new_tokens`` mid-number is not a hit.

Batching is exact under causal attention: problems are grouped by prompt length and each group
is run in chunks of ``batch_size`` rows with no padding at all (rows that hit eod keep generating
but their extra tokens are ignored).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch

from nemo_elastic.data.protocol import TokenizerProtocol, document_ids
from nemo_elastic.data.synthetic import ANSWER_PREFIX, ReasoningProblem

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [b, s] int64 -> logits [b, s, v]
_ANSWER_RE = re.compile(re.escape(ANSWER_PREFIX) + r"(-?\d+)(?=\D)")


def parse_answer(completion: str, terminated: bool) -> Optional[int]:
    """The integer after the first ``A:``; None if absent or not terminated."""
    match = _ANSWER_RE.search(completion + ("\n" if terminated else ""))
    return int(match.group(1)) if match else None


def _generate(logits_fn: LogitsFn, prompts: torch.Tensor, max_new_tokens: int, eod_id: int,
              vocab_size: int) -> tuple[list[list[int]], list[bool]]:
    """Greedy generation for equal-length prompts ``[b, p]``; returns new ids (eod stripped)."""
    tokens = prompts  # [b, p + t] grows by one column per step
    b = prompts.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = logits_fn(tokens)  # [b, s, v'] with v' >= vocab_size (Megatron pads the vocab)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for tokens "
                             f"{tuple(tokens.shape)}; expected [b, s, vocab]")
        next_ids = logits[:, -1, :vocab_size].float().argmax(dim=-1).to(torch.int64)  # [b]
        tokens = torch.cat([tokens, next_ids.unsqueeze(1).to(tokens.device)], dim=1)
        done |= next_ids.cpu() == eod_id
        if bool(done.all()):
            break
    new = tokens[:, prompts.shape[1]:].cpu().tolist()
    completions, terminated = [], []
    for row in new:
        if eod_id in row:
            completions.append(row[:row.index(eod_id)])
            terminated.append(True)
        else:
            completions.append(row)
            terminated.append(False)
    return completions, terminated


def answer_accuracy(logits_fn: LogitsFn, tokenizer: TokenizerProtocol,
                    problems: Sequence[ReasoningProblem], max_new_tokens: Optional[int] = None,
                    batch_size: int = 32, *, num_examples: int = 4,
                    device: Optional[torch.device | str] = None, progress: bool = False) -> dict:
    """Greedy-decode every problem and compare its parsed answer with the true one.

    Args:
        logits_fn: ``tokens [b, s] int64 -> logits [b, s, v]`` (e.g. a model forward in eval
            mode); it must accept any ``s`` up to the prompt length + ``max_new_tokens``.
        max_new_tokens: None = longest true completion + 2 (room for the eod).
        device: where the token tensors are put before calling ``logits_fn`` (default CPU).
        progress: a progress bar over the problems (greedy decoding is slow on CPU).

    Returns:
        ``{"accuracy": float, "n": int, "examples": [dict(prompt, expected, predicted,
        completion, correct), ...]}`` with the first ``num_examples`` problems as examples.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"answer_accuracy batch_size={batch_size!r}: must be an integer >= 1")
    if not problems:
        return {"accuracy": 0.0, "n": 0, "examples": []}
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(p.completion)) for p in problems) + 2
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"answer_accuracy max_new_tokens={max_new_tokens!r}: must be >= 1")

    prompts = [document_ids(tokenizer, p.prompt, append_eod=False) for p in problems]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)

    predicted: list[Optional[int]] = [None] * len(problems)
    completions: list[str] = [""] * len(problems)
    from tqdm import tqdm

    bar = tqdm(total=len(problems), desc="answer accuracy (greedy)", unit="problem",
               disable=not progress, dynamic_ncols=True, leave=False)
    with torch.no_grad():
        for length in sorted(by_length):
            members = by_length[length]
            for begin in range(0, len(members), batch_size):
                chunk = members[begin:begin + batch_size]
                batch = torch.tensor([prompts[i] for i in chunk], dtype=torch.int64, device=device)
                new_ids, terminated = _generate(logits_fn, batch, max_new_tokens,
                                                tokenizer.eod_id, tokenizer.vocab_size)
                for i, ids, term in zip(chunk, new_ids, terminated):
                    completions[i] = tokenizer.decode(ids)
                    predicted[i] = parse_answer(completions[i], term)
                bar.update(len(chunk))
    bar.close()

    correct = [pred is not None and pred == p.answer for pred, p in zip(predicted, problems)]
    accuracy = sum(correct) / len(problems)
    examples = [{"prompt": p.prompt, "expected": p.answer, "predicted": predicted[i],
                 "completion": completions[i], "correct": correct[i]}
                for i, p in enumerate(problems[:num_examples])]
    logger.debug("answer accuracy %.1f%% on %d problems", 100 * accuracy, len(problems))
    return {"accuracy": accuracy, "n": len(problems), "examples": examples}
