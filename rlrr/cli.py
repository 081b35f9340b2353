"""What the command-line tools share: the flags that name a finished run, and one rule for bad input
(one line on stderr, ``<tool>: error: <what>``, exit code 2; anything else keeps its traceback)."""
import argparse
import functools
import sys
from typing import Callable

from .config import ConfigError
from .errors import DataError, ManifestError


class UsageError(Exception):
    """A bad argument a tool found itself (argparse cannot check it)."""


BAD_INPUT = (ConfigError, ManifestError, DataError, ValueError, OSError, UsageError)


def tool_main(tool: str, errors: tuple = BAD_INPUT) -> Callable:
    """Decorator for a tool's ``main(argv) -> int``: an exception in ``errors`` becomes one line on
    stderr and exit code 2."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except errors as e:
                print(f"{tool}: error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap


def add_run_arguments(ap: argparse.ArgumentParser, *, optional: bool = False, source: bool = True) -> None:
    """RUN_DIR (a finished run), and where its model comes from: ``--source merged`` (merged.safetensors,
    a plain timm model) or ``adapter`` (the backbone rebuilt, adapter.safetensors on it; ``--backbone``
    when the pre-trained file moved since training)."""
    ap.add_argument("run", nargs="?" if optional else None, help="a finished run directory")
    if source:
        ap.add_argument("--source", choices=["merged", "adapter"], default="merged")
        ap.add_argument("--backbone", help="the pre-trained file, if it moved since training (adapter source)")
