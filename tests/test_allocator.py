"""training.allocator: which allocator a process starts on, and that `sft train`'s re-exec really preloads it."""

import os
import subprocess
import sys
import textwrap

import pytest

from sft import allocator
from sft.errors import ConfigError

HAVE = {name: allocator.find_library(name) is not None for name in ("jemalloc", "tcmalloc", "mimalloc")}


def test_unknown_or_missing_allocator_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="not one of"):
        allocator.resolve("hoard")
    monkeypatch.setattr(allocator, "find_library", lambda name: None)
    with pytest.raises(ConfigError, match="libjemalloc2"):
        allocator.resolve("jemalloc")
    assert allocator.resolve("auto") == ("system", None)  # auto falls back instead of failing
    assert allocator.resolve("system") == ("system", None)
    assert allocator.preload_env("auto", {}) == {}


@pytest.mark.skipif(not HAVE["jemalloc"], reason="libjemalloc2 is not installed (apt-get install libjemalloc2)")
def test_preload_env_prepends_and_respects_the_users_own_allocator():
    path = allocator.find_library("jemalloc")
    env = allocator.preload_env("jemalloc", {"LD_PRELOAD": "/opt/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{path}:/opt/libfoo.so"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert "MALLOC_CONF" not in allocator.preload_env("jemalloc", {"MALLOC_CONF": "narenas:2"})
    # the user preloaded an allocator themselves: sft adds nothing, whatever the config says
    assert allocator.preload_env("jemalloc", {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}) == {}


SCRIPT = textwrap.dedent("""
    import os, sys
    from sft import allocator
    if len(sys.argv) > 2:
        import torch  # noqa: F401  (too late to change the allocator: reexec_with must not exec)
    allocator.reexec_with(sys.argv[1])
    print(allocator.loaded(), os.environ.get(allocator.GUARD_ENV, "-"), os.getpid())
""")


def _run(tmp_path, *args: str, env: dict | None = None) -> list[str]:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.GUARD_ENV, "MALLOC_CONF")}
    proc = subprocess.run([sys.executable, str(script), *args], env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=120, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["jemalloc", "tcmalloc", "mimalloc"])
def test_reexec_really_runs_the_process_on_the_allocator(tmp_path, name):
    if not HAVE[name]:
        pytest.skip(f"lib{name} is not installed")
    have, guard, _ = _run(tmp_path, name)
    assert (have, guard) == (name, name)  # /proc/self/maps of the re-executed process maps the library


@pytest.mark.multiprocess
def test_reexec_to_system_and_after_torch_changes_nothing(tmp_path):
    assert _run(tmp_path, "system")[:2] == ["system", "-"]
    if HAVE["jemalloc"]:
        assert _run(tmp_path, "jemalloc", "torch-first")[:2] == ["system", "-"]
        # the guard stops a second exec even where the preload did not take (a loop would never end)
        assert _run(tmp_path, "jemalloc", env={allocator.GUARD_ENV: "jemalloc"})[:2] == ["system", "jemalloc"]


def test_mimalloc_comes_with_sft_from_pypi():
    """sft depends on the cmeel-mimalloc wheel (x86-64 Linux): a plain `pip install` has a fast allocator to preload
    without any system package, found through the wheel's file list, with sft's settings unless the user set
    MIMALLOC_* variables of their own; `auto` takes it where neither tcmalloc nor jemalloc is installed."""
    import platform
    from importlib import metadata

    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("cmeel-mimalloc is a dependency on x86-64 Linux only")
    path = allocator.find_library("mimalloc")
    assert path and os.path.isfile(path) and "cmeel.prefix" in path, path
    assert any(f.name == os.path.basename(path) for f in metadata.files("cmeel-mimalloc"))
    env = allocator.preload_env("mimalloc", {})
    assert env["LD_PRELOAD"] == path and env["MIMALLOC_PURGE_DELAY"] == "-1"
    assert "MIMALLOC_PURGE_DELAY" not in allocator.preload_env("mimalloc", {"MIMALLOC_VERBOSE": "1"})
    assert allocator.AUTO_ORDER[-1] == "mimalloc"


def test_auto_falls_back_to_mimalloc_without_system_allocators(monkeypatch):
    real = allocator.find_library
    monkeypatch.setattr(allocator, "find_library", lambda name: real(name) if name == "mimalloc" else None)
    monkeypatch.setattr(allocator, "_has_cuda_driver", lambda: False)
    if real("mimalloc") is None:
        pytest.skip("mimalloc is not installed")
    assert allocator.resolve("auto") == ("mimalloc", real("mimalloc"))


def test_check_in_process_warns_when_the_allocator_cannot_be_changed(caplog):
    have = allocator.loaded()
    other = "tcmalloc" if have != "tcmalloc" else "jemalloc"
    assert allocator.check_in_process(other) == have
    assert "LD_PRELOAD" in caplog.text


def test_bench_cells_start_on_their_variants_allocator(tmp_path):
    """The framework cells of `sft bench` start on training.allocator (auto unless a variant overrides it); the
    seed recipe's cells stay on the system allocator; a variant's env is part of the cell."""
    from benchmarks.matrix import BUILTIN_VARIANTS, load_matrix
    from benchmarks.runner import cell_allocator_env

    path = tmp_path / "m.yaml"
    path.write_text("""
name: t
variants:
  je-conf: {overrides: {training.allocator: auto}, env: {MALLOC_CONF: "narenas:1"}}
defaults: {model: tiny-llama, seq_length: 32, micro_batch: 1}
cells:
  - {variant: [baseline, framework, system-malloc, je-conf]}
""")
    m = load_matrix(str(path))
    by = {c.variant: c for c in m.cells}
    assert cell_allocator_env(by["baseline"], {}) == {}
    assert cell_allocator_env(by["system-malloc"], {}) == {}
    assert cell_allocator_env(by["framework"], {}) == allocator.preload_env("auto", {})
    assert by["je-conf"].env == {"MALLOC_CONF": "narenas:1"}
    assert "system-malloc" in BUILTIN_VARIANTS


GLIBC_PROBE = textwrap.dedent("""
    import os, sys
    from sft import allocator
    if sys.argv[1] == "run":
        allocator.check_in_process("system")  # what every sft run does first (sft.recipe.train)
    import torch

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    big = torch.ones(16 << 20, dtype=torch.uint8)
    del big  # a 16 MiB block freed: glibc's dynamic threshold rises to 16 MiB
    base = rss()
    keep, temp = [], []
    for _ in range(64):  # a training step: 4 MiB temporaries between small tensors that stay alive
        temp.append(torch.ones(4 << 20, dtype=torch.uint8))
        keep.append(torch.ones(256))
    temp.clear()
    print(allocator.loaded(), (rss() - base) >> 20, allocator.plans_with_live_memory())
""")


@pytest.mark.multiprocess
def test_glibc_gives_freed_tensors_back_once_sft_fixes_its_mmap_threshold(tmp_path):
    """On glibc malloc, 256 MiB of freed 4 MiB tensors stay resident under glibc's dynamic mmap threshold (the
    +1.0 GiB of peak RSS that put SmolLM2 at 1.13x the seed recipe); with the threshold sft fixes, they are
    given back, and only then does `auto` checkpointing plan with live memory."""
    script = tmp_path / "glibc_probe.py"
    script.write_text(GLIBC_PROBE)
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", allocator.GUARD_ENV, "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}

    def run(mode):
        proc = subprocess.run([sys.executable, str(script), mode], env=base, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        name, retained, live = proc.stdout.split()
        assert name == "system"
        return int(retained), live == "True"

    plain_retained, _ = run("plain")
    assert plain_retained >= 192, f"glibc's default kept only {plain_retained} MiB: the probe no longer shows the bloat"
    retained, live = run("run")
    assert retained <= 32, f"{retained} MiB of freed tensors still resident with sft's fixed mmap threshold"
    assert live


def test_tuning_keeps_a_threshold_the_user_set():
    assert allocator.tune_system_malloc(env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert allocator.tune_system_malloc(env={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})


def test_auto_checkpointing_keeps_no_layer_on_an_allocator_that_keeps_freed_memory():
    from sft.models import arch_config, choose_checkpointing

    cfg, plenty = arch_config("opt-125m"), 64 * 2**30
    assert choose_checkpointing(cfg, 8 * 512, "bf16-mixed", available=plenty, live_memory=True) > 0
    assert choose_checkpointing(cfg, 8 * 512, "bf16-mixed", available=plenty, live_memory=False) == 0
