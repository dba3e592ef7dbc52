"""Runs of consecutive integers, and the compact list notation built on them ("0-3,8")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def runs(numbers: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive values in ``numbers``, as given (not sorted): [0, 1, 2, 5] -> [(0, 2), (5, 5)]."""
    out: list[list[int]] = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [(a, b) for a, b in out]


def format_int_list(numbers: Iterable[int]) -> str:
    """The sorted distinct ``numbers`` in CPU-list notation: [0, 1, 2, 3, 8] -> "0-3,8"."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs(sorted(set(numbers))))
