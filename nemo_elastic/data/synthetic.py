"""Deterministic synthetic *reasoning* corpus: multi-step integer arithmetic with worked steps.

Embedded default data source (no download).  One problem is a left-to-right chain
``v0 = a0; v_i = v_{i-1} <op_i> b_i``, written with the minimal parentheses that standard
precedence needs (so Python's ``eval`` of the question gives the answer), followed by the worked
steps and the final answer::

    Q:(3+4)*2-5=?
    S:3+4=7;7*2=14;14-5=9
    A:9

(three lines joined by ``\\n``, no trailing newline).  The steps are a pure function of the
question (always evaluate the leftmost operation first), so a model can learn them.  With the
default knobs (1-3 steps, operands <= 20, every intermediate value in [0, 99]) a sample is 12-49
characters, typically ~35; as tokens add 2 (bos, eod) per document.

The prompt a model is given at evaluation is everything up to and including ``"\\nS:"``; it must
produce the steps, ``"\\nA:"``, the answer and then eod.

Determinism: a ``random.Random(seed)`` stream of candidate problems is deduplicated by question;
the first ``num_val`` unique questions form the validation split, the next ``num_train`` the train
split.  Hence the splits are disjoint, identical for the same config, and the validation split
does not depend on ``num_train`` (useful for comparing training budgets on the same problems).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

SUPPORTED_OPERATIONS = ("+", "-", "*")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_ATOM_PRECEDENCE = 3
QUESTION_PREFIX, STEPS_PREFIX, ANSWER_PREFIX = "Q:", "S:", "A:"
QUESTION_SUFFIX = "=?"
STEP_SEPARATOR = ";"


def _apply(op: str, left: int, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"operation {op!r} is not supported; use one of {SUPPORTED_OPERATIONS}")


@dataclass(kw_only=True)
class SyntheticReasoningConfig:
    """Knobs of the synthetic arithmetic corpus. Every field is validated in ``__post_init__``."""

    seed: int = 1234
    num_train: int = 20000
    num_val: int = 500
    min_steps: int = 1  # operations per problem, drawn uniformly in [min_steps, max_steps]
    max_steps: int = 3
    min_operand: int = 0  # operands (the literals in the question) drawn uniformly in this range
    max_operand: int = 20
    operations: tuple[str, ...] = SUPPORTED_OPERATIONS
    min_value: int = 0  # every intermediate and final value must lie in [min_value, max_value]
    max_value: int = 99
    max_attempts_factor: int = 50  # give up after factor * (num_train + num_val) candidate draws

    def __post_init__(self) -> None:
        self.operations = tuple(self.operations)
        for name in ("num_train", "num_val", "min_steps", "max_steps", "max_attempts_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SyntheticReasoningConfig.{name}={value!r}: must be an integer "
                                 ">= 0")
        if self.min_steps < 1:
            raise ValueError(f"SyntheticReasoningConfig.min_steps={self.min_steps!r}: must be >= 1")
        if self.min_steps > self.max_steps:
            raise ValueError(f"SyntheticReasoningConfig.min_steps={self.min_steps!r}: must be <= "
                             f"max_steps={self.max_steps}; raise max_steps or lower min_steps")
        if self.min_operand < 0 or self.min_operand > self.max_operand:
            raise ValueError(f"SyntheticReasoningConfig.min_operand={self.min_operand!r}: must "
                             f"be in [0, max_operand={self.max_operand}] (operands are "
                             "non-negative literals)")
        if not self.operations:
            raise ValueError("SyntheticReasoningConfig.operations=(): needs at least one of "
                             f"{SUPPORTED_OPERATIONS}")
        bad = [op for op in self.operations if op not in SUPPORTED_OPERATIONS]
        if bad:
            raise ValueError(f"SyntheticReasoningConfig.operations={self.operations!r}: {bad} not "
                             f"supported; use a subset of {SUPPORTED_OPERATIONS}")
        if self.min_value > self.max_value:
            raise ValueError(f"SyntheticReasoningConfig.min_value={self.min_value!r}: must be <= "
                             f"max_value={self.max_value}")
        if not self.min_value <= self.min_operand or not self.max_operand <= self.max_value:
            raise ValueError(f"SyntheticReasoningConfig.max_operand={self.max_operand!r}: operand "
                             f"range [{self.min_operand}, {self.max_operand}] must lie inside the "
                             f"value range [{self.min_value}, {self.max_value}]")
        if self.max_attempts_factor < 1:
            raise ValueError("SyntheticReasoningConfig.max_attempts_factor="
                             f"{self.max_attempts_factor!r}: must be >= 1")


@dataclass(frozen=True)
class Step:
    """One worked step ``left op right = result``."""

    left: int
    op: str
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left}{self.op}{self.right}={self.result}"


@dataclass(frozen=True)
class ReasoningProblem:
    """A question (an infix expression), its worked steps and its integer answer."""

    question: str  # e.g. "(3+4)*2-5"
    steps: tuple[Step, ...]
    answer: int

    @property
    def prompt(self) -> str:
        """What the model is given: ends where it must start the worked steps."""
        return f"{QUESTION_PREFIX}{self.question}{QUESTION_SUFFIX}\n{STEPS_PREFIX}"

    @property
    def completion(self) -> str:
        """What the model must generate after the prompt (before eod)."""
        steps = STEP_SEPARATOR.join(str(s) for s in self.steps)
        return f"{steps}\n{ANSWER_PREFIX}{self.answer}"

    @property
    def text(self) -> str:
        """The whole training document (without special tokens)."""
        return self.prompt + self.completion


@dataclass(frozen=True)
class SyntheticCorpus:
    """The two disjoint splits of a generated corpus."""

    config: SyntheticReasoningConfig
    train: tuple[ReasoningProblem, ...] = field(repr=False)
    val: tuple[ReasoningProblem, ...] = field(repr=False)


def build_problem(first: int, ops: Sequence[tuple[str, int]]) -> ReasoningProblem:
    """Build the problem ``((first op0 b0) op1 b1) ...``: question text, steps and answer."""
    text, precedence, value = str(first), _ATOM_PRECEDENCE, first
    steps = []
    for op, operand in ops:
        op_precedence = _PRECEDENCE[op]
        # Left-associative chain: the left part needs parentheses only if it binds more loosely.
        left_text = f"({text})" if precedence < op_precedence else text
        text, precedence = f"{left_text}{op}{operand}", op_precedence
        result = _apply(op, value, operand)
        steps.append(Step(value, op, operand, result))
        value = result
    return ReasoningProblem(question=text, steps=tuple(steps), answer=value)


def _draw_problem(rng: random.Random, config: SyntheticReasoningConfig) -> ReasoningProblem | None:
    """One candidate; None when an intermediate value leaves [min_value, max_value]."""
    num_steps = rng.randint(config.min_steps, config.max_steps)
    first = rng.randint(config.min_operand, config.max_operand)
    ops = [(rng.choice(config.operations), rng.randint(config.min_operand, config.max_operand))
           for _ in range(num_steps)]
    problem = build_problem(first, ops)
    if any(not config.min_value <= s.result <= config.max_value for s in problem.steps):
        return None
    return problem


def generate_corpus(config: SyntheticReasoningConfig) -> SyntheticCorpus:
    """Generate the deterministic train/val splits described in the module docstring."""
    rng = random.Random(config.seed)
    wanted = config.num_train + config.num_val
    max_attempts = config.max_attempts_factor * max(wanted, 1)
    seen: set[str] = set()
    problems: list[ReasoningProblem] = []
    attempts = 0
    while len(problems) < wanted:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"SyntheticReasoningConfig: found only {len(problems)} distinct questions after "
                f"{max_attempts} draws but num_train + num_val = {wanted}; the question space "
                f"is too small: raise max_steps={config.max_steps}, max_operand="
                f"{config.max_operand} or max_value={config.max_value}, or lower num_train")
        problem = _draw_problem(rng, config)
        if problem is None or problem.question in seen:
            continue
        seen.add(problem.question)
        problems.append(problem)
    val, train = tuple(problems[:config.num_val]), tuple(problems[config.num_val:])
    lengths = [len(p.text) for p in problems] or [0]
    logger.info("synthetic corpus: %d train + %d val problems (%d draws), chars/sample "
                "min %d mean %.1f max %d", len(train), len(val), attempts, min(lengths),
                sum(lengths) / len(lengths), max(lengths))
    return SyntheticCorpus(config=config, train=train, val=val)


def write_text_corpus(problems: Iterable[ReasoningProblem], path: str | Path) -> int:
    """Write problems as a blank-line separated text file (the `preprocess` "paragraphs" format).

    Returns the number of documents written.
    """
    texts = [p.text for p in problems]
    Path(path).write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return len(texts)
