"""The registry of sft's changes to other libraries' objects: what each changes, why, the versions it was verified
on, the documented alternative, whether it ran in this process, and a canary check.

A *patch* here is anything sft does to a library's objects that the library's documented API does not offer:
replacing a method or an instance's ``forward``, wrapping a library function, swapping a module-level function,
setting an undocumented or private attribute that the library's own code reads, or overriding a private method of
a class sft subclasses (``transformers.Trainer``). Setting documented public attributes (a config field,
``tokenizer.pad_token``, ``nn.Dropout.p``, a ``TrainerControl`` flag) is ordinary use and not listed; documented
registrations (``AttentionInterface.register``) are listed with ``kind="registration"``, since they also change
what the library does process-wide.

Every assignment to another library's objects lives in ``sft/patches/<library>.py``; the Trainer overrides stay in
sft's Trainer mixins (sft/trainer/) and are listed here with the same metadata. ``applied(name)`` records that a
patch ran on a real code path of this process (installed on a model that has the patched modules, or the override
was called); summary.json lists them (``patches``). ``runs`` (optional) counts how often the patched path itself
ran, so the canaries (tests/test_patches.py) can tell "installed" from "still running after ``model.train()``".
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable

#: the library versions the patches were verified on: sft's venv (tests/test_patches.py and the suite ran on these)
VERIFIED = {
    "transformers": "5.25.0",
    "accelerate": "1.16.0",
    "peft": "0.21.2",
    "torch": "2.13.0+cpu",
    "bitsandbytes": "0.50.2",
    "deepspeed": "0.19.8",
}
#: the GPU image's pins (Makefile GPU_IMAGE_PINS): `make test-gpu-versions` (in CI) trains, merges and runs QLoRA on
#: these and runs every canary (tests/test_patches.py; 2026-12-07: all passed with torch 2.13 CPU, deepspeed's
#: skipped since the image has no deepspeed)
GPU_IMAGE = {
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "peft": "0.21.0",
    "bitsandbytes": "0.50.2",
}


class PatchBroken(AssertionError):
    """A patched library object is missing or has changed shape: the patch named in the message needs a look."""


@dataclass(frozen=True)
class Patch:
    name: str  # "<library>.<what>", e.g. "transformers.rmsnorm_forward"
    library: str  # the patched library's distribution name
    target: str  # the library object changed
    kind: str  # instance-forward | instance-attribute | module-swap | wrapped-method | module-function |
    # private-attribute | trainer-override | registration
    what: str
    why: str
    alternative: str  # the documented alternative, or why there is none / why it is not used
    where: str  # the sft module that holds the assignment (or the override)
    verified: tuple[str, ...] = ()  # "transformers 5.25.0", ...
    check: Callable[[], None] | None = field(default=None, compare=False, repr=False)  # raises PatchBroken
    runs: Callable[[], int] | None = field(default=None, compare=False, repr=False)  # runs of the patched path


_REGISTRY: dict[str, Patch] = {}
_applied: set[str] = set()


def _versions(library: str, also: tuple[str, ...]) -> tuple[str, ...]:
    return ((f"{library} {VERIFIED[library]}",) if library in VERIFIED else ()) + tuple(also)


def register(name: str, library: str, target: str, kind: str, what: str, why: str, alternative: str, where: str,
             check: Callable[[], None] | None = None, runs: Callable[[], int] | None = None,
             also: tuple[str, ...] = ()) -> Patch:
    """Add a patch to the registry (at import of its sft/patches module). ``also``: further versions it ran on."""
    p = Patch(name, library, target, kind, what, why, alternative, where, _versions(library, also), check, runs)
    _REGISTRY[name] = p
    return p


def applied(name: str) -> None:
    """Record that patch ``name`` ran on a real code path of this process."""
    if name not in _REGISTRY:
        raise KeyError(f"sft.patches: no patch named {name!r}")
    _applied.add(name)


def ran() -> list[str]:
    """The names of the patches that ran in this process, sorted (what summary.json lists)."""
    return sorted(_applied)


def reset() -> None:
    """Forget which patches ran (tests)."""
    _applied.clear()


def registry() -> dict[str, Patch]:
    return dict(_REGISTRY)


def override(name: str):
    """Decorator for a Trainer method sft overrides: calling it records patch ``name`` as applied."""
    def wrap(fn):
        @functools.wraps(fn)
        def method(*args, **kwargs):
            _applied.add(name)
            return fn(*args, **kwargs)
        method.sft_patch = name
        return method
    return wrap


# -- helpers for the canary checks -------------------------------------------------------------------------------

def need(cond: bool, patch: str, message: str) -> None:
    if not cond:
        raise PatchBroken(f"sft patch {patch}: {message} (verified on {', '.join(_REGISTRY[patch].verified)})")


def need_attr(obj: Any, attr: str, patch: str) -> Any:
    need(hasattr(obj, attr), patch, f"{getattr(obj, '__name__', type(obj).__name__)}.{attr} no longer exists")
    return getattr(obj, attr)


def need_params(fn: Callable, params: tuple[str, ...], patch: str, prefix: bool = True) -> None:
    """``fn``'s parameter names start with ``params`` (``prefix``) or include them all."""
    got = tuple(inspect.signature(fn).parameters)
    ok = got[:len(params)] == params if prefix else set(params) <= set(got)
    need(ok, patch, f"{getattr(fn, '__qualname__', fn)} takes {got}, the patch expects {params}")


def route_forward(model, applies_to, forward, patch: str) -> int:
    """Give every module of ``model`` that ``applies_to`` an instance-level ``forward`` (the class, saved weights
    and the merged model are unchanged); records ``patch`` as ran when any was routed. Returns how many."""
    n = 0
    for m in model.modules():
        if applies_to(m):
            m.forward = types.MethodType(forward, m)
            n += 1
    if n:
        applied(patch)
    return n
