"""rlrr.processes: a command cut at its time limit is stopped with every process it started, torchrun's
workers (in sessions of their own) included. Each check reads the processes' shared output pipe to its
end, which comes only once no process of them holds it."""
import os
import select
import subprocess
import sys

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


def test_a_command_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    """None for a command that ran over; a process that ignores SIGTERM gets SIGKILL after the grace."""
    read, write = os.pipe()
    script = "( trap '' TERM; echo started; exec sleep 600 ) & wait"
    assert run_limited(["bash", "-c", script], timeout=1.0, grace=0.5, stdout=write) is None
    os.close(write)
    assert _read_to_the_end(read) == b"started\n"
    os.close(read)
    assert run_limited([sys.executable, "-c", "raise SystemExit(3)"], timeout=60) == 3
