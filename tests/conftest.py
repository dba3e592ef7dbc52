"""Shared fixtures. Tests never touch the network: the hub is off, and caches go to a per-session folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# sft's own caches (the per-dataset token-length cache) go to a per-session folder, never the user's ~/.cache.
if "SFT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sft-test-cache-")
