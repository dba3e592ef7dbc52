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
