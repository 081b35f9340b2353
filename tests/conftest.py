"""Shared fixtures. Helpers importable by every test module live in tests/helpers.py."""
import os

import pytest

# Triton's interpreter runs rlrr/layers/fused.py's kernels on CPU tensors (tests/test_fused.py). Triton reads this
# when it is imported, so it is set before anything imports it; CPU runs never launch a kernel otherwise
# (model.kernel auto picks torch's ops off CUDA).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (make test: one worker per core) every worker and the processes it starts use one
# thread for torch's operators: two workers of two threads each on two cores spend their time spinning.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """The tiny 4-class task most training tests use: 24 train, 8 val, 13 test images in shards of 4."""
    from helpers import tiny_vtab_shards  # here, not above: helpers imports rlrr, which imports Triton
    return tiny_vtab_shards(tmp_path_factory.mktemp("tiny-task"), n_train=24, n_val=8, n_test=13, shard_size=4)
