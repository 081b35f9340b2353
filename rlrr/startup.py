"""Process start-up. torch, torch._dynamo and timm create about a million Python objects on import, all
of them alive until the process ends; with the cyclic garbage collector on, the import runs dozens of
full collections over them (about a fifth of its CPU time: 0.8 of 4.2 s here). The collector is paused
while they load, and what they created is then frozen out of later collections, which also keeps
forked children (loader workers) from touching those pages (Python's ``gc.freeze`` documentation)."""
import contextlib
import gc


@contextlib.contextmanager
def long_lived_imports():
    """``with long_lived_imports(): import torch ...``: imports with the collector paused, then frozen."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
