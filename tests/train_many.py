"""Several runs of the real entry point (launch/train.py's ``main(argv)``) one after another in this
process, for tests that compare many short runs of the same world size. Under torchrun every run uses
the one process group; each run builds its model, engine and loaders anew and seeds itself, so it trains
what a fresh process would. What is saved is the start of an interpreter per run (importing torch, timm
and DeepSpeed costs more CPU than training the tests' tiny model).

    torchrun --standalone --nproc_per_node=2 tests/train_many.py RUNS.json OUT.json

RUNS.json maps a name to an argv list. Rank 0 writes OUT.json: each name's results, or its error (the
runs after a failed one still run, unless the failure broke the process group).
"""
import json
import sys
import traceback

from rlrr.atomic import write_json_atomic
from rlrr.world import exit_process, world_from_env

from helpers import entry_point


def main(runs_file: str, out_file: str) -> int:
    with open(runs_file) as f:
        runs = json.load(f)
    train = entry_point().main
    outcome = {}
    for name, argv in runs.items():
        try:
            outcome[name] = {"results": train(argv)}
        except Exception:  # recorded and reported by the test that asked for this run
            outcome[name] = {"error": traceback.format_exc()[-3000:]}
    if world_from_env().rank == 0:
        write_json_atomic(out_file, outcome)
    return 0


if __name__ == "__main__":
    exit_process(main(*sys.argv[1:]))
