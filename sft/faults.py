"""Fault injection: the one place the failure points of sft's crash, resume and desync tests live.

Each point is named by an environment variable and costs one dictionary lookup when unset. Tests set them on
the processes they start; nothing in normal use does.

| variable | value | effect |
|---|---|---|
| ``SFT_FAULT_KILL`` | ``STEP`` or ``RANK:STEP`` | SIGKILL that rank (default 0) at the end of that optimizer step, before the step's checkpoint |
| ``SFT_FAULT_KILL_SAVE`` | ``STEP`` or ``RANK:STEP`` | SIGKILL while checkpoint STEP is half written (model and optimizer written, the rest not) |
| ``SFT_FAULT_KILL_MERGE`` | ``N`` | SIGKILL the merge after its N-th output shard |
| ``SFT_FAULT_DESYNC`` | ``RANK:STEP`` | that rank alone evaluates after that step: a rank-dependent collective its peers never join |
| ``SFT_FAULT_LOSS`` | ``KIND:RANK:STEP`` | that rank's training loss of that optimizer step is multiplied by NaN (``nan``) or 0 (``zero``) before its backward |
| ``SFT_FAULT_SIGNAL`` | ``RANK:STEP:SIG`` | that rank sends itself SIG (``TERM``, ``USR1``) at the end of that step, as a scheduler would |
"""

from __future__ import annotations

import os
import signal

KILL = "SFT_FAULT_KILL"
KILL_SAVE = "SFT_FAULT_KILL_SAVE"
KILL_MERGE = "SFT_FAULT_KILL_MERGE"
DESYNC = "SFT_FAULT_DESYNC"
LOSS = "SFT_FAULT_LOSS"
SIGNAL = "SFT_FAULT_SIGNAL"


def _rank_step(var: str) -> tuple[int, int] | None:
    spec = os.environ.get(var)
    if not spec:
        return None
    rank, step = (int(x) for x in spec.split(":")) if ":" in spec else (0, int(spec))
    return rank, step


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(var: str, rank: int, step: int) -> None:
    """``var`` (KILL or KILL_SAVE) = "STEP" (rank 0) or "RANK:STEP": SIGKILL this process if it is that rank at
    that step."""
    point = _rank_step(var)
    if point is not None and point == (rank, step):
        _die()


def kill_after_shard(n_written: int) -> None:
    """KILL_MERGE = N: SIGKILL the merge once it has written its N-th output shard."""
    spec = os.environ.get(KILL_MERGE)
    if spec and int(spec) == n_written:
        _die()


def desync_at(rank: int, step: int) -> bool:
    """DESYNC = "RANK:STEP": whether this rank should evaluate alone after this step."""
    spec = os.environ.get(DESYNC)
    return bool(spec) and [int(x) for x in spec.split(":")] == [rank, step]


def poison_loss(loss, rank: int, step: int):
    """LOSS = "KIND:RANK:STEP" (KIND nan or zero): ``loss`` times NaN or 0 on that rank at that optimizer step (the
    bad value then goes through the real backward, gradient clipping and optimizer step); else ``loss`` itself."""
    spec = os.environ.get(LOSS)
    if not spec:
        return loss
    kind, r, s = spec.split(":")
    if (int(r), int(s)) != (rank, step):
        return loss
    return loss * {"nan": float("nan"), "zero": 0.0}[kind]


def armed(var: str) -> bool:
    """Whether the failure point ``var`` is set (one dictionary lookup)."""
    return bool(os.environ.get(var))


def signal_at(rank: int, step: int) -> None:
    """SIGNAL = "RANK:STEP:SIG": send this process SIG (e.g. TERM, USR1) if it is that rank at that step."""
    spec = os.environ.get(SIGNAL)
    if not spec:
        return
    r, s, name = spec.split(":")
    if (int(r), int(s)) == (rank, step):
        os.kill(os.getpid(), getattr(signal, f"SIG{name.upper().removeprefix('SIG')}"))
