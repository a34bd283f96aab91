"""Exact-match answer accuracy of greedy generation on reasoning problems.

For each problem the prompt is ``document_ids(tokenizer, problem.prompt, append_eod=False)``
(``[bos] + "Q:<question>=?\\nS:"``: the model must continue with the worked steps).  Generation
is greedy through the package's one decoder (`nemo_elastic.inference`): given a model, stateful
(prompt prefilled once, then one token's forward per new token with the KV cache and Mamba
states); given a ``tokens -> logits`` callable, a full forward per token.  It stops at eod or
after ``max_new_tokens``.  The predicted answer is the integer after the first ``"A:"`` of the
completion; it counts only if the number is terminated (by eod or any non-digit), so a
generation cut off by ``max_new_tokens`` mid-number is not a hit.

Batching is exact: problems are sorted by prompt length and decoded in chunks of ``batch_size``
rows; prompts of different lengths need no padding (see `inference.decoder`), so every row's
answer is the one it gets alone.
"""

from __future__ import annotations

import logging
import re
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


def answer_accuracy(model: torch.nn.Module | LogitsFn, tokenizer: TokenizerProtocol,
                    problems: Sequence[ReasoningProblem], max_new_tokens: Optional[int] = None,
                    batch_size: int = 32, *, num_examples: int = 4,
                    device: Optional[torch.device | str] = None, progress: bool = False) -> dict:
    """Greedy-decode every problem and compare its parsed answer with the true one.

    Args:
        model: a one-process HybridModel (in eval mode; decoded with its state), or any
            ``tokens [b, s] int64 -> logits [b, s, v]`` callable (a full forward per token).
        max_new_tokens: None = longest true completion + 2 (room for the eod).
        device: where the token tensors are put before calling a ``logits_fn`` (a model's own
            device is used for a model).
        progress: a progress bar over the problems.

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

    from tqdm import tqdm

    from nemo_elastic.inference import cached, decode_batch, uncached

    steppers = cached(model) if isinstance(model, torch.nn.Module) else uncached(model, device)
    prompts = [document_ids(tokenizer, p.prompt, append_eod=False) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: len(prompts[i]))  # similar lengths
    predicted: list[Optional[int]] = [None] * len(problems)
    completions: list[str] = [""] * len(problems)
    bar = tqdm(total=len(problems), desc="answer accuracy (greedy)", unit="problem",
               disable=not progress, dynamic_ncols=True, leave=False)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        done = decode_batch(steppers, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                            eod_id=tokenizer.eod_id, vocab_size=tokenizer.vocab_size)
        for i, result in zip(chunk, done):
            completions[i] = tokenizer.decode(result.tokens)
            predicted[i] = parse_answer(completions[i], result.terminated)
        bar.update(len(chunk))
    bar.close()

    correct = [pred is not None and pred == p.answer for pred, p in zip(predicted, problems)]
    accuracy = sum(correct) / len(problems)
    examples = [{"prompt": p.prompt, "expected": p.answer, "predicted": predicted[i],
                 "completion": completions[i], "correct": correct[i]}
                for i, p in enumerate(problems[:num_examples])]
    logger.debug("answer accuracy %.1f%% on %d problems", 100 * accuracy, len(problems))
    return {"accuracy": accuracy, "n": len(problems), "examples": examples}
