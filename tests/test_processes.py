"""rlrr.processes: a command cut at its time limit is stopped with every process it started, torchrun's
workers (in sessions of their own) included. Each check reads the processes' shared output pipe to its
end, which comes only once no process of them holds it."""
import os
import select
import subprocess
import sys
import time

import pytest

from rlrr.processes import run_limited, stop

from helpers import TORCHRUN

pytestmark = pytest.mark.integration  # starts processes

WORKER = """import os, signal, sys
def stopped(*_):
    open(os.path.join(sys.argv[1], f"stopped.{os.environ['RANK']}"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
print("ready", flush=True)
signal.pause()
"""


def _read_to_the_end(fd: int) -> bytes:
    """Everything written to the pipe; fails if a writer still holds it a minute later."""
    data = b""
    while True:
        assert select.select([fd], [], [], 60)[0], "a process still holds the pipe"
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("group", [True, False])
def test_a_torchrun_launch_is_stopped_with_its_workers(tmp_path, group):
    """SIGTERM to the launcher (or the group it leads): torchrun forwards it to both workers, which run
    their handler (where an rlrr run saves its checkpoint); SIGKILL to the launcher, as subprocess.run's
    timeout sends, would leave them running."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=group)
    assert [proc.stdout.readline(), proc.stdout.readline()] == [b"ready\n", b"ready\n"]
    stop(proc, group=group)
    assert _read_to_the_end(proc.stdout.fileno()) == b""
    assert (tmp_path / "stopped.0").exists() and (tmp_path / "stopped.1").exists()


LOST_SIGNAL_LAUNCHER = """import signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as torchrun, when SIGTERM lands in a fork hook
worker = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], start_new_session=True)
raise SystemExit(worker.wait())
"""
WORKER_WITH_LOADER = """import os, signal, subprocess, sys
loader = subprocess.Popen([sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGTERM, "
    "lambda *_: open(os.path.join(sys.argv[1], 'loader-terminated'), 'w').close()); print(os.getpid(), "
    "flush=True); signal.pause()", sys.argv[1]])
def stopped(*_):
    open(os.path.join(sys.argv[1], "stopped"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
print("ready", flush=True)
signal.pause()
"""


def test_a_worker_is_told_to_stop_when_its_launcher_loses_the_signal(tmp_path):
    """A launcher that never passes SIGTERM on (torchrun, when the signal lands in filelock's fork hook: it
    raises there and is ignored): its worker, in a session of its own, is told directly and runs its
    handler; the launcher then ends by itself (exit 0, not SIGKILL). The worker's own child (a data loader
    worker) gets no SIGTERM from outside, only the final SIGKILL."""
    launcher, worker = tmp_path / "launcher.py", tmp_path / "worker.py"
    launcher.write_text(LOST_SIGNAL_LAUNCHER)
    worker.write_text(WORKER_WITH_LOADER)
    proc = subprocess.Popen([sys.executable, str(launcher), str(worker), str(tmp_path)], stdout=subprocess.PIPE,
                            start_new_session=True)
    lines = sorted([proc.stdout.readline(), proc.stdout.readline()])
    assert lines[1] == b"ready\n", lines
    loader = int(lines[0])
    stop(proc, grace=2.0)
    assert _read_to_the_end(proc.stdout.fileno()) == b""
    assert proc.returncode == 0 and (tmp_path / "stopped").exists()
    assert not (tmp_path / "loader-terminated").exists()
    assert _exits(loader), "the loader was never killed"


def _exits(pid: int, within: float = 30.0) -> bool:
    """Whether pid ends (gone, or a zombie not yet reaped by init) within the time. A killed process closes
    its files before it becomes a zombie, so it can still read as running just after its pipe closes."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def test_a_command_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    """None for a command that ran over; a process that ignores SIGTERM gets SIGKILL after the grace."""
    read, write = os.pipe()
    script = "( trap '' TERM; echo started; exec sleep 600 ) & wait"
    assert run_limited(["bash", "-c", script], timeout=1.0, grace=0.5, stdout=write) is None
    os.close(write)
    assert _read_to_the_end(read) == b"started\n"
    os.close(read)
    assert run_limited([sys.executable, "-c", "raise SystemExit(3)"], timeout=60) == 3
