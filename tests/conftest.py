"""Shared fixtures (shared helpers: tests/helpers.py). Tests never touch the network: the hub is off, and caches go
to a per-session folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# sft's own caches (the per-dataset token-length cache) go to a per-session folder, never the user's ~/.cache.
if "SFT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sft-test-cache-")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def smollm2(request):
    """The SmolLM2-135M-Instruct tokenizer (tests.helpers.load_smollm2), cached in pytest's cache dir."""
    from tests.helpers import load_smollm2, smollm2_cache_root

    return load_smollm2(smollm2_cache_root(request))


@pytest.fixture
def sft(capsys):
    """``sft(*argv)``: the real CLI in this process (tests.helpers.run_cli) with this test's captured output."""
    from tests.helpers import run_cli

    return lambda *argv: run_cli(capsys, *argv)


@pytest.fixture(scope="module", autouse=True)
def fresh_compiled_kernels():
    """Each test module starts with dynamo's caches empty and sft's compiled CPU kernels (fused RMSNorm, SwiGLU) on.

    The suite compiles those kernels for many shapes and dtypes in one process; past dynamo's recompile limit a
    fullgraph compile fails, and the kernel's fallback (its "torch.compile failed" warning) turns it off for the rest
    of the process, so a later module that asserts the kernel ran would fail for what an earlier one did. A training
    run compiles a handful of shapes and never gets there."""
    import sys

    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
    for name in ("sft.ops.norm", "sft.ops.mlp"):
        if name in sys.modules:
            sys.modules[name]._state["broken"] = False
    yield
