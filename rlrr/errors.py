"""The errors a run or a tool reports as one line (launch/train.py: exit code 2 for bad input, 3 for a
run that stopped itself). Nothing here imports torch, so that an entry point can catch them before it
has loaded anything heavy."""


class ManifestError(ValueError):
    """A shard manifest that is missing, unreadable, or asks for something it does not hold."""


class DataError(ValueError):
    """A shard that cannot be read where every sample counts (evaluation), or a label out of range.

    Raised in a loader worker, it reaches the trainer rebuilt by torch from the worker's traceback
    text (``DataError("Caught DataError in DataLoader worker ...")``): its message is then that text's
    last line, so ``str(e)`` is the same one line wherever it was raised."""

    def __init__(self, message: str):
        if message.startswith("Caught DataError"):
            message = message.strip().splitlines()[-1].removeprefix(f"{__name__}.DataError: ")
        super().__init__(message)


class RunStopped(RuntimeError):
    """The run stopped itself for a reason the user must see (one line), e.g. a non-finite loss."""
