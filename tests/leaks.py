"""Where a secret could leak from a failure: the texts of an exception and of everything chained to it."""

from __future__ import annotations

__all__ = ["exception_texts"]


def exception_texts(exc: BaseException) -> list[str]:
    """str, repr and args of the exception and of everything chained to it (ten links at most)."""
    texts: list[str] = []
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        texts += [str(seen), repr(seen), *(str(a) for a in seen.args)]
        seen = seen.__cause__ or seen.__context__
    return texts
