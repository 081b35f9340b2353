"""Fault injection for the reliability tests, from outside the library: put this folder on PYTHONPATH
and Python imports it at start-up in every process (torchrun's workers included; the tests' torchrun
forks its workers with it loaded, tests/torchrun.py). Each fault is armed by an environment variable
and fires once per test (a marker file, RLRR_FAULT_ONCE, remembers that it fired, so a restarted worker
runs clean):

  RLRR_FAULT_KILL_IN_SAVE=N   SIGKILL this process in the middle of its N-th torch.save to a file (half written)
  RLRR_FAULT_NAN_AT=N         the N-th training loss (a cross-entropy under autograd) is NaN
  RLRR_FAULT_NAN_GRAD_AT=N    the N-th training loss is finite, and its gradient NaN
  RLRR_FAULT_RAISE_AT=N       raise RuntimeError at the N-th training loss
  RLRR_FAULT_SIGNAL_AT=N      the process sends itself SIGUSR1 (a preemption notice) at the N-th training loss
  RLRR_FAULT_SLOW_EVAL=PATH   every evaluation batch takes a second, and PATH is created at the first one
  RLRR_FAULT_RANK=R           only on this rank (default 0)
  RLRR_FAULT_ARGV=TEXT        only in a process whose command line contains TEXT (one run of a sweep)
"""
import importlib.abc
import importlib.util
import os
import sys

_once = os.environ.get("RLRR_FAULT_ONCE")


def _armed() -> bool:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    this_run = os.environ.get("RLRR_FAULT_ARGV", "") in " ".join(sys.argv)
    return rank == os.environ.get("RLRR_FAULT_RANK", "0") and this_run and not (_once and os.path.exists(_once))


def _fired() -> None:
    if _once:
        with open(_once, "w") as f:
            f.write(str(os.getpid()))


def _counter(var: str):
    target, seen = int(os.environ[var]), [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == target and _armed()
    return hit


def _install(torch) -> None:
    """The faults armed in this process's environment, patched into torch once it has loaded."""
    if "RLRR_FAULT_KILL_IN_SAVE" in os.environ:
        import signal

        _save, _hit = torch.save, _counter("RLRR_FAULT_KILL_IN_SAVE")

        def _killing_save(obj, f, *args, **kwargs):
            # only saves to files count (torch.distributed pickles objects through torch.save into buffers)
            if not isinstance(f, (str, os.PathLike)) or not _hit():
                return _save(obj, f, *args, **kwargs)
            _save(obj, f, *args, **kwargs)
            with open(f, "r+b") as fh:  # leave half of it, as a crash mid-write would
                fh.truncate(os.path.getsize(f) // 2)
            _fired()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = _killing_save

    for _var in ("RLRR_FAULT_NAN_AT", "RLRR_FAULT_NAN_GRAD_AT", "RLRR_FAULT_RAISE_AT", "RLRR_FAULT_SIGNAL_AT"):
        if _var in os.environ:
            import torch.nn.functional as F
            _ce, _hit_loss, _kind = F.cross_entropy, _counter(_var), _var

            def _faulty_cross_entropy(*args, **kwargs):
                loss = _ce(*args, **kwargs)
                if torch.is_grad_enabled() and _hit_loss():
                    _fired()
                    if _kind == "RLRR_FAULT_RAISE_AT":
                        raise RuntimeError("injected failure (RLRR_FAULT_RAISE_AT)")
                    if _kind == "RLRR_FAULT_SIGNAL_AT":
                        import signal
                        os.kill(os.getpid(), signal.SIGUSR1)
                        return loss
                    if _kind == "RLRR_FAULT_NAN_GRAD_AT":
                        loss.register_hook(lambda grad: grad * float("nan"))
                        return loss
                    return loss * float("nan")
                return loss
            F.cross_entropy = _faulty_cross_entropy
            torch.nn.functional.cross_entropy = _faulty_cross_entropy

    if "RLRR_FAULT_SLOW_EVAL" in os.environ:
        import time

        import torch.nn.functional as F
        _eval_ce, _slow = F.cross_entropy, []

        def _slow_eval_cross_entropy(*args, **kwargs):
            if not _slow:  # decided once per process, at its first loss, from its rank and command line
                _slow.append(_armed())
            if _slow[0] and not torch.is_grad_enabled():
                _fired()
                open(os.environ["RLRR_FAULT_SLOW_EVAL"], "a").close()
                time.sleep(1.0)
            return _eval_ce(*args, **kwargs)
        F.cross_entropy = _slow_eval_cross_entropy
        torch.nn.functional.cross_entropy = _slow_eval_cross_entropy


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Runs ``_install`` when torch has finished importing, in the processes that import it: a process
    that never does (the resource tracker, a batch script's helpers) does not pay for torch (3 s of
    CPU) because a fault is armed somewhere in its test."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_torch_init = spec.loader.exec_module

        def exec_module(module):
            run_torch_init(module)
            _install(module)
        spec.loader.exec_module = exec_module
        return spec


if any(v.startswith("RLRR_FAULT_") and v != "RLRR_FAULT_ONCE" for v in os.environ):
    sys.meta_path.insert(0, _AfterTorch())
