"""Where the suite's CPU goes (pytest hooks; tests/conftest.py loads them when $RLRR_CPU_LOG is set):
each test's CPU seconds in the test process and in the processes it started and waited for (torchrun,
its ranks, the tools), one JSON line per test in $RLRR_CPU_LOG, and the files that used the most at the
end. Processes nobody waits for (SLURM jobs, a forkserver left to exit on its own) are not counted;
/proc/stat around the run gives the machine's total.

    RLRR_CPU_LOG=/tmp/cpu.jsonl .venv/bin/python -m pytest -q -n 2 --dist loadfile tests
"""
import collections
import json
import os
import resource
import time

import pytest


def _cpu() -> tuple[float, float]:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    (self0, children0), t0 = _cpu(), time.monotonic()
    yield
    self1, children1 = _cpu()
    with open(os.environ["RLRR_CPU_LOG"], "a") as f:  # one short line per write: workers append safely
        f.write(json.dumps({"test": item.nodeid, "self_s": round(self1 - self0, 2),
                            "children_s": round(children1 - children0, 2),
                            "wall_s": round(time.monotonic() - t0, 2)}) + "\n")


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("PYTEST_XDIST_WORKER") or not os.path.exists(os.environ["RLRR_CPU_LOG"]):
        return
    per_file = collections.defaultdict(float)
    with open(os.environ["RLRR_CPU_LOG"]) as f:
        for line in f:
            row = json.loads(line)
            per_file[row["test"].split("::")[0]] += row["self_s"] + row["children_s"]
    terminalreporter.section("CPU seconds per test file (test process + the processes it waited for)")
    for name, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])[:15]:
        terminalreporter.write_line(f"{seconds:8.1f}  {name}")
    terminalreporter.write_line(f"{sum(per_file.values()):8.1f}  in all")
