"""What the loader workers' forkserver imports before it forks any: the streaming loader (torch,
webdataset) with the collector paused and frozen (rlrr.startup), so the forked workers neither
collect over those objects nor copy their pages."""
from rlrr.startup import long_lived_imports

with long_lived_imports():
    import rlrr.data.streaming  # noqa: F401  (imported for the forkserver's children)
