"""Commands run with a time limit: one that runs over is stopped together with every process it started.

``subprocess.run(cmd, timeout=...)`` kills the command alone. For torchrun that is the launcher, whose
workers run in sessions of their own: they would train on, orphaned, holding the GPU and the run's
directory while a retry (or the next benchmark) starts beside them.
"""
import contextlib
import os
import signal
import subprocess
from typing import Optional

# torchrun gives its workers 30 s after it is told to stop before it kills them
TORCHRUN_GRACE_S = 40.0


def run_limited(cmd: list[str], timeout: Optional[float], grace: float = TORCHRUN_GRACE_S, **popen) -> Optional[int]:
    """The command's exit code, or None when it ran past ``timeout`` seconds (None: no limit). It runs in a
    session of its own; when it runs over, or this process is interrupted while it waits, its process
    group is stopped (``stop_group``). ``popen``: subprocess.Popen's other arguments."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace)
        return None
    except BaseException:  # KeyboardInterrupt: the run is told to stop (an rlrr run saves a checkpoint)
        stop_group(proc, grace)
        raise


def stop_group(proc: subprocess.Popen, grace: float = TORCHRUN_GRACE_S) -> None:
    """SIGTERM to the process group ``proc`` leads (torchrun forwards it to its workers; an rlrr run saves
    a checkpoint and exits), then SIGKILL to whatever of the group is left ``grace`` seconds later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
