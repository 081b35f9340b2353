"""Scale paths through launch/train.py under torchrun: DeepSpeed ZeRO-3, the shipped DeepSpeed JSONs,
and multi-node (two torchrun agents on this machine)."""
import json
import socket
import subprocess

import pytest
import timm
from safetensors.torch import load_file

from helpers import (
    ROOT,
    TORCHRUN,
    assert_same_tensors,
    comparable_adapter,
    run_adapter,
    train_cmd,
    train_many,
    write_config,
)

pytestmark = pytest.mark.integration


def _run(cfg, name, *overrides, nproc=2):
    res = subprocess.run(train_cmd("--config", cfg, "--set", f"run_name={name}", *overrides, nproc=nproc),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
    return res


def _merged_comparable(merged: dict) -> dict:
    """merged.safetensors without the key third of each qkv bias (see helpers.comparable_adapter)."""
    return comparable_adapter({k.replace("qkv.bias", "qkv.bias_shift"): v for k, v in merged.items()})


ZERO3 = {"model": {"drop_path": 0.0}, "data": {"flip": False}, "train": {"engine": "deepspeed", "zero_stage": 3}}
SHIPPED_STAGE = 3


@pytest.fixture(scope="module")
def launched(tiny_shards, tmp_path_factory):
    """The runs of this module that do not check their own process, in one 2-process launch: the ZeRO-3
    run stopped at step 7 (its resume gets a process of its own), the DDP run of the same config, and
    the shipped zero3_bf16.json run. -> the folder, the ZeRO-3 config."""
    tmp = tmp_path_factory.mktemp("scale")
    cfg = write_config(tmp / "z3.yaml", tiny_shards, tmp / "runs", **ZERO3)
    shipped = write_config(tmp / "ds.yaml", tiny_shards, tmp / "runs",
                           train={"engine": "deepspeed", "zero_stage": SHIPPED_STAGE, "precision": "bf16",
                                  "deepspeed_config": str(_shipped_json()), "epochs": 1})
    outcome = train_many({"halves": ["--config", cfg, "--set", "run_name=halves", "train.max_steps=7"],
                          "ddp": ["--config", cfg, "--set", "run_name=ddp", "train.engine=ddp"],
                          "shipped": ["--config", shipped, "--set", "run_name=shipped"]}, tmp)[0]
    assert outcome["halves"]["results"] == {"stopped_at_step": 7}
    return tmp, cfg


def _shipped_json():
    return ROOT / "configs" / "deepspeed" / f"zero{SHIPPED_STAGE}_bf16.json"


def test_zero3_partitions_resumes_exactly_and_merges_to_the_ddp_model(launched, uninterrupted):
    tmp, cfg = launched
    runs, straight = tmp / "runs", uninterrupted(**ZERO3)
    _run(cfg, "halves", "--resume", "latest")

    # resume: bit for bit the uninterrupted run
    assert_same_tensors(run_adapter(straight), run_adapter(runs / "halves"))

    # partitioning: each rank holds about half of all parameter elements, the frozen ones included
    z3 = json.loads((straight / "results.json").read_text())
    ddp = json.loads((runs / "ddp" / "results.json").read_text())
    total = ddp["parameter_elements_per_rank"][0]
    assert ddp["parameter_elements_per_rank"] == [total, total]
    held = z3["parameter_elements_per_rank"]
    assert len(held) == 2 and all(0.49 * total <= h <= 0.52 * total for h in held), (held, total)

    # the merged model is a plain timm model equal to the DDP run's (fp32, reduction order aside)
    plain = timm.create_model("test_vit", num_classes=4, img_size=32)
    merged = load_file(str(straight / "merged.safetensors"))
    plain.load_state_dict(merged, strict=True)
    got, want = _merged_comparable(merged), _merged_comparable(load_file(str(runs / "ddp" / "merged.safetensors")))
    assert got.keys() == want.keys()
    worst = max(((got[k] - want[k]).abs().max().item(), k) for k in want)
    assert worst[0] <= 1e-4, worst


def test_a_shipped_deepspeed_json_trains(launched):
    """zero3_bf16.json end to end (every shipped JSON is checked against its run config in test_engine.py)."""
    run = launched[0] / "runs" / "shipped"
    given = json.loads((run / "deepspeed.json").read_text())
    shipped = json.loads(_shipped_json().read_text())
    assert {k: given["zero_optimization"][k] for k in shipped["zero_optimization"]} == shipped["zero_optimization"]
    assert given["bf16"] == {"enabled": True}
    assert given["train_batch_size"] == 4 and given["train_micro_batch_size_per_gpu"] == 2
    results = json.loads((run / "results.json").read_text())
    assert results["optimizer_updates"] == results["steps"] == 6
    plain = timm.create_model("test_vit", num_classes=4, img_size=32)
    plain.load_state_dict(load_file(str(run / "merged.safetensors")), strict=True)


def test_two_torchrun_agents_with_a_c10d_rendezvous_train_what_one_agent_with_four_processes_trains(
        tiny_shards, tmp_path):
    """Multi-node on one machine: two agents (--nnodes=2, 2 processes each) meet at a c10d rendezvous
    and form one world of 4; node rank, local rank and global rank all differ from each other."""
    cfg = write_config(tmp_path / "mn.yaml", tiny_shards, tmp_path / "runs", train={"epochs": 1})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=2",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test-{port}",
             str(ROOT / "launch" / "train.py"), "--config", cfg, "--set", "run_name=two-nodes"]
    agents = [subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(err[-2000:] for _, err in outs)
    # global rank 0 (the only rank that logs the run) lives on exactly one of the two nodes
    assert sum("world 4, global batch 4 (1 x 4 x 1)" in out for out, _ in outs) == 1, outs
    _run(cfg, "one-node", nproc=4)
    assert_same_tensors(run_adapter(tmp_path / "runs" / "two-nodes"), run_adapter(tmp_path / "runs" / "one-node"))
    assert json.loads((tmp_path / "runs" / "two-nodes" / "results.json").read_text())["world_size"] == 4
