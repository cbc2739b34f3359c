"""The one exception type that means "the user asked for something we cannot do", and how to find it again."""

from __future__ import annotations

from collections.abc import Iterator


class HashrayError(ValueError):
    """A problem with the user's input or configuration.

    The CLI prints its message as one line and exits with code 2, so the message
    must say what was wrong, where (file/row/field), and what is allowed.
    """


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every error behind it, outermost first.

    Follows ``__cause__``/``__context__``, the ``cause`` a Ray task error keeps
    of the original, and the ``worker_failures`` of a Ray Train run that
    failed (one error per worker), so an error raised in a Ray worker is found
    from the driver without importing Ray here.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "worker_failures", None)
        behind = [getattr(current, "cause", None), current.__cause__, current.__context__]
        if isinstance(failures, dict):
            behind += list(failures.values())
        pending += [e for e in behind if isinstance(e, BaseException)]


def find_cause(error: BaseException, kind: type[BaseException] = HashrayError) -> BaseException | None:
    """The first error of type ``kind`` behind ``error`` (``error`` itself included), or None.

    Ray re-raises a worker's error as a subclass of the error's own type whose
    message is a whole traceback, keeping the original as ``cause``: such a
    wrapper is skipped for the original, which holds the one line.
    """
    for current in causes(error):
        if isinstance(current, kind) and not isinstance(getattr(current, "cause", None), kind):
            return current
    return None
