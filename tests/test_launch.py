"""Launch planning: topology parsing, plan invariants on recorded topologies, accelerate configs, and real launches.

Fixtures in tests/data/topologies/ are `lscpu -p=CPU,CORE,SOCKET,NODE` text: this_machine_1s2c.lscpu was recorded on
the build machine; the Sapphire Rapids ones follow Linux's enumeration for a 2 x 56-core 8480+ with HT (see their
header comments).
"""

from __future__ import annotations

import glob
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import cli, pin
from launch.backends import DsCclPrereqs, check_ds_ccl_prereqs, resolve_backend
from launch.errors import PlanError
from launch.network import parse_hostfile
from launch.plan import format_plan, make_plan, validate_plan
from launch.topology import (
    Topology,
    cgroup_cpuset,
    detect_topology,
    format_cpu_list,
    load_topology,
    parse_cpu_list,
    parse_cpuinfo,
    parse_lscpu,
    read_sysfs,
)
from tests.helpers import free_port, parse_probes

REPO = Path(__file__).resolve().parents[1]
TOPO = REPO / "tests" / "data" / "topologies"
THIS = TOPO / "this_machine_1s2c.lscpu"
SPR = TOPO / "spr_8480_2s56c_ht.lscpu"
SNC2 = TOPO / "spr_8480_2s56c_ht_snc2.lscpu"
SMT_ADJ = TOPO / "smt_adjacent_1s4c.lscpu"
HOSTFILE4 = TOPO / "hostfile_4nodes"
PY = sys.executable


def spr(allowed=None) -> Topology:
    return load_topology(SPR, allowed=allowed)


# ---- topology ----------------------------------------------------------------------------------------------
def test_cpu_list_roundtrip():
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("0-6:2\n") == [0, 2, 4, 6]
    assert format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpu_list([]) == ""


def test_this_machine_fixture():
    t = load_topology(THIS)
    assert (len(t.sockets), len(t.numa_nodes), len(t.cores()), len(t.cpus), t.threads_per_core) == (1, 1, 2, 2, 1)


def test_sapphire_rapids_fixture():
    t = spr()
    assert len(t.cpus) == 224 and len(t.cores()) == 112 and t.threads_per_core == 2
    assert t.sockets == [0, 1] and t.numa_nodes == [0, 1]
    assert t.siblings(0) == [0, 112] and t.siblings(111) == [111, 223]
    assert {t.cpu(c).socket for c in range(56)} == {0} and {t.cpu(c).socket for c in range(56, 112)} == {1}


def test_snc2_fixture_has_four_numa_nodes():
    t = load_topology(SNC2)
    assert t.numa_nodes == [0, 1, 2, 3] and t.sockets == [0, 1]
    assert t.cpu(27).node == 0 and t.cpu(28).node == 1 and t.cpu(140).node == 1 and t.cpu(223).node == 3


def test_adjacent_smt_siblings_and_empty_node_column():
    t = load_topology(SMT_ADJ)
    assert t.numa_nodes == [0] and len(t.cores()) == 4 and t.siblings(0) == [0, 1] and t.siblings(7) == [6, 7]


def test_lscpu_column_order_from_header():
    cpus = parse_lscpu("# Socket,Node,CPU,Core\n0,0,0,0\n0,0,1,0\n")
    assert [(c.cpu, c.core) for c in cpus] == [(0, 0), (1, 0)]


def _fake_sysfs(root: Path, lscpu_text: str) -> None:
    """Write a /sys/devices/system/{cpu,node} tree equivalent to an lscpu listing (core_id is per socket, as in sysfs)."""
    cpus = parse_lscpu(lscpu_text)
    cpu_root, node_root = root / "cpu", root / "node"
    (cpu_root).mkdir(parents=True)
    (cpu_root / "online").write_text(format_cpu_list(c.cpu for c in cpus) + "\n")
    by_core: dict[int, list[int]] = {}
    for c in cpus:
        by_core.setdefault(c.core, []).append(c.cpu)
    first_core = {s: min(c.core for c in cpus if c.socket == s) for s in {c.socket for c in cpus}}
    for c in cpus:
        d = cpu_root / f"cpu{c.cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{c.socket}\n")
        (d / "core_id").write_text(f"{c.core - first_core[c.socket]}\n")
        (d / "thread_siblings_list").write_text(format_cpu_list(by_core[c.core]) + "\n")
    for n in {c.node for c in cpus}:
        (node_root / f"node{n}").mkdir(parents=True)
        (node_root / f"node{n}" / "cpulist").write_text(format_cpu_list(c.cpu for c in cpus if c.node == n) + "\n")


def test_sysfs_parser_matches_lscpu(tmp_path):
    text = SNC2.read_text()
    _fake_sysfs(tmp_path, text)
    from_sys = read_sysfs(tmp_path / "cpu", tmp_path / "node")
    from_lscpu = parse_lscpu(text)
    key = lambda cpus: sorted((c.cpu, c.socket, c.node) for c in cpus)  # noqa: E731
    assert key(from_sys) == key(from_lscpu)
    groups = lambda cpus: sorted(sorted(c.cpu for c in cpus if c.core == k) for k in {c.core for c in cpus})  # noqa: E731
    assert groups(from_sys) == groups(from_lscpu)  # same hyperthread pairs although sysfs core_id repeats per socket


def test_sysfs_and_lscpu_agree_on_this_machine():
    if not Path("/sys/devices/system/cpu/online").exists() or not shutil.which("lscpu"):
        pytest.skip("needs /sys and lscpu")
    a, b = detect_topology("lscpu"), detect_topology("sysfs")
    assert (len(a.sockets), len(a.numa_nodes), len(a.cores()), len(a.cpus)) == (len(b.sockets), len(b.numa_nodes), len(b.cores()), len(b.cpus))
    assert set(a.allowed) <= set(os.sched_getaffinity(0))


def test_cgroup_cpuset_v1_and_v2(tmp_path):
    (tmp_path / "proc_v2").write_text("0::/slurm/job42\n")
    (tmp_path / "v2" / "slurm" / "job42").mkdir(parents=True)
    (tmp_path / "v2" / "slurm" / "job42" / "cpuset.cpus.effective").write_text("0-3,112-115\n")
    assert cgroup_cpuset(str(tmp_path / "proc_v2"), str(tmp_path / "v2")) == [0, 1, 2, 3, 112, 113, 114, 115]
    (tmp_path / "proc_v1").write_text("4:memory:/x\n3:cpuset:/job\n0::/\n")
    (tmp_path / "v1" / "cpuset" / "job").mkdir(parents=True)
    (tmp_path / "v1" / "cpuset" / "job" / "cpuset.effective_cpus").write_text("8-9\n")
    assert cgroup_cpuset(str(tmp_path / "proc_v1"), str(tmp_path / "v1")) == [8, 9]
    assert cgroup_cpuset(str(tmp_path / "missing"), str(tmp_path)) is None


def test_cpuinfo_flags():
    flags, model = parse_cpuinfo("processor : 0\nmodel name : Intel(R) Xeon(R) Platinum 8480+\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert model.endswith("8480+") and {"amx_bf16", "avx512_bf16", "amx_tile", "avx2"} <= set(flags)


# ---- plan invariants ---------------------------------------------------------------------------------------
def check_plan(plan, topo: Topology, per: str = "socket") -> None:
    """The invariants every plan must satisfy (independent of validate_plan's implementation)."""
    allowed = set(topo.allowed)
    seen_cpus: set[int] = set()
    seen_cores: set[int] = set()
    for rp in plan.local_ranks:
        mine = rp.cpus + rp.ccl_worker_cpus
        assert set(mine) <= allowed, "pinned outside the allowed CPU set"
        cores = [topo.cpu(c).core for c in mine]
        assert len(cores) == len(set(cores)), "two hyperthreads of one core pinned"
        assert not seen_cpus & set(mine) and not seen_cores & set(cores), "ranks overlap (oversubscription)"
        seen_cpus |= set(mine)
        seen_cores |= set(cores)
        assert 1 <= rp.omp_num_threads <= len(rp.cpus) <= len(rp.cores)
        assert rp.env["OMP_NUM_THREADS"] == str(rp.omp_num_threads)
        if plan.backend in ("ccl", "ds-ccl") and len(rp.cores) > 1:
            assert len(rp.ccl_worker_cpus) == 1 and rp.omp_num_threads == len(rp.cores) - 1
        else:
            assert rp.ccl_worker_cpus == [] and rp.omp_num_threads == len(rp.cores)
    key = (lambda c: c.socket) if per == "socket" else (lambda c: c.node)
    assert plan.ranks_per_node == len({key(topo.cpu(c)) for c in allowed})
    assert plan.world_size == plan.nodes * plan.ranks_per_node == len(plan.ranks)
    assert sorted(r.rank for r in plan.ranks) == list(range(plan.world_size))
    if plan.backend in ("ccl", "ds-ccl"):
        workers = [c for rp in plan.local_ranks for c in rp.ccl_worker_cpus]
        if workers:
            assert plan.env["CCL_WORKER_AFFINITY"] == ",".join(map(str, workers))
        assert plan.env["CCL_WORKER_COUNT"] == "1" and plan.env["CCL_ATL_TRANSPORT"] == "ofi"
    check_commands(plan)
    json.dumps(plan.to_dict())
    assert "rank" in format_plan(plan)


def check_commands(plan) -> None:
    """Each command parses with accelerate's own launch parser, and its launch.pin part with launch.pin."""
    from accelerate.commands.launch import launch_command_parser

    assert len(plan.commands) == (1 if plan.launcher == "mpirun" else plan.nodes)
    for cmd in plan.commands:
        assert cmd.argv[:2] == ["accelerate", "launch"]
        a = launch_command_parser().parse_args(cmd.argv[2:])
        assert (REPO / a.config_file).exists() or Path(a.config_file).exists()
        assert a.num_processes == plan.world_size and a.num_machines == plan.nodes
        assert a.module and a.training_script == "launch.pin"
        if plan.backend == "ds-ccl":  # DeepSpeed: neither --cpu (rejected with DeepSpeed) nor --multi_gpu
            assert not a.cpu and not a.multi_gpu and a.config_file.endswith("cpu_deepspeed_ccl.yaml")
        elif plan.launcher == "mpirun":
            assert a.cpu and a.mpirun_hostfile == plan.hostfile and a.main_process_ip == plan.master_addr
        elif plan.world_size == 1:
            assert a.cpu and not a.multi_gpu
        else:
            assert a.multi_gpu and not a.cpu  # the form that starts N ranks (see the trap test below)
            if plan.nodes > 1:
                assert a.machine_rank == cmd.node_rank and a.main_process_ip == plan.master_addr
        pin_args = a.training_script_args
        assert pin_args[pin_args.index("--") + 1 :] == plan.train_argv
        assert [pin_args[i + 1] for i, x in enumerate(pin_args) if x == "--cpus"] == [format_cpu_list(rp.cpus) for rp in plan.local_ranks]
        envs = dict(pin_args[i + 1].split("=", 1) for i, x in enumerate(pin_args) if x == "--env")
        assert envs == plan.env
        if plan.backend == "ds-ccl":
            assert "ACCELERATE_USE_CPU" not in envs  # it would turn the DeepSpeed run into plain DDP over gloo
        else:
            assert envs["ACCELERATE_USE_CPU"] == "true"
        assert "MASTER_ADDR" in envs and envs["SFT_BACKEND"] == plan.backend


FIXTURES = [THIS, SPR, SNC2, SMT_ADJ]


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("per", ["socket", "numa"])
@pytest.mark.parametrize("backend", ["gloo", "ccl", "mpi"])
@pytest.mark.parametrize("nodes", [1, 4])
def test_plan_invariants(fixture, per, backend, nodes):
    topo = load_topology(fixture)
    plan = make_plan(topo, nodes=nodes, per=per, backend=backend, master_addr="10.0.0.1" if nodes > 1 else None)
    check_plan(plan, topo, per)


def test_sapphire_rapids_one_rank_per_socket():
    plan = make_plan(spr(), backend="gloo")
    assert plan.ranks_per_node == 2 and plan.world_size == 2
    assert [format_cpu_list(r.cpus) for r in plan.local_ranks] == ["0-55", "56-111"]  # never 112-223 (HT siblings)
    assert [r.omp_num_threads for r in plan.local_ranks] == [56, 56]
    assert plan.config_file.endswith("cpu_multi_socket.yaml")


def test_sapphire_rapids_ccl_reserves_a_worker_core():
    plan = make_plan(spr(), backend="ccl")
    assert [r.omp_num_threads for r in plan.local_ranks] == [55, 55]
    assert [r.ccl_worker_cpus for r in plan.local_ranks] == [[55], [111]]
    assert plan.env["CCL_WORKER_AFFINITY"] == "55,111" and plan.env["CCL_PROCESS_LAUNCHER"] == "none"
    assert plan.local_ranks[1].env["CCL_LOCAL_RANK"] == "1" and plan.local_ranks[1].env["CCL_LOCAL_SIZE"] == "2"
    assert "CCL_KVS_IFACE" not in plan.env  # single node: no interface needed


def test_snc2_per_numa_gives_four_ranks_of_28():
    plan = make_plan(load_topology(SNC2), per="numa", backend="gloo")
    assert plan.ranks_per_node == 4
    assert [format_cpu_list(r.cpus) for r in plan.local_ranks] == ["0-27", "28-55", "56-83", "84-111"]
    assert [r.numa_nodes for r in plan.local_ranks] == [[0], [1], [2], [3]]
    assert make_plan(load_topology(SNC2), per="socket", backend="gloo").ranks_per_node == 2


def test_four_nodes_by_count_one_accelerate_launch_per_node():
    plan = make_plan(spr(), nodes=4, backend="gloo", master_addr="10.0.0.1", iface="ens1f0")
    assert plan.world_size == 8 and [c.node_rank for c in plan.commands] == [0, 1, 2, 3]
    assert plan.env["GLOO_SOCKET_IFNAME"] == "ens1f0" and plan.config_file.endswith("cpu_multi_node.yaml")
    assert [r.rank for r in plan.ranks if r.node_rank == 3] == [6, 7]


def test_four_nodes_by_hostfile_one_mpirun():
    plan = make_plan(spr(), hostfile=str(HOSTFILE4), backend="ccl", iface="ens1f0")
    assert plan.nodes == 4 and plan.world_size == 8 and plan.launcher == "mpirun" and len(plan.commands) == 1
    assert plan.hosts == ["xeon-a", "xeon-b", "xeon-c", "xeon-d"] and plan.master_addr == "xeon-a"
    assert plan.env["CCL_KVS_IFACE"] == "ens1f0" and plan.env["MASTER_ADDR"] == "xeon-a"
    # the same hostfile with one accelerate launch per node
    per_node = make_plan(spr(), hostfile=str(HOSTFILE4), backend="gloo", launcher="accelerate")
    check_plan(per_node, spr())
    assert [c.host for c in per_node.commands] == plan.hosts


def test_multi_node_ccl_without_iface_warns_about_the_many_nic_hang():
    plan = make_plan(spr(), nodes=2, backend="ccl", master_addr="10.0.0.1", detect_network=False)
    assert "CCL_KVS_IFACE" not in plan.env and any("--iface" in w for w in plan.warnings)


def test_hostfile_formats():
    assert parse_hostfile("a slots=2\nb:4\n# c\nd\n  \nb\n") == [("a", 2), ("b", 4), ("d", None)]
    with pytest.raises(PlanError):
        parse_hostfile("# nothing\n")


@pytest.mark.parametrize(
    "allowed, expected",
    [
        ("0-27,112-139", ["0-27"]),  # cgroup: half of socket 0 with its HT siblings -> 1 rank, 28 cores
        ("112-130", ["112-130"]),  # only second hyperthreads allowed: still one thread per core
        ("10-20,130-140,60-70", ["10-20,133-140", "60-70"]),  # 130-132 are siblings of 18-20: skipped
        ("56-111,168-223", ["56-111"]),  # socket 1 only
    ],
)
def test_restricted_cpuset_never_pins_outside_or_siblings(allowed, expected):
    topo = spr(allowed)
    plan = make_plan(topo, backend="gloo")
    check_plan(plan, topo)
    assert [format_cpu_list(r.cpus) for r in plan.local_ranks] == expected
    ccl = make_plan(topo, backend="ccl")
    check_plan(ccl, topo)
    assert set(ccl.env["CCL_WORKER_AFFINITY"].split(",")) <= {str(c) for c in topo.allowed}


def test_uneven_cpuset_warns():
    plan = make_plan(spr("0-9,56-57"), backend="gloo")
    assert [r.omp_num_threads for r in plan.local_ranks] == [10, 2] and any("unequal" in w for w in plan.warnings)


def test_plan_errors():
    with pytest.raises(PlanError):
        make_plan(spr(), hostfile=str(HOSTFILE4), nodes=3)
    with pytest.raises(PlanError):
        make_plan(spr(), launcher="mpirun")
    with pytest.raises(PlanError):
        make_plan(spr(), per="die")
    t = spr()
    t.allowed = []
    with pytest.raises(PlanError):
        make_plan(t)


def test_validate_plan_catches_overlap():
    topo = spr()
    plan = make_plan(topo, backend="gloo")
    plan.local_ranks[1].cpus = plan.local_ranks[1].cpus + [112]  # sibling of rank 0's CPU 0
    with pytest.raises(PlanError):
        validate_plan(plan, topo)


# ---- experimental backend ds-ccl (DeepSpeed + oneCCL): no deepspeed / oneCCL needed, prerequisites injected --------
CCL_ROOT = "/opt/oneccl-2021.17.2"


def _ds_ccl_present(ccl_root=None):
    return DsCclPrereqs(ccl_root=ccl_root or CCL_ROOT, missing=[])


def _fake_ccl_root(tmp_path: Path, lib: bool = True, include: bool = True) -> Path:
    root = tmp_path / "ccl"
    (root / "lib").mkdir(parents=True)
    (root / "include" / "oneapi").mkdir(parents=True)
    if lib:
        (root / "lib" / "libccl.so.1").write_text("")
    if include:
        (root / "include" / "oneapi" / "ccl.hpp").write_text("")
    return root


def test_ds_ccl_plan_env_config_and_command():
    topo = spr()
    environ = {"LD_LIBRARY_PATH": "/usr/local/lib", "PATH": "/usr/bin"}
    plan = make_plan(topo, backend="ds-ccl", prereq_check=_ds_ccl_present, environ=environ, master_port=29632)
    check_plan(plan, topo)
    assert plan.backend == "ds-ccl" and plan.world_size == 2 and plan.launcher == "accelerate"
    assert plan.config_file.endswith("configs/accelerate/cpu_deepspeed_ccl.yaml")
    env = plan.env
    assert "ACCELERATE_USE_CPU" not in env and plan.unset_env == ["ACCELERATE_USE_CPU"]
    assert env["SFT_BACKEND"] == "ds-ccl" and env["DS_ACCELERATOR"] == "cpu" and env["CCL_ROOT"] == CCL_ROOT
    assert env["CPATH"] == f"{CCL_ROOT}/include"  # nothing to prepend to
    assert env["LD_LIBRARY_PATH"] == f"{CCL_ROOT}/lib:/usr/local/lib"  # prepended, the existing path kept
    assert env["LOCAL_SIZE"] == "2"
    # the oneCCL variables of backend ccl: worker count / affinity on the reserved cores, transport, KMP
    assert env["CCL_WORKER_COUNT"] == "1" and env["CCL_WORKER_AFFINITY"] == "55,111" and env["CCL_ATL_TRANSPORT"] == "ofi"
    assert env["CCL_PROCESS_LAUNCHER"] == "none" and env["KMP_BLOCKTIME"] == "1" and "KMP_AFFINITY" in env
    assert [r.omp_num_threads for r in plan.local_ranks] == [55, 55]
    assert plan.local_ranks[1].env["CCL_LOCAL_RANK"] == "1" and plan.local_ranks[1].env["CCL_LOCAL_SIZE"] == "2"
    # what `sft launch` puts in the launcher's own env (launch.pin's --env values never override inherited ones)
    assert plan.launcher_env == {"CPATH": env["CPATH"], "LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"]}
    (cmd,) = plan.commands
    argv = cmd.argv
    assert argv[:4] == ["accelerate", "launch", "--config_file", plan.config_file]
    assert "--cpu" not in argv and "--multi_gpu" not in argv
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--main_process_port") + 1] == "29632"
    assert "ACCELERATE_USE_CPU=true" not in argv and "--ccl" in argv
    text = format_plan(plan)
    assert "EXPERIMENTAL" in text and "SLOWER than gloo" in text and "benchmarks/results/cpu_collectives.md" in text
    assert f"export LD_LIBRARY_PATH={CCL_ROOT}/lib:/usr/local/lib" in text and "unset ACCELERATE_USE_CPU" in text
    json.dumps(plan.to_dict())


def test_ds_ccl_launch_env_removes_accelerate_use_cpu():
    plan = make_plan(spr(), backend="ds-ccl", prereq_check=_ds_ccl_present, environ={})
    env = cli.launch_env(plan, {"ACCELERATE_USE_CPU": "true", "LD_LIBRARY_PATH": "/x", "HOME": "/root"})
    assert "ACCELERATE_USE_CPU" not in env and env["HOME"] == "/root"
    assert env["LD_LIBRARY_PATH"] == f"{CCL_ROOT}/lib" and env["CPATH"] == f"{CCL_ROOT}/include"
    gloo = make_plan(spr(), backend="gloo")
    assert cli.launch_env(gloo, {"ACCELERATE_USE_CPU": "true"}) == {"ACCELERATE_USE_CPU": "true"}


def test_ds_ccl_prereq_check_passes_on_a_complete_install(tmp_path):
    root = _fake_ccl_root(tmp_path)
    pre = check_ds_ccl_prereqs(environ={"CCL_ROOT": str(root)}, module_available=lambda m: True, which=lambda n: f"/usr/bin/{n}")
    assert pre.ok and pre.ccl_root == str(root)
    # --ccl-root wins over $CCL_ROOT; the plan then uses it
    pre = check_ds_ccl_prereqs(str(root), environ={"CCL_ROOT": "/nowhere"}, module_available=lambda m: True, which=lambda n: "/bin/x")
    assert pre.ok and pre.ccl_root == str(root)
    check = lambda r: check_ds_ccl_prereqs(r, environ={}, module_available=lambda m: True, which=lambda n: "/bin/x")  # noqa: E731
    plan = make_plan(spr(), backend="ds-ccl", ccl_root=str(root), prereq_check=check, environ={})
    assert plan.env["CCL_ROOT"] == str(root) and plan.env["LD_LIBRARY_PATH"] == f"{root}/lib"


@pytest.mark.parametrize(
    "piece, kwargs, expected",
    [
        ("deepspeed", {"module_available": lambda m: m != "deepspeed"}, ["deepspeed is not importable", "pip install 'deepspeed"]),
        ("ccl_root", {"environ": {}}, ["CCL_ROOT is not set", "oneccl==2021.17.2", "--ccl-root"]),
        ("lib", {"lib": False}, ["no lib/libccl.so*", "oneccl==2021.17.2"]),
        ("include", {"include": False}, ["no include/oneapi/ccl.hpp", "oneccl-devel==2021.17.2"]),
        ("g++", {"which": lambda n: None if n == "g++" else f"/usr/bin/{n}"}, ["g++ is not on PATH", "apt-get install g++"]),
        ("ninja", {"which": lambda n: None if n == "ninja" else f"/usr/bin/{n}", "interpreter": "/nonexistent/bin/python"}, ["ninja is not installed", "pip install ninja"]),
    ],
)
def test_ds_ccl_missing_prerequisite_is_named(tmp_path, piece, kwargs, expected):
    kwargs = dict(kwargs)
    root = _fake_ccl_root(tmp_path, lib=kwargs.pop("lib", True), include=kwargs.pop("include", True))
    probes = {"environ": {"CCL_ROOT": str(root)}, "module_available": lambda m: True, "which": lambda n: f"/usr/bin/{n}", **kwargs}
    pre = check_ds_ccl_prereqs(**probes)
    assert len(pre.missing) == 1, pre.missing
    assert all(e in pre.missing[0] for e in expected), pre.missing[0]
    # the plan refuses with a PlanError naming the missing piece
    with pytest.raises(PlanError) as exc:
        make_plan(spr(), backend="ds-ccl", prereq_check=lambda r: check_ds_ccl_prereqs(r, **probes))
    msg = str(exc.value)
    assert "ds-ccl" in msg and all(e in msg for e in expected) and "benchmarks/results/cpu_collectives.md" in msg


def test_ds_ccl_nothing_installed_lists_everything(tmp_path):
    pre = check_ds_ccl_prereqs(environ={}, module_available=lambda m: False, which=lambda n: None, interpreter="/nonexistent/bin/python")
    text = "\n".join(pre.missing)
    assert len(pre.missing) == 4 and "deepspeed" in text and "CCL_ROOT is not set" in text and "g++" in text and "ninja" in text
    pre = check_ds_ccl_prereqs(str(tmp_path / "missing"), environ={}, module_available=lambda m: True, which=lambda n: "/bin/x")
    assert pre.missing == [f"CCL_ROOT={tmp_path / 'missing'} is not a directory: install oneCCL 2021.17.2 there ({pre.missing[0].split('(', 1)[1]}"]


def test_ds_ccl_cli_error_names_missing_piece(capsys, monkeypatch):
    monkeypatch.delenv("CCL_ROOT", raising=False)
    assert cli.plan_command(_args(["--topology", str(SPR), "--backend", "ds-ccl"])) == 2
    assert "CCL_ROOT is not set" in capsys.readouterr().err


def test_ds_ccl_one_node_accelerate_only():
    with pytest.raises(PlanError, match="one node"):
        make_plan(spr(), nodes=2, backend="ds-ccl", master_addr="10.0.0.1", prereq_check=_ds_ccl_present)
    with pytest.raises(PlanError, match="one node"):
        make_plan(spr(), hostfile=str(HOSTFILE4), backend="ds-ccl", prereq_check=_ds_ccl_present)
    one = make_plan(load_topology(THIS), backend="ds-ccl", prereq_check=_ds_ccl_present, environ={})
    assert one.world_size == 1 and any("world size 1" in w for w in one.warnings)
    check_commands(one)


def test_auto_never_picks_ds_ccl(monkeypatch):
    from sft import distributed as sd

    monkeypatch.setenv("SFT_BACKEND", "ds-ccl")  # even with the env of a ds-ccl rank
    monkeypatch.setattr(sd.ccl, "deepspeed_importable", lambda: True)

    def never(*a, **k):
        raise AssertionError("auto must not check ds-ccl prerequisites")

    assert resolve_backend("auto") in ("gloo", "ccl", "mpi")
    for topo in (spr(), load_topology(THIS)):
        assert make_plan(topo, backend="auto", prereq_check=never).backend != "ds-ccl"
    monkeypatch.delenv("SFT_BACKEND")
    assert sd.choose_backend("cpu") != "ds-ccl" and sd.choose_backend("cpu", "auto") != "ds-ccl"


# ---- launch.pin ----------------------------------------------------------------------------------------------
def test_pin_refuses_an_unplanned_local_rank():
    with pytest.raises(pin.PinError):
        pin.pin_settings([[0, 1], [2, 3]], 2)
    cpus, env = pin.pin_settings([[0, 1], [2, 3]], 1, ccl=True)
    assert cpus == [2, 3] and env["OMP_NUM_THREADS"] == "2" and env["CCL_LOCAL_RANK"] == "1"


def test_pin_local_rank_from_mpi_env():
    assert pin.local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert pin.local_rank_from_env({"MPI_LOCALRANKID": "1", "SLURM_LOCALID": "0"}) == 1
    assert pin.local_rank_from_env({}) == 0


def test_pin_dry_run(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    rc = pin.main(["--cpus", "0", "--cpus", "1", "--env", "A=b", "--dry-run", "--", "python", "-c", "pass"])
    out = capsys.readouterr().out
    assert rc == 0 and "local rank 1/2: cpus 1, OMP_NUM_THREADS=1" in out and "A=b" in out and sys.executable in out


@pytest.mark.multiprocess
def test_pin_execs_pinned(tmp_path):
    """A rank started through launch.pin runs on exactly its CPU with OMP_NUM_THREADS set."""
    cpu = max(os.sched_getaffinity(0))
    code = "import os,json;print(json.dumps([sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'], os.environ['X']]))"
    env = {**os.environ, "LOCAL_RANK": "0", "X": "launcher", "PYTHONPATH": str(REPO)}
    out = subprocess.run([PY, "-m", "launch.pin", "--cpus", str(cpu), "--env", "X=default", "--", "python", "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[cpu], "1", "launcher"]  # --env never overrides what the launcher set


# ---- CLI -----------------------------------------------------------------------------------------------------
def _args(argv):
    import argparse

    return cli.add_launch_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_plan_command_text_and_json(capsys):
    assert cli.plan_command(_args(["--topology", str(SPR), "--backend", "gloo"])) == 0
    text = capsys.readouterr().out
    assert "world size 2" in text and "0-55" in text and "accelerate launch" in text
    assert cli.plan_command(_args(["--topology", str(SPR), "--nodes", "4", "--backend", "ccl", "--json", "--master-addr", "h0"])) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["world_size"] == 8 and len(d["commands"]) == 4 and d["commands"][3]["shell"].startswith("accelerate launch")


def test_plan_command_errors_return_2(capsys):
    assert cli.plan_command(_args(["--topology", str(SPR), "--hostfile", str(HOSTFILE4), "--nodes", "2"])) == 2
    assert "hostfile" in capsys.readouterr().err


def test_plan_for_this_machine(capsys):
    assert cli.plan_command(_args([])) == 0
    assert "world size" in capsys.readouterr().out


def test_launch_dry_run_picks_node_command(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "2")
    args = _args(["--topology", str(SPR), "--nodes", "4", "--master-addr", "h0", "--backend", "gloo", "--dry-run", "--", "train", "cfg.yaml", "--x"])
    assert args.train_argv[-3:] == ["train", "cfg.yaml", "--x"]
    rc = cli.launch_command(args)  # the way `sft launch` calls it: train args from the REMAINDER positional
    err = capsys.readouterr().err
    assert rc == 0 and "--machine_rank 2" in err.split("sft launch: node 2:")[1] and "-- sft train cfg.yaml --x" in err
    assert cli.launch_command(_args(["--topology", str(SPR), "--dry-run"])) == 2  # no training command


# ---- sft.distributed -----------------------------------------------------------------------------------------
def test_choose_backend(monkeypatch):
    import torch.distributed as dist

    from sft import distributed as sd

    monkeypatch.delenv("SFT_BACKEND", raising=False)
    assert sd.choose_backend("cuda") == "nccl" and sd.choose_backend("cuda:1") == "nccl"
    expected = "ccl" if sd.ccl.ccl_importable() else ("mpi" if dist.is_mpi_available() else "gloo")
    assert sd.choose_backend("cpu") == expected
    assert sd.choose_backend("cpu", "gloo") == "gloo"
    if not sd.ccl.ccl_importable():
        with pytest.raises(RuntimeError):
            sd.choose_backend("cpu", "ccl")
    with pytest.raises(RuntimeError):
        sd.choose_backend("cpu", "nope")


def test_choose_backend_ds_ccl_only_when_requested(monkeypatch):
    from sft import distributed as sd

    monkeypatch.delenv("SFT_BACKEND", raising=False)
    monkeypatch.setattr(sd.ccl, "deepspeed_importable", lambda: True)
    assert sd.choose_backend("cpu", "ds-ccl") == "ds-ccl"
    assert sd.choose_backend("cpu") != "ds-ccl"
    monkeypatch.setenv("SFT_BACKEND", "ds-ccl")
    assert sd.choose_backend("cpu") == "ds-ccl" and sd.choose_backend("cuda") == "nccl"
    monkeypatch.setattr(sd.ccl, "deepspeed_importable", lambda: False)
    with pytest.raises(RuntimeError, match="deepspeed"):
        sd.choose_backend("cpu", "ds-ccl")


def test_ds_ccl_init_gloo_first_then_deepspeed_ccl(monkeypatch):
    """SFT_BACKEND=ds-ccl: gloo group first, then the DeepSpeed workaround; ACCELERATE_USE_CPU is never set."""
    import types

    import torch.distributed as dist

    from sft import distributed as sd

    calls: list = []

    class FakeAccelerator:
        _communication_backend_name = "gloo"

        def device_name(self):
            return "cpu"

    class CCLBackend:  # what deepspeed.comm.comm.cdb is after a successful init
        pass

    acc = FakeAccelerator()
    comm_mod = types.SimpleNamespace(cdb=None)

    def init_distributed(dist_backend=None, timeout=None, **kw):
        calls.append(("deepspeed.init_distributed", dist_backend, acc._communication_backend_name))
        comm_mod.cdb = CCLBackend()

    fake_ds = types.ModuleType("deepspeed")
    fake_ds.init_distributed = init_distributed
    fake_ds.comm = types.SimpleNamespace(comm=comm_mod)
    fake_acc_mod = types.ModuleType("deepspeed.accelerator")
    fake_acc_mod.get_accelerator = lambda: acc
    monkeypatch.setitem(sys.modules, "deepspeed", fake_ds)
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", fake_acc_mod)
    monkeypatch.setattr(sd.ccl, "deepspeed_importable", lambda: True)
    monkeypatch.setattr(sd.ccl, "_ds_ccl_active", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init_process_group", kw["backend"])))
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    shm = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{free_port()}_1")
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append(("barrier", shm.exists())))
    for v in sd.RANK_VARS + sd.WORLD_SIZE_VARS + sd.LOCAL_RANK_VARS + sd.LOCAL_SIZE_VARS:
        monkeypatch.delenv(v, raising=False)
    for k, v in {"SFT_BACKEND": "ds-ccl", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": shm.name.split("_")[-2], "CCL_ROOT": "/opt/ccl",
                 "ACCELERATE_USE_CPU": "true"}.items():
        monkeypatch.setenv(k, v)
    for k in ("CCL_LOCAL_RANK", "CCL_LOCAL_SIZE", "LOCAL_SIZE", "DS_ACCELERATOR", "CCL_PROCESS_LAUNCHER"):
        monkeypatch.delenv(k, raising=False)
    shm.write_bytes(b"")  # what DeepSpeed's shm op creates for rank 1 (and never unlinks)
    try:
        assert sd.init_process_group_if_needed(60) is True
    finally:
        left = shm.exists()
        shm.unlink(missing_ok=True)
    # DeepSpeed's init, a barrier (every rank has mapped its peers' buffers), then this rank's buffer unlinked
    assert calls == [("init_process_group", "gloo"), ("deepspeed.init_distributed", "ccl", "ccl"), ("barrier", True)]
    assert not left
    assert "ACCELERATE_USE_CPU" not in os.environ  # removed, never set
    assert os.environ["DS_ACCELERATOR"] == "cpu" and os.environ["CCL_LOCAL_RANK"] == "1" and os.environ["LOCAL_SIZE"] == "2"
    meta = sd.run_metadata()
    assert meta["backend"] == "ds-ccl" and meta["process_group_backend"] == "gloo" and meta["deepspeed_comm"] == "CCLBackend"


def test_dist_info_from_mpi_env(monkeypatch):
    from sft import distributed as sd

    for v in sd.RANK_VARS + sd.WORLD_SIZE_VARS + sd.LOCAL_RANK_VARS + sd.LOCAL_SIZE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("PMI_RANK", "5")
    monkeypatch.setenv("PMI_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    info = sd.dist_info()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (5, 8, 1, None)
    assert not sd.is_main_process()
    assert sd.all_reduce_max_flag(True) is True and sd.all_reduce_max_flag(False) is False  # no group: identity
    assert sd.all_reduce_min_int(7) == 7
    monkeypatch.setenv("PMI_SIZE", "1")
    assert sd.init_process_group_if_needed(5) is False  # world size 1: nothing to initialise
    meta = sd.run_metadata()
    assert {"backend", "world_size", "threads_per_rank", "cpu_affinity", "pinned_by_launch_pin"} <= set(meta)


# ---- configs ---------------------------------------------------------------------------------------------------
ACCEL_CONFIGS = sorted(glob.glob(str(REPO / "configs" / "accelerate" / "*.yaml")))


def test_expected_accelerate_configs_exist():
    names = {Path(p).name for p in ACCEL_CONFIGS}
    assert {
        "cpu_single.yaml", "cpu_multi_socket.yaml", "cpu_multi_node.yaml", "gpu_single.yaml", "gpu_multi.yaml",
        "gpu_deepspeed_zero2.yaml", "gpu_deepspeed_zero3_qlora.yaml", "gpu_fsdp_qlora.yaml",
    } <= names  # fmt: skip


@pytest.mark.parametrize("path", ACCEL_CONFIGS, ids=lambda p: Path(p).name)
def test_accelerate_config_loads_with_accelerates_loader(path, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(REPO)
    cfg = load_config_from_file(path)  # rejects unknown keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.mixed_precision is None, "topology only: precision belongs to the train config"
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(["--config_file", path, "x.py"]))
    assert args.num_processes >= 1 and args.num_machines >= 1
    name = Path(path).name
    if "deepspeed" not in name:  # DeepSpeed on CPU is selected by DS_ACCELERATOR=cpu: accelerate rejects --cpu with it
        assert cfg.use_cpu == name.startswith("cpu_")
    if cfg.distributed_type.value == "DEEPSPEED":
        from accelerate.utils import DeepSpeedPlugin, patch_environment
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        ds_file = REPO / cfg.deepspeed_config["deepspeed_config_file"]
        stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        assert stage == (3 if "zero3" in name else 2)
        args.deepspeed_fields_from_accelerate_config = ",".join(list(cfg.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        _, env = prepare_deepspeed_cmd_env(args)
        with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE")}):
            plugin = DeepSpeedPlugin()  # raises if the YAML sets what the JSON owns (e.g. mixed_precision)
        assert plugin.zero_stage == stage and plugin.zero3_init_flag == ("zero3" in name)
    if cfg.distributed_type.value == "FSDP":
        # FSDP2: the version that runs on CPU ranks too (tests/test_strategies.py) and shards per parameter
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.multiprocess
def test_slurm_templates():
    """Static checks of launch/slurm (tests/test_slurm.py submits them to a real Slurm cluster)."""
    helper = (REPO / "launch" / "slurm" / "job.sh").read_text()
    for name in ("cpu_multi_node.sbatch", "gpu_multi_node.sbatch"):
        p = REPO / "launch" / "slurm" / name
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0
        text = p.read_text()
        # one way to find sft (job.sh: $SFT_VENV/bin/python -m sft.cli), one way to stop, requeue and resume
        assert ". launch/slurm/job.sh" in text and "-m sft.cli" in text and "SFT_ENTRY" not in text
        assert "#SBATCH --requeue" in text and re.search(r"#SBATCH --signal=B:USR1@\d+", text)
        # the node rank is read on the node, inside srun's single-quoted command (accelerate#2816: expanded on
        # the submit host, every node became machine rank 0)
        srun_part = text.split("bash -c '", 1)
        assert len(srun_part) == 2 and "SLURM_NODEID" not in srun_part[0].split("#SBATCH")[-1]
        assert '"$SLURM_NODEID"' in srun_part[1]
        # bash 4.2 (RHEL/CentOS 7): "${arr[@]}" of an empty array fails under `set -u` before bash 4.4
        assert not re.search(r'"\$\{\w+\[@\]\}"', text + helper), f"{name}: unguarded array expansion"
        # the usage line runs: `train --config EXISTING_FILE`
        usage = re.search(r"#\s+sbatch .*?\.sbatch (train .*)", text).group(1).split()
        assert usage[:2] == ["train", "--config"] and (REPO / usage[2]).is_file(), usage
    # the GPU template takes its interface from the same code as `sft launch` (the CPU template runs sft launch)
    assert '"$SFT_PYTHON" -m launch.network "$MASTER_ADDR"' in (REPO / "launch/slurm/gpu_multi_node.sbatch").read_text()


# ---- real launches on this machine ---------------------------------------------------------------------------
def _run_jobs(jobs: dict[str, list[list[str]]], timeout: float = 150) -> dict[str, tuple[list[int], str]]:
    """Start every job's processes at once, then collect (return codes, combined output) per job."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env.pop("SFT_BACKEND", None)
    procs = {n: [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds] for n, cmds in jobs.items()}
    results = {}
    deadline = time.monotonic() + timeout
    for name, ps in procs.items():
        outs, rcs = [], []
        for p in ps:
            try:
                out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            outs.append(out)
            rcs.append(p.returncode)
        results[name] = (rcs, "\n".join(outs))
    return results


LAUNCH = [PY, "-m", "launch.cli", "launch", "--backend", "gloo"]
PROBE = ["--", "python", "-m", "launch.probe"]


@pytest.fixture(scope="module")
def two_sockets(tmp_path_factory) -> Path:
    """This machine's first 2 CPUs presented as 2 sockets: a plan with 2 ranks pinned to one CPU each."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    p = tmp_path_factory.mktemp("topo") / "two_sockets.lscpu"
    p.write_text("# CPU,Core,Socket,Node\n" + "".join(f"{c},{c},{i},0\n" for i, c in enumerate(cpus)))
    return p


@pytest.fixture(scope="module")
def launches(two_sockets):
    """The two accelerate forms, run concurrently: 2 ranks on one node, and 2 nodes x 1 rank (--machine_rank)."""
    port = str(free_port())
    return _run_jobs(
        {
            "two_ranks": [[*LAUNCH, "--topology", str(two_sockets), "--master-port", str(free_port()), *PROBE]],
            "two_nodes": [
                [*LAUNCH, "--topology", str(THIS), "--nodes", "2", "--machine-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", port, *PROBE]
                for r in (0, 1)
            ],
        }
    )


@pytest.fixture(scope="module")
def slow_launches(two_sockets, tmp_path_factory):
    """mpirun + hostfile form (when Open MPI is installed) and accelerate's --cpu --num_processes trap."""
    jobs = {
        # the accelerate 1.15 trap this package works around: --cpu --num_processes 2 starts ONE process
        "trap": [[PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "launch.probe"]],
    }
    if shutil.which("mpirun"):
        hostfile = tmp_path_factory.mktemp("hosts") / "hosts"
        hostfile.write_text("localhost slots=2\n")
        jobs["mpirun"] = [[*LAUNCH, "--topology", str(two_sockets), "--hostfile", str(hostfile), "--master-port", str(free_port()), *PROBE]]
    return _run_jobs(jobs)


def _assert_world_of_two(rcs, out):
    assert rcs and all(rc == 0 for rc in rcs), out[-3000:]
    probes = parse_probes(out)
    assert len(probes) == 2, out[-3000:]
    assert sorted(p["rank"] for p in probes) == [0, 1]
    for p in probes:
        assert p["world_size"] == 2 and p["accelerate_num_processes"] == 2 and p["backend"] == "gloo"
        assert p["accelerate_distributed_type"] == "MULTI_CPU"
        assert p["all_reduce_sum"] == 3 and p["stop_flag_agreed"] is True and p["min_int_agreed"] is True
        assert p["pinned_by_launch_pin"]
    return probes


@pytest.mark.multiprocess
def test_real_two_ranks_one_node(launches):
    probes = _assert_world_of_two(*launches["two_ranks"])
    affinities = sorted(p["cpu_affinity"] for p in probes)
    assert len(set(affinities)) == 2 and all("," not in a and "-" not in a for a in affinities)  # 1 CPU each, disjoint
    assert all(p["omp_num_threads"] == "1" and p["threads_per_rank"] == 1 for p in probes)


@pytest.mark.multiprocess
def test_real_two_nodes_machine_rank_form(launches):
    _assert_world_of_two(*launches["two_nodes"])


@pytest.mark.slow
def test_real_mpirun_hostfile_form(slow_launches):
    if "mpirun" not in slow_launches:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    probes = _assert_world_of_two(*slow_launches["mpirun"])
    assert len({p["cpu_affinity"] for p in probes}) == 2


@pytest.mark.slow
def test_accelerate_cpu_num_processes_trap_starts_one_process(slow_launches):
    rcs, out = slow_launches["trap"]
    probes = parse_probes(out)
    assert rcs == [0] and len(probes) == 1 and probes[0]["world_size"] == 1, out[-2000:]
