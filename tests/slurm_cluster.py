"""A real SLURM (slurmctld + slurmd + munge) on localhost, for the launch/slurm tests: one node, or
several (``Cluster(nodes=2)``): then each slurmd runs in its own UTS namespace (``unshare --uts``)
under its own hostname (rlrr-node1, rlrr-node2, ... added to /etc/hosts as 127.0.0.1 while the
cluster runs) and listens on its own port, so SLURM and the job see separate nodes.

Everything lives in one temporary directory; ``stop()`` shuts the daemons down by their pid files
and checks that none is left running. Needs root and Debian's slurm-wlm + munge (the Makefile
installs them).
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CONF = """\
ClusterName=rlrrtest
SlurmctldHost=localhost
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=300
{node_lines}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
HOSTS = "/etc/hosts"


def available() -> str:
    """'' when a cluster can be started here, else why not."""
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(b) and
               not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"SLURM binaries missing: {missing} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root"
    return ""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, cpus: int = 2, nodes: int = 1):
        # munged runs as the munge user and must reach its directory: a world-traversable dir in /tmp
        # (pytest's own tmp dirs are private to root)
        self.root = Path(tempfile.mkdtemp(prefix="rlrr-slurm-"))
        self.root.chmod(0o755)
        for d in ("state", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.nodes = ["localhost"] if nodes == 1 else [f"rlrr-node{i + 1}" for i in range(nodes)]
        lines = [f"NodeName={n} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} RealMemory=4000 State=UNKNOWN"
                 for n in self.nodes]
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(CONF.format(root=self.root, ctld_port=_free_port(), d_port=_free_port(),
                                         node_lines="\n".join(lines), node_list=",".join(self.nodes)))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.munge_socket = self.root / "munge" / "munge.socket"

    def _sbin(self, name):
        return shutil.which(name) or f"/usr/sbin/{name}"

    def start(self) -> "Cluster":
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(self.root / "munge", "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        (self.root / "munge").chmod(0o755)
        subprocess.run(["runuser", "-u", "munge", "--", self._sbin("munged"), "--key-file", str(key),
                        "--socket", str(self.munge_socket), "--pid-file", str(self.root / "munge" / "munged.pid"),
                        "--log-file", str(self.root / "munge" / "munged.log"), "--seed-file",
                        str(self.root / "munge" / "munged.seed"), "--force"], check=True, env=self.env)
        subprocess.run([self._sbin("slurmctld"), "-i"], check=True, env=self.env)
        if len(self.nodes) > 1:
            self._add_hosts()
        for node in self.nodes:
            (self.root / f"spool-{node}").mkdir()
            slurmd = [self._sbin("slurmd"), "-N", node]
            if len(self.nodes) > 1:  # its own hostname: what the job's tasks see (SLURMD_NODENAME, hostname)
                slurmd = ["unshare", "--uts", "sh", "-c", f'hostname {node} && exec "$0" "$@"', *slurmd]
            subprocess.run(slurmd, check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()  # a line per node
            if len(out) == len(self.nodes) and all(o in ("idle", "mixed", "allocated") for o in out):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up: sinfo says {out!r}; see {self.root}/slurmctld.log")

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, **kw)

    def sbatch(self, *args, env=None) -> int:
        out = self.run("sbatch", "--parsable", *args, env=env or {}).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, job_id: int) -> str:
        out = self.run("scontrol", "show", "job", str(job_id), check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f} s")

    def start_requeued_now(self, job_id: int, timeout: float = 180) -> None:
        """SLURM holds a requeued job for 120 s (Reason=BeginTime); wait for that, then release it."""
        deadline = time.time() + timeout
        # released only once the first run has fully left the node (no job or step still completing)
        while not ("Reason=BeginTime" in self.run("scontrol", "show", "job", str(job_id), check=False).stdout
                   and set(self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()) == {"idle"}):
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} was not requeued within {timeout:.0f} s "
                                   f"(state {self.job_state(job_id)})")
            time.sleep(0.5)
        # slurmd revokes the first run's credential with 1 s resolution and refuses a relaunch in
        # that same second ("Job credential revoked", the job FAILS): the 120 s hold exists for this
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def diagnose(self, job_id: int) -> str:
        """The job record and the daemons' last log lines, for a failing test's message."""
        names = ("slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes))
        logs = "".join(f"\n--- {name} (tail)\n" + "\n".join((self.root / name).read_text().splitlines()[-25:])
                       for name in names if (self.root / name).exists())
        return self.run("scontrol", "show", "job", str(job_id), check=False).stdout + logs

    def _add_hosts(self) -> None:
        with open(HOSTS, "a") as f:
            f.write(f"127.0.0.1 {' '.join(self.nodes)}  # rlrr test cluster {self.root}\n")

    def _remove_hosts(self) -> None:
        with open(HOSTS) as f:
            kept = [line for line in f if f"# rlrr test cluster {self.root}" not in line]
        with open(HOSTS, "w") as f:  # in place: /etc/hosts may be a bind mount that cannot be replaced
            f.writelines(kept)

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        pids = [self.root / "slurmctld.pid", *(self.root / f"slurmd-{n}.pid" for n in self.nodes),
                self.root / "munge" / "munged.pid"]
        deadline = time.time() + 30
        for pid_file in pids:
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            while _alive(pid) and time.time() < deadline:
                if pid_file.name == "munged.pid" or time.time() > deadline - 20:
                    os.kill(pid, signal.SIGTERM)
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if len(self.nodes) > 1:
            self._remove_hosts()
        shutil.rmtree(self.root, ignore_errors=True)


def running_cluster(nodes: int = 1):
    """A pytest fixture body: a started cluster, then after the module: stopped, with no process and no
    /etc/hosts entry left behind."""
    why = available()
    if why:
        pytest.fail(f"cannot start the test SLURM cluster: {why}")
    c = Cluster(nodes=nodes).start()
    yield c
    c.stop()
    left = subprocess.run(["pgrep", "-f", str(c.root)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running after the cluster stopped: {left}"
    with open(HOSTS) as f:  # this cluster's line only: another module's cluster may be running beside it
        assert f"# rlrr test cluster {c.root}" not in f.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(path: Path, timeout=300) -> None:
    """Until ``path`` exists (a job's first checkpoint, say)."""
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.5)


def resumed_step(run: Path) -> int:
    """The step a requeued job resumed at, from the run's rank logs (exactly one resume expected)."""
    logs = "".join(p.read_text() for p in sorted((run / "logs").glob("*.log")))
    lines = [line for line in logs.splitlines() if f"resumed {run} at epoch" in line]
    assert len(lines) == 1, logs[-3000:]
    return int(lines[0].rsplit("step", 1)[1].split()[0])
