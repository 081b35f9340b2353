"""Commands run with a time limit: one that runs over is stopped together with the processes it started.

``subprocess.run(cmd, timeout=...)`` kills the command alone, with SIGKILL. For torchrun that is the
launcher, whose workers run in sessions of their own: they would train on, orphaned, holding the GPU
and the run's directory while a retry (or the next benchmark) starts beside them. Told to stop with
SIGTERM instead, torchrun forwards it to its workers (an rlrr run saves a checkpoint) and kills them
30 s later.
"""
import contextlib
import os
import signal
import subprocess
from typing import Optional

# torchrun gives its workers 30 s after it is told to stop before it kills them
TORCHRUN_GRACE_S = 40.0


def run_limited(cmd: list[str], timeout: Optional[float], grace: float = TORCHRUN_GRACE_S, own_group: bool = True,
                **popen) -> Optional[int]:
    """The command's exit code, or None when it ran past ``timeout`` seconds (None: no limit). When it runs
    over, or this process is interrupted while it waits, it is stopped (``stop``). ``own_group``: the
    command leads a process group of its own, stopped as a whole (every process it started that did not
    leave the group); False keeps it in this process's group, so that a terminal's Ctrl-C reaches it
    too, and stopping it signals the command alone. ``popen``: subprocess.Popen's other arguments."""
    proc = subprocess.Popen(cmd, start_new_session=own_group, **popen)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, grace, group=own_group)
        return None
    except BaseException:  # KeyboardInterrupt: the run is told to stop (an rlrr run saves a checkpoint)
        stop(proc, grace, group=own_group)
        raise


def stop(proc: subprocess.Popen, grace: float = TORCHRUN_GRACE_S, group: bool = True) -> None:
    """SIGTERM to ``proc`` (``group``: to the process group it leads), then SIGKILL to whatever of it is
    left ``grace`` seconds later."""
    def send(sig):
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    send(signal.SIGKILL)
    proc.wait()
