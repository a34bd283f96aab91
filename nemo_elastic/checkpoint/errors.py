"""The checkpoint error and the one-line root cause of a failed read or write."""

from __future__ import annotations

from nemo_elastic.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


def exc_chain(err: BaseException) -> list[BaseException]:
    """`err`, its causes and contexts, and the first failure of every CheckpointException
    (torch's: rank -> (exception, traceback)) on the way, outermost first."""
    out, cur = [], err
    while cur is not None and cur not in out:
        out.append(cur)
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            out.append(first[0] if isinstance(first, tuple) else first)
        cur = cur.__cause__ or cur.__context__
    return out


def root_cause(err: BaseException) -> str:
    """One line for what went wrong deep inside `err` (torch's CheckpointException pastes whole
    tracebacks into its message): the first OSError of the chain (strerror and file), else the
    innermost exception's first line."""
    seen, chain, cur = set(), [], err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        nxt = None
        failures = getattr(cur, "failures", None)  # CheckpointException: rank -> (exc, tb)
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            nxt = first[0] if isinstance(first, tuple) else first
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    for exc in chain:
        if isinstance(exc, OSError) and exc.strerror:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{exc.strerror.lower()}{where}"
    inner = chain[-1]
    text = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__
