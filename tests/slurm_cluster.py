"""A real Slurm cluster on this machine: slurmctld on a bridge, one slurmd per network namespace (tests only).

``Cluster(n)`` starts Debian's slurm-wlm daemons (no stand-ins): a private ``munged`` (its own key and socket), a
``slurmctld`` on a bridge address in this namespace, and ``n`` ``slurmd``, each in its own network namespace with
its own ``eth0`` and address on the bridge, each started with ``nsenter --net`` (``ip netns exec`` remounts /sys
and slurmd then finds no cgroup filesystem). The node names go into /etc/hosts; this host's own name keeps
resolving to loopback, as Debian's default ``127.0.1.1 HOSTNAME`` line makes it on real clusters. Every command
(``sbatch``, ``squeue``, ``scontrol``) is the real one, pointed at the private ``slurm.conf`` by ``SLURM_CONF``.

Everything is removed by :meth:`Cluster.close` (also at interpreter exit): the daemons (by pid, and the job
processes their steps started), the namespaces and bridge, the /etc/hosts lines, the spool and state directories.
Recipe measured 2026-12-07 (facts.md): slurm-wlm 22.05, cgroup v1 + ``IgnoreSystemd``, ``proctrack/linuxproc``,
``task/none``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

HOSTS = Path("/etc/hosts")
DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "sinfo", "nsenter", "setpriv")


def skip_reason() -> str | None:
    """Why a cluster cannot run here (for ``pytest.skip``), or None: only without root. With root, missing
    packages are an error (:func:`missing`): CI installs them (.ci/run), so a Slurm test never silently skips."""
    if os.geteuid() != 0:
        return "a Slurm test cluster needs root (network namespaces, /etc/hosts, daemons); CI runs as root"
    return None


def missing() -> str | None:
    """What a cluster needs and this machine lacks, as an error message with the fix, or None."""
    lacking = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if shutil.which("ip") is None:
        lacking.append("ip (iproute2)")
    if lacking:
        return (f"the Slurm test cluster needs {', '.join(lacking)}: `apt-get install slurm-wlm munge iproute2` "
                "(.ci/run installs them)")
    return None


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _free_subnet() -> int:
    """A third octet N whose 10.241.N.0/24 no interface here uses."""
    used = _run("ip", "-4", "-o", "addr").stdout
    for _ in range(200):
        n = int.from_bytes(os.urandom(1), "little")
        if f"10.241.{n}." not in used:
            return n
    raise RuntimeError("no free 10.241.N.0/24 subnet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, nodes: int = 2, kill_wait: int = 30, slurmd_timeout: int = 30, start_timeout: float = 60):
        lacking = missing()
        if lacking:
            raise RuntimeError(lacking)
        self.tag = uuid.uuid4().hex[:5]
        self.n = nodes
        self.names = [f"sft{self.tag}n{i}" for i in range(nodes)]  # Slurm node names = netns names
        self.bridge = f"sftbr{self.tag}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hosts_marker = f"# sft-slurm-test {self.tag}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"sft-slurm-{self.tag}-"))
        self.dir.chmod(0o755)  # munged (user munge) must reach its directory inside
        self._closed = False
        atexit.register(self.close)
        try:
            self._network()
            self._munge()
            self._config(kill_wait, slurmd_timeout)
            self._start_daemons(start_timeout)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------------------- set-up
    def _network(self) -> None:
        self.subnet = _free_subnet()
        self.ctl_addr = f"10.241.{self.subnet}.1"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.ctl_addr}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self.addrs = []
        for i, ns in enumerate(self.names):
            addr = f"10.241.{self.subnet}.{10 + i}"
            self.addrs.append(addr)
            host_side = f"sfv{self.tag}{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_side, "type", "veth", "peer", "name", f"sfp{self.tag}{i}")
            _run("ip", "link", "set", f"sfp{self.tag}{i}", "netns", ns)
            _run("ip", "-n", ns, "link", "set", f"sfp{self.tag}{i}", "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "link", "set", host_side, "master", self.bridge)
            _run("ip", "link", "set", host_side, "up")
        lines = "".join(f"{a} {n}\n" for a, n in zip(self.addrs, self.names))
        with HOSTS.open("a") as f:  # in place: /etc/hosts may be a bind mount
            f.write(f"{self.hosts_marker}\n{lines}{self.hosts_marker} end\n")

    def _munge(self) -> None:
        m = self.dir / "munge"
        m.mkdir()
        key = m / "munge.key"
        _run("mungekey", "-c", "-k", str(key))
        shutil.chown(m, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        m.chmod(0o755)  # clients (root, any user) reach the socket; munged refuses a dir others cannot enter
        self.munge_socket = m / "munge.socket"
        log = open(self.dir / "munged.log", "w")
        self.procs["munged"] = subprocess.Popen(
            ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}", f"--log-file={m / 'munged.log'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {(self.dir / 'munged.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def _config(self, kill_wait: int, slurmd_timeout: int) -> None:
        self.conf = self.dir / "slurm.conf"
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir()
        self.ctl_port = _free_port()
        self.slurmd_port = _free_port()
        # two "GPUs" per node (a GRES without devices): enough for the GPU template's rank arithmetic on CPU ranks
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count()} Gres=gpu:2 State=UNKNOWN"
                          for n, a in zip(self.names, self.addrs))
        d = self.dir
        # cred_expire: a requeued job waits this long before it may start again (default 120 s)
        self.conf.write_text(f"""\
ClusterName=sft{self.tag}
SlurmctldHost={socket.gethostname()}({self.ctl_addr})
SlurmctldPort={self.ctl_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=15
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
SlurmdTimeout={slurmd_timeout}
SlurmctldTimeout=30
KillWait={kill_wait}
MinJobAge=600
InactiveLimit=0
MessageTimeout=10
JobRequeue=1
{nodes}
PartitionName=sft Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE
""")
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        (d / "dev").mkdir()
        for i in range(2):  # slurmd counts a GPU per device file; plain files serve (no device cgroup here)
            (d / "dev" / f"gpu{i}").touch()
        (d / "gres.conf").write_text("AutoDetect=off\n" + "".join(f"NodeName={n} Name=gpu File={d}/dev/gpu[0-1]\n"
                                                                    for n in self.names))

    def env(self, **extra: str) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def _start_daemons(self, timeout: float) -> None:
        env = self.env()
        self.procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i"], env=env, stdout=open(self.dir / "log" / "slurmctld.out", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        for ns in self.names:
            self.start_slurmd(ns)
        self.wait_idle(timeout)

    def start_slurmd(self, node: str) -> None:
        self.procs[f"slurmd-{node}"] = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{node}", "slurmd", "-D", "-N", node], env=self.env(),
            stdout=open(self.dir / "log" / f"slurmd-{node}.out", "a"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.node_states()
            if len(states) == self.n and all(s.startswith("idle") for s in states.values()):
                return
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}):\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm nodes are not idle after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    # ---------------------------------------------------------------------------------------------- use
    def cmd(self, *argv: str, check: bool = True, cwd=None, env=None) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, scontrol, ...) against this cluster."""
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, cwd=cwd,
                           env=env or self.env())
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def node_states(self) -> dict[str, str]:
        r = self.cmd("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)

    def sbatch(self, *argv: str, cwd, env=None) -> int:
        r = self.cmd("sbatch", "--parsable", *argv, cwd=cwd, env=env)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        r = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                          "DEADLINE", "PREEMPTED")) -> dict[str, str]:
        """Wait until the job is in one of ``states``; on timeout cancel it and raise with its state and logs."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                self.cmd("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                                   f"(cancelled): {info}\n{self.logs()}")
            time.sleep(0.5)

    def wait_running(self, job_id: int, timeout: float = 60) -> dict[str, str]:
        return self.wait(job_id, timeout, states=("RUNNING",))

    def kill_node(self, node: str) -> list[int]:
        """The node dies: its slurmd, its slurmstepd and every process they started get SIGKILL. Returns the pids."""
        p = self.procs.get(f"slurmd-{node}")
        pids = []
        if p is not None and p.poll() is None:
            pids = [p.pid, *_descendants(p.pid)]
        for step in _stepds(node):
            pids += [step, *_descendants(step)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p is not None:
            p.wait(timeout=10)
        return pids

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            try:
                out.append(f"--- {f.name}\n{f.read_text()[-tail:]}")
            except OSError:
                pass
        return "\n".join(out)

    # ---------------------------------------------------------------------------------------------- tear-down
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # job processes first (their slurmstepd), then the daemons, each by pid
        for ns in getattr(self, "names", []):
            for step in _stepds(ns):
                for pid in [*_descendants(step), step]:
                    _kill(pid)
        for name, p in reversed(list(self.procs.items())):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        for ns in getattr(self, "names", []):
            _run("ip", "netns", "del", ns, check=False)
        if getattr(self, "bridge", None):
            _run("ip", "link", "del", self.bridge, check=False)
        if getattr(self, "hosts_marker", None) and HOSTS.exists():
            text = HOSTS.read_text()
            kept, skip = [], False
            for line in text.splitlines(keepends=True):
                if line.startswith(self.hosts_marker):
                    skip = not line.rstrip().endswith(" end")
                    continue
                if not skip:
                    kept.append(line)
            if len(kept) != len(text.splitlines(keepends=True)):
                with HOSTS.open("w") as f:
                    f.write("".join(kept))
        if getattr(self, "dir", None):
            shutil.rmtree(self.dir, ignore_errors=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stepds(node: str) -> list[int]:
    """The slurmstepd processes of ``node`` (their command line names it: ``slurmstepd: [JOB.STEP]`` runs with
    the node's spool directory open; we match the node name in the environment-free cmdline of its parent)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            if not cmd.startswith(b"slurmstepd"):
                continue
            netns = os.readlink(d / "ns" / "net")
        except OSError:
            continue
        if netns == _netns_id(node):
            found.append(int(d.name))
    return found


def _netns_id(node: str) -> str | None:
    try:
        return f"net:[{os.stat(f'/var/run/netns/{node}').st_ino}]"
    except OSError:
        return None
