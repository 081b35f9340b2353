"""torchrun for the tests: torch.distributed.run's own ``main`` (the elastic agent users run: its
rendezvous, restarts, signal forwarding and exit codes), with one difference in how a worker starts.
torchrun starts each worker as a new interpreter (``python -u SCRIPT ARGS``), which then imports torch,
torch._dynamo, timm and rlrr again: about 4.5 CPU-s per worker before any training, against under a
second of training on the tests' tiny model, and the suite starts about a hundred workers. Here the
launcher loads those modules once (with the collector paused and then frozen, as launch/train.py loads
them) and each worker is this process forked, turned into what ``python -u SCRIPT ARGS`` would be:

- its own session (torchrun's ``start_new_session``), its stdio from the launcher as given, unbuffered
  (``-u``); other descriptors closed, as after exec;
- the worker's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), its working directory, and the
  intra-op thread count OMP_NUM_THREADS asks for (the OpenMP runtime read that variable when the
  launcher loaded torch, before torchrun set it);
- the signal handlers the new interpreter would have (exec's rules, then Python's start), no
  faulthandler, multiprocessing's own key and temp folder, and none of the exit handlers the agent
  registered;
- ``sys.argv`` and ``sys.path[0]`` of the script, which runs as ``__main__``; it ends as the
  interpreter would (SystemExit's code, a traceback and 1, threads joined, exit handlers run), or
  through its own ``os._exit``.

Faults armed through the environment (tests/faults/sitecustomize.py) patch torch in the launcher when it
loads torch, and each worker inherits them unfired: they count and decide per process, from the worker's
RANK and command line, when they are first reached.

    python tests/torchrun.py --standalone --nproc_per_node=2 launch/train.py --config ...
"""
import atexit
import faulthandler
import inspect
import io
import logging
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import threading
import warnings

from rlrr.startup import long_lived_imports

FRESH_ROOT_LOGGER = (list(logging.root.handlers), logging.root.level)
AGENT_EXIT_HANDLERS = []


# exec resets a caught signal to the default and keeps an ignored one ignored; Popen's restore_signals
# resets these to the default too, and a new interpreter then ignores them again
_PYTHON_IGNORES = {signal.SIGPIPE, signal.SIGXFSZ}


def _signals_after_exec() -> None:
    """Each signal's handler as ``python -u SCRIPT`` started by the agent would have it: what exec leaves
    of the agent's handlers (so a signal ignored where the tests run, as under nohup, stays ignored
    unless the agent catches it), then the interpreter's own start (SIGPIPE and SIGXFSZ ignored, a
    default SIGINT raising KeyboardInterrupt)."""
    for sig in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
        current = signal.getsignal(sig)  # the agent's (inherited through the fork); None: set outside Python
        if sig in _PYTHON_IGNORES or current == signal.SIG_IGN:
            wanted = signal.SIG_IGN
        else:
            wanted = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        if current != wanted:
            signal.signal(sig, wanted)


def _recording(register):
    def recorded(func, *args, **kwargs):
        AGENT_EXIT_HANDLERS.append(func)
        return register(func, *args, **kwargs)
    return recorded


class ForkedWorker(subprocess.Popen):
    """A Popen whose child is this process, forked and turned into ``python -u SCRIPT ARGS``; anything
    else (another program, pipes to the launcher) starts as Popen starts it."""
    _PARAMS = list(inspect.signature(subprocess.Popen._execute_child).parameters)[1:]

    def _execute_child(self, *args):
        a = dict(zip(self._PARAMS, args))
        argv = list(a["args"])
        pipes = (a["p2cwrite"], a["c2pread"], a["errread"])
        script = len(argv) > 2 and not argv[2].startswith("-")  # not -m MODULE, -c CODE
        if argv[:2] != [sys.executable, "-u"] or not script or any(fd != -1 for fd in pipes) or a["preexec_fn"]:
            return super()._execute_child(*args)
        with warnings.catch_warnings():  # the agent's threads stay behind; the worker needs none of them
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _become_worker(argv[2:], a)
        self.pid, self._child_created = pid, True


def _become_worker(argv: list[str], a: dict) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        _fresh_process(a)
        code = _run_script(argv)
    except BaseException:  # a failure to set up: say so on the worker's stderr
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)


def _fresh_process(a: dict) -> None:
    if a["start_new_session"]:
        os.setsid()
    for fd, std in ((a["p2cread"], 0), (a["c2pwrite"], 1), (a["errwrite"], 2)):
        if fd != -1 and fd != std:
            os.dup2(fd, std)
    if a["close_fds"]:
        for fd in [int(f) for f in os.listdir("/proc/self/fd")]:
            if fd > 2 and fd not in a["pass_fds"]:
                try:
                    os.close(fd)
                except OSError:  # the listing's own descriptor, closed already
                    pass
    if a["cwd"]:
        os.chdir(a["cwd"])
    if a["env"] is not None:
        os.environ.clear()
        os.environ.update(a["env"])
    faulthandler.disable()  # first: it restores the handlers it replaced, which the loop below then resets
    _signals_after_exec()
    for func in AGENT_EXIT_HANDLERS:
        atexit.unregister(func)
    logging.root.handlers[:], logging.root.level = FRESH_ROOT_LOGGER
    me = multiprocessing.current_process()
    me.authkey = os.urandom(32)
    me._config.pop("tempdir", None)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        new = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=old.encoding, errors=old.errors,
                               write_through=True)
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)
    if "OMP_NUM_THREADS" in os.environ:
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _run_script(argv: list[str]) -> int:
    """The script as ``__main__``, ended as the interpreter ends a program: its exit code."""
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
    interrupted = False
    try:
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:  # sys.exit(): None is 0, a number is the code, anything else is printed and 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        interrupted, code = True, 130
    except BaseException:  # the interpreter prints it and exits 1
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # what the interpreter does at exit: join the threads, then the exit handlers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupted:  # as the interpreter leaves after an unhandled KeyboardInterrupt: killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def main() -> int:
    with long_lived_imports():
        import torch._dynamo  # noqa: F401  (what launch/train.py's main loads)
        from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler
        from torch.distributed.run import main as torchrun

        import rlrr.train  # noqa: F401
    subprocess_handler.Popen = ForkedWorker
    atexit.register = _recording(atexit.register)
    return torchrun()


if __name__ == "__main__":
    sys.exit(main())
