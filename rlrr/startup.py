"""Process start-up. Importing torch, torch._dynamo and timm leaves about 630,000 objects for the cyclic
garbage collector to track, nearly all of them alive until the process ends; with the collector on, the
import runs six full collections and about 950 younger ones over them (about a fifth of its CPU: 0.8
of 4.2 s here), and every later full collection walks them all again. The collector is paused while
they load and what they made is then frozen out of later collections, which also keeps forked
children (loader workers) from writing to those pages (Python's ``gc.freeze`` documentation). The
few thousand cycles the imports leave behind stay frozen, unreclaimed: a few MB at most."""
import contextlib
import gc
import sys


@contextlib.contextmanager
def long_lived_imports():
    """``with long_lived_imports(): import torch ...``: imports with the collector paused, then frozen.
    Frozen only if the block loaded a module: a second call in the same process (another run through
    ``launch/train.py``'s ``main`` in a test, say) finds everything loaded and must not freeze the
    garbage of the runs before it."""
    enabled, loaded = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > loaded:
            gc.freeze()
        if enabled:
            gc.enable()
