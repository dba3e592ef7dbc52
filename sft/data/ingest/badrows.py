"""The bad-row policy of ``sft ingest``: collect every bad row of a run, then fail with all of them or skip them.

A *bad row* is one record that cannot become a row (broken JSON, a missing field, a value that is not text, an
invalid conversation, ...). A *problem* is a bad row or an input that holds no records at all. ``fail`` (the
default) reads every input to the end, then raises one :class:`IngestError` listing the first
:data:`SHOWN` problems in full (location, field, what is wrong) and a count of the rest, and nothing is written.
``skip`` writes the good rows and reports how many rows were skipped and their line numbers; an input without
any record is still an error (that is a wrong file, not a bad row).
"""

from __future__ import annotations

import os

from sft.errors import IngestError
from sft.runs import runs

POLICIES = ("fail", "skip")

#: Problems shown in full; the rest are counted (with their locations, which are short).
SHOWN = 20


def check_policy(on_bad_row: str) -> str:
    if on_bad_row not in POLICIES:
        raise IngestError(f"on_bad_row: {on_bad_row!r} is not a policy; use fail or skip (--on-bad-row)")
    return on_bad_row


def _ranges(numbers: list[int]) -> str:
    """[2, 4, 5, 6, 9] -> "2, 4-6, 9" when runs are long; plain lists stay plain."""
    parts: list[str] = []
    for lo, hi in runs(numbers):
        parts.extend([f"{lo}-{hi}"] if hi - lo >= 2 else (str(n) for n in range(lo, hi + 1)))
    return ", ".join(parts)


class Problems:
    """Bad rows and empty inputs of one ingest run, in input order."""

    def __init__(self) -> None:
        self.messages: list[str] = []  # the first SHOWN problems, in full
        self.rows = 0  # bad rows
        self.empty: list[str] = []  # inputs without records
        self.locations: dict[str, list[int]] = {}  # input -> numbers of its bad rows
        self.units: dict[str, str] = {}  # input -> "line" / "record" / "row"
        self._overflow: list[tuple[str, int]] = []

    @property
    def count(self) -> int:
        return self.rows + len(self.empty)

    def _add(self, message: str) -> None:
        if len(self.messages) < SHOWN:
            self.messages.append(message)

    def bad_row(self, path: str, unit: str, number: int, message: str) -> None:
        self.rows += 1
        self.locations.setdefault(path, []).append(number)
        self.units.setdefault(path, unit)
        if len(self.messages) >= SHOWN:
            self._overflow.append((path, number))
        self._add(message)

    def empty_input(self, path: str) -> None:
        self.empty.append(path)
        self._add(f"{path}: no rows (the file holds no records); remove it from the inputs")

    def _rest(self) -> str:
        if not self._overflow:
            return ""
        by_file: dict[str, list[int]] = {}
        for path, n in self._overflow:
            by_file.setdefault(path, []).append(n)
        where = "; ".join(f"{'' if len(by_file) == 1 else os.path.basename(p) + ' '}{self.units[p]}s {_ranges(ns)}"
                          for p, ns in by_file.items())
        return f"  ... and {len(self._overflow)} more bad rows ({where})"

    def error(self, out: str, inputs: list[str], good: int, policy: str) -> IngestError:
        """The one error of a failed run: every problem (the first SHOWN in full), nothing written."""
        what = f"{self.rows} bad row{'s' * (self.rows != 1)}" if not self.empty else f"{self.count} problems"
        where = inputs[0] if len(inputs) == 1 else "the input"
        lines = [f"{what} in {where}; nothing was written to {out}:"]
        lines += [f"  {m}" for m in self.messages]
        if self._overflow:
            lines.append(self._rest())
        if self.empty:
            lines.append("Remove the empty input(s) and run again.")
        elif policy == "fail":
            lines.append(f"Fix them and run again, or pass --on-bad-row skip to write the {good} good "
                         f"row{'s' * (good != 1)} and skip these.")
        return IngestError("\n".join(lines))

    def skipped_summary(self) -> list[str]:
        """What ``--on-bad-row skip`` prints: the count, the locations per input, then the reasons."""
        where = "; ".join(f"{os.path.basename(p)} {self.units[p]}s {_ranges(ns)}" for p, ns in self.locations.items())
        lines = [f"  skipped {self.rows} bad row{'s' * (self.rows != 1)}: {where}"]
        lines += [f"    {m}" for m in self.messages]
        if self._overflow:
            lines.append("  " + self._rest())
        return lines
