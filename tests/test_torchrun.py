"""tests/torchrun.py, the launcher the other tests run workers with: a worker forked from it looks, to
the script it runs, like the new interpreter torch's own torchrun starts (``python -u SCRIPT ARGS``)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import TORCHRUN

PROBE = r'''
import faulthandler, json, multiprocessing, os, signal, sys
import torch
out = sys.argv[1]
facts = {
    "name": __name__, "argv": sys.argv[1:], "path0": sys.path[0], "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS", "PROBE")},
    "threads": torch.get_num_threads(),
    "own_session": os.getsid(0) == os.getpid(),
    "signals": {getattr(s, "name", str(s)): str(signal.getsignal(s)) for s in signal.valid_signals()},
    "faulthandler": faulthandler.is_enabled(),
    "unbuffered": [type(s.buffer).__name__ for s in (sys.stdout, sys.stderr)],
    "descriptors": sorted(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2)[:-1],  # less the listing's
    "mp_tempdir": multiprocessing.current_process()._config.get("tempdir"),
}
with open(f"{out}.{os.environ['RANK']}", "w") as f:
    json.dump(facts, f)
print(f"rank {os.environ['RANK']} says hello", flush=False)
if os.environ["RANK"] == "1":
    sys.exit("rank 1 leaves with a message")
'''


@pytest.mark.integration
def test_a_forked_worker_is_what_torchruns_new_interpreter_would_be(tmp_path):
    script = tmp_path / "probe" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    facts = {}
    for name, launcher in (("forked", TORCHRUN), ("torchrun", [sys.executable, "-m", "torch.distributed.run"])):
        env = {"PROBE": "yes", **{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}}
        res = subprocess.run([*launcher, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        # rank 1's sys.exit(message): the message on its stderr, exit code 1, so torchrun fails
        assert res.returncode == 1, res.stderr[-2000:]
        assert "rank 1 leaves with a message" in res.stderr and "exitcode: 1" in res.stderr, res.stderr[-2000:]
        assert "rank 0 says hello" in res.stdout and "rank 1 says hello" in res.stdout
        for rank in (0, 1):
            facts[name, rank] = json.loads((tmp_path / f"{name}.{rank}").read_text())
    for rank in (0, 1):
        forked, started = facts["forked", rank], facts["torchrun", rank]
        assert forked["argv"][0].endswith("forked") and started["argv"][0].endswith("torchrun")
        forked["argv"] = started["argv"] = None
        assert forked == started
    assert facts["forked", 1]["env"] == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
                                         "PROBE": "yes"}
    assert facts["forked", 0]["path0"] == str(script.parent) and facts["forked", 0]["threads"] == 1
