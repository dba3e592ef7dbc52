"""No silent hang: a heartbeat watchdog that names a dead peer, and a desync detector that names each rank's phase.

A dead peer or a collective that can never complete must end the run, not park it until the collective timeout
(30 minutes by default). Each rank runs a daemon thread that writes a record into the rendezvous store every few
seconds and reads its peers' records:

* **heartbeat**: a rank whose record is older than ``stale_after`` seconds (``SFT_WATCHDOG_STALE_S``, 20 s) is
  reported by rank number and host. Heartbeats mean "process alive", not "making progress", so a long merge on
  rank 0 does not trip it. If the store itself is gone (its host, usually rank 0 or the node-0 launcher, died),
  that is reported the same way.
* **desync**: every rank publishes its *phase* and *step* (:func:`set_phase`: ``train`` step N, ``eval`` after
  step N, ``save`` of checkpoint N, ``save-adapter``, ...). Phases in :data:`COLLECTIVE_PHASES` run collectives
  that every rank must enter together. When a peer stays in a different collective phase, or has finished the
  run, for longer than ``desync_after`` seconds (``SFT_DESYNC_S``, 60 s) while this rank waits in one, the ranks
  can never meet again: this rank prints every rank's phase and step and exits. Each rank sees the disagreement
  on its own, so all of them stop within about ``desync_after`` seconds plus one interval.

Phases outside that set (``setup``, ``merge`` on rank 0 while the others ``wait-merge``, rank 0's accuracy pass)
are expected to differ between ranks and are never compared. A rank that finished marks itself done and is no
longer watched for heartbeats.

The process exits with ``os._exit(1)``: the main thread may be blocked inside a collective that never returns.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import torch.distributed as tdist

# Phases in which a rank runs collectives that every peer must run too, in the same order.
COLLECTIVE_PHASES = frozenset({"train", "eval", "save", "save-adapter"})

_phase: tuple[str, int, float] = ("setup", 0, time.time())  # (phase, step, since), this process's
_watchdog: "Watchdog | None" = None


def set_phase(phase: str, step: int = 0) -> None:
    """Declare what this rank is doing now (published with the next heartbeat). Cheap: no I/O here."""
    global _phase
    if (phase, step) != _phase[:2]:
        _phase = (phase, int(step), time.time())


def host_label() -> str:
    """This rank's host as the messages name it: the host name, and the scheduler's node name where it differs
    (under Slurm every node of a cluster may share a name, or resolve its own name to loopback)."""
    name = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME")
    return f"{name}, Slurm node {node}" if node and node != name else name


def describe(phase: str, step: int) -> str:
    return {
        "train": f"train step {step}",
        "eval": f"evaluation after step {step}",
        "save": f"saving checkpoint-{step}",
        "save-adapter": "saving the adapter",
        "done": "finished",
    }.get(phase, f"{phase} (step {step})")


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, interval: float, stale_after: float, desync_after: float):
        self.store, self.rank, self.world = store, rank, world_size
        self.interval, self.stale_after, self.desync_after = interval, stale_after, desync_after
        self._stop = threading.Event()
        self._started = time.time()
        self._apart_since: dict[int, float] = {}  # peer -> when we first saw it in another collective phase
        self._last_peers: dict[int, dict | None] = {}  # the peers' records at the last check
        self._hosts: dict[int, str] = {}
        self.store.set(f"sft/host/{rank}", host_label())
        self._beat()
        self._last_round = time.monotonic()  # when a heartbeat + check round last completed
        self.thread = threading.Thread(target=self._run, name="sft-watchdog", daemon=True)
        self.thread.start()
        # A store operation over a link that went down (no reset, the packets just stop) blocks in the socket read
        # whatever the store's timeout says (measured with torch 2.13: `check` still blocked after 100 s on a
        # downed veth, with a 5 s client timeout). So a second thread watches the first one's progress.
        self.deadman = threading.Thread(target=self._watch_rounds, name="sft-watchdog-deadman", daemon=True)
        self.deadman.start()

    def _beat(self) -> None:
        phase, step, since = _phase
        self.store.set(f"sft/hb/{self.rank}", json.dumps({"t": time.time(), "phase": phase, "step": step,
                                                          "since": since}))

    def _peer(self, r: int) -> dict | None:
        """A peer's last record ({"t", "phase", "step", "since"}, "done": True once it finished), None if it never beat."""
        if self.store.check([f"sft/done/{r}"]):
            return {"done": True, "phase": "done", "step": 0}
        if not self.store.check([f"sft/hb/{r}"]):
            return None
        return json.loads(self.store.get(f"sft/hb/{r}").decode())

    def _host(self, r: int) -> str:
        if r not in self._hosts:  # remembered: when a peer is lost, the store may be unreachable too
            key = f"sft/host/{r}"
            if not self.store.check([key]):
                return "?"
            self._hosts[r] = self.store.get(key).decode()
        return self._hosts[r]

    def _watch_rounds(self) -> None:
        while not self._stop.wait(self.interval):
            stuck = time.monotonic() - self._last_round
            if stuck > self.stale_after + self.interval and not self._stop.is_set():
                seen = f"; last seen: {self.phases(self._last_peers)}" if self._last_peers else ""
                self._fail(f"lost contact with rank 0's node: the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                           f"{os.environ.get('MASTER_PORT')} has not answered for {stuck:.0f} s (the network to it "
                           f"is down, or its host hangs){seen}")

    def _fail(self, message: str) -> None:
        print(f"error: rank {self.rank}: {message}; stopping this rank", file=sys.stderr, flush=True)
        os._exit(1)

    def phases(self, peers: dict[int, dict | None] | None = None) -> str:
        """Every rank's phase and step, one clause each: 'rank 0 at train step 4, rank 1 at evaluation after step 3'."""
        peers = peers if peers is not None else {r: self._peer(r) for r in range(self.world) if r != self.rank}
        phase, step, _ = _phase
        parts = {self.rank: describe(phase, step)}
        for r, rec in peers.items():
            parts[r] = "?" if rec is None else describe(rec["phase"], rec["step"])
        return ", ".join(f"rank {r} at {parts[r]}" for r in sorted(parts))

    def _check(self) -> None:
        now = time.time()
        peers = {r: self._peer(r) for r in range(self.world) if r != self.rank}
        self._last_peers = peers
        phase, step, since = _phase
        for r, rec in peers.items():
            if rec is None:
                age = now - self._started  # never seen: count from our own start
                if age > self.stale_after:
                    self._fail(f"rank {r} (host {self._host(r)}) never reported: no heartbeat for {age:.0f} s")
                continue
            if not rec.get("done"):
                age = now - float(rec["t"])
                if age > self.stale_after:
                    self._fail(f"rank {r} (host {self._host(r)}) stopped responding: no heartbeat for {age:.0f} s")
            if phase not in COLLECTIVE_PHASES:
                self._apart_since.pop(r, None)
                continue
            if rec.get("done"):
                # the peer has left the run while we wait in a collective it will never join
                if now - since > self.desync_after:
                    self._fail(f"rank {r} (host {self._host(r)}) finished the run while this rank waits in "
                               f"{describe(phase, step)} for {now - since:.0f} s: the ranks disagree on the number "
                               f"of steps or collectives ({self.phases(peers)})")
                continue
            apart = rec["phase"] in COLLECTIVE_PHASES and (rec["phase"], rec["step"]) != (phase, step)
            if not apart:
                self._apart_since.pop(r, None)
                continue
            first = self._apart_since.setdefault(r, now)
            if now - first > self.desync_after:
                self._fail(f"the ranks are in different collectives for {now - first:.0f} s and can never meet: "
                           f"{self.phases(peers)}. A rank ran a step, evaluation or save that its peers did not "
                           "(uneven data or a rank-dependent condition)")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                self._check()
                for r in range(self.world):
                    self._host(r)  # learn the peers' hosts while the store answers
                self._last_round = time.monotonic()
            except Exception as e:  # the store is gone: its host died
                if self._stop.is_set():
                    return
                seen = f"; last seen: {self.phases(self._last_peers)}" if self._last_peers else ""
                self._fail(f"lost contact with rank 0's node: the rendezvous store at "
                           f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} did not answer (its host "
                           f"died, or the network to it is down): {e}{seen}")

    def stop(self) -> None:
        try:
            self.store.set(f"sft/done/{self.rank}", "1")
        except Exception:
            pass
        self._stop.set()
        # let both threads leave their store calls before the interpreter exits: a daemon thread still inside a
        # c10d store call at exit aborted a finished rank ("terminate called without an active exception"),
        # which srun --kill-on-bad-exit turned into a failed job
        for t in (self.thread, self.deadman):
            if t is not threading.current_thread():
                t.join(timeout=self.interval + 5)


def start_watchdog(interval: float = 2.0, stale_after: float | None = None,
                   desync_after: float | None = None) -> "Watchdog | None":
    """Start the watchdog when running with world size > 1 (no-op otherwise)."""
    global _watchdog
    if _watchdog is not None or not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return _watchdog
    stale_after = stale_after or float(os.environ.get("SFT_WATCHDOG_STALE_S", "20"))
    desync_after = desync_after or float(os.environ.get("SFT_DESYNC_S", "60"))
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # private API: without it we fall back to the collective timeout
        return None
    _watchdog = Watchdog(store, tdist.get_rank(), tdist.get_world_size(), interval, stale_after, desync_after)
    return _watchdog


def stop_watchdog() -> None:
    global _watchdog
    set_phase("done")
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def _looks_distributed(error: BaseException) -> bool:
    """A failed or timed-out collective (torch's DistError family, or the gloo / NCCL transport errors)."""
    if isinstance(error, getattr(tdist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe",
                                   "collective"))


def explain_failure(error: BaseException) -> None:
    """Called when a collective failed: give the watchdog time to find and name a dead or desynchronised peer (it
    then exits this process with a message naming it). Returns if every peer is alive and in step, so the caller
    re-raises ``error``; the phases of every rank are printed first."""
    wd = _watchdog
    if wd is None or not _looks_distributed(error):
        return  # an ordinary error (a bug, bad input) is re-raised at once
    deadline = time.time() + max(wd.stale_after, min(wd.desync_after, 30.0)) + 3 * wd.interval
    while time.time() < deadline and wd.thread.is_alive():
        time.sleep(wd.interval / 2)
    try:
        print(f"error: rank {wd.rank}: a collective failed ({type(error).__name__}); {wd.phases()}",
              file=sys.stderr, flush=True)
    except Exception:
        pass
