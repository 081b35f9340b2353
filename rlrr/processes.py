"""Commands run with a time limit: one that runs over is stopped together with the processes it started.

``subprocess.run(cmd, timeout=...)`` kills the command alone, with SIGKILL. For torchrun that is the
launcher, whose workers run in sessions of their own: they would train on, orphaned, holding the GPU
and the run's directory while a retry (or the next benchmark) starts beside them. Told to stop with
SIGTERM instead, torchrun forwards it to its workers (an rlrr run saves a checkpoint) and kills them
30 s later; the workers are also told directly (``stop``), since torchrun can lose the signal.
"""
import contextlib
import os
import signal
import subprocess
import time
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


def descendants(pid: int) -> set[tuple[int, int, bool]]:
    """Every process below ``pid`` as (pid, start time, whether it leads a process group), the start time
    telling a reused pid apart; read from /proc (Linux; elsewhere none). A worker in a session of its own
    is found here, not by its group."""
    children, info = {}, {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (fields := _stat(int(entry))):  # after the name: state, ppid, pgrp, ...
                children.setdefault(int(fields[1]), []).append(int(entry))
                info[int(entry)] = (int(fields[19]), int(fields[2]) == int(entry))
    found, todo = set(), list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.add((child, *info[child]))
        todo += children.get(child, [])
    return found


def _stat(pid: int) -> Optional[list[str]]:
    """/proc/PID/stat's fields after the command name (which may hold spaces); None: the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _running(process: tuple[int, int, bool]) -> bool:
    fields = _stat(process[0])
    return fields is not None and int(fields[19]) == process[1] and fields[0] != "Z"  # a zombie has exited


def stop(proc: subprocess.Popen, grace: float = TORCHRUN_GRACE_S, group: bool = True) -> None:
    """SIGTERM to ``proc`` (``group``: to the process group it leads) and to each process below it that leads a
    group of its own (torchrun's workers), then SIGKILL to whatever of them all is left ``grace`` seconds
    later. The workers are told directly, not only through torchrun's forwarding: a SIGTERM that reaches
    torchrun inside a fork hook (filelock's, registered with os.register_at_fork) raises there, is ignored,
    and never reaches them. Their own children (data loader workers) are left to them until the SIGKILL."""
    def send(sig, processes):
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        for child in processes:
            if _running(child):  # not a pid reused since
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child[0], sig)

    tree = descendants(proc.pid)
    send(signal.SIGTERM, {child for child in tree if child[2]})
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    while any(map(_running, tree)) and time.monotonic() < deadline:  # the launcher is gone, its workers may not be
        time.sleep(0.05)
    send(signal.SIGKILL, tree | (descendants(proc.pid) if proc.poll() is None else set()))
    proc.wait()
