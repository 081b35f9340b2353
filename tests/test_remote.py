"""Shards read from an HTTP server and from pipe: commands (rlrr/data/fetch.py, rlrr/data/manifest.py):
each fault retried, retries that run out, the sha256 check, the per-node cache, and training under
torchrun from a server that fails, bit for bit as from disk. The server is tests/shard_server.py, in
this process; the readers are curl (http) and /bin/sh (pipe:), as in a real run."""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from shard_server import ShardServer

from rlrr.data.fetch import Fetcher
from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.transforms import Recipe
from rlrr.errors import DataError

from helpers import assert_same_tensors, entry_point, run_adapter, train_many, write_config

pytestmark = pytest.mark.integration  # curl and sh processes, a server thread

QUICK = Fetcher(retries=2, read_timeout_s=1.0, backoff_s=0.01)
EVAL = Recipe("vtab", False, image_size=32)


@pytest.fixture(scope="module")
def served(tiny_shards):
    with ShardServer(Path(tiny_shards)) as server:
        yield server


def _keys(loader) -> list:
    return [k for _, _, keys in loader.epoch(0) for k in keys]


def test_a_reset_a_503_and_a_stall_are_each_retried_and_the_bytes_are_the_shards(served, tiny_shards, capsys):
    shard = "test/test-000000.tar"
    data = (Path(tiny_shards) / shard).read_bytes()
    served.fail(shard, "reset", "503", "stall")
    before = served.requests[shard]
    assert Fetcher(retries=3, read_timeout_s=1.0, backoff_s=0.01).read(
        f"{served.url}/{shard}", hashlib.sha256(data).hexdigest()) == data
    assert served.requests[shard] - before == 4
    said = capsys.readouterr().err.splitlines()
    reasons = [  # curl reports a reset after some data as either
        r"curl exited with status (56|18): curl: \((56|18)\) (Recv failure: Connection reset by peer|transfer closed)",
        r"curl exited with status 22: curl: \(22\) The requested URL returned error: 503",
        r"no data for 1 s \(data.read_timeout_s\)"]
    assert len(said) == 3, said
    for line, reason, wait in zip(said, reasons, ("1 of 3 in 0.01", "2 of 3 in 0.02", "3 of 3 in 0.04")):
        assert re.fullmatch(f"rlrr: {served.url}/{shard}: {reason}.*; retry {wait} s", line), line


def test_a_remote_split_reads_as_the_local_one_over_http_and_through_a_pipe_command(served, tiny_shards):
    local = _keys(SplitLoader(Manifest(tiny_shards), "test", train=False, batch_size=4, recipe=EVAL, workers=0))
    for where in (served.url, f"{served.url}/manifest.json", f"pipe:cat {tiny_shards}/{{}}"):
        remote = Manifest(where, QUICK)
        assert remote.split("test").shards[0] == (f"pipe:cat {tiny_shards}/test/test-000000.tar" if "pipe" in where
                                                  else f"{served.url}/test/test-000000.tar")
        assert _keys(SplitLoader(remote, "test", train=False, batch_size=4, recipe=EVAL, workers=0)) == local


def test_retries_used_up_end_evaluation_with_one_line_and_skip_a_training_shard_counted(served):
    manifest = Manifest(served.url, QUICK)
    served.fail("test/test-000001.tar", "503", "503", "503")
    with pytest.raises(DataError) as e:
        _keys(SplitLoader(manifest, "test", train=False, batch_size=4, recipe=EVAL, workers=0))
    assert str(e.value) == (f"unreadable shard: {served.url}/test/test-000001.tar: curl exited with status 22: "
                            "curl: (22) The requested URL returned error: 503 (data.retries = 2 used up)")
    served.fail("train800/train800-000002.tar", "reset", "reset", "reset")
    train = SplitLoader(manifest, "train800", train=True, batch_size=4, in_memory=True, workers=0,
                        recipe=Recipe("vtab", True, image_size=32))
    assert len(train.labels) == 20 and train.take_skipped() == 4  # the shard's 4 samples, counted


def test_a_changed_shard_fails_its_sha256_check_with_one_line(tiny_shards, tmp_path, capsys):
    folder = tmp_path / "changed"
    shutil.copytree(tiny_shards, folder)
    shard = folder / "train800" / "train800-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # one bit: the shard still reads, but it is not the one the manifest lists
    shard.write_bytes(data)
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    with ShardServer(folder) as server:
        for verify in (None, True):  # read at the start (in memory), or checked up front
            cfg = write_config(tmp_path / "changed.yaml", server.url, tmp_path / "runs",
                               data={"retries": 0, "verify": verify})
            assert entry_point().cli(["--config", cfg]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{server.url}/train800/train800-000000.tar: sha256 {digest[:12]}... does " \
                "not match the manifest's" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_the_cache_fetches_a_shard_once_and_again_when_its_copy_is_damaged(served, tiny_shards, tmp_path, capsys):
    shard = "val200/val200-000000.tar"
    data = (Path(tiny_shards) / shard).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    cached = Fetcher(cache_dir=str(tmp_path / "cache"))
    before = served.requests[shard]
    assert cached.read(f"{served.url}/{shard}", sha) == data == cached.read(f"{served.url}/{shard}", sha)
    assert served.requests[shard] - before == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{sha}.tar", f"{sha}.tar.lock"]
    (tmp_path / "cache" / f"{sha}.tar").write_bytes(data[:100])
    assert cached.read(f"{served.url}/{shard}", sha) == data and served.requests[shard] - before == 2
    assert "the cached copy of" in capsys.readouterr().err


def _train(tmp_path, **configs) -> dict:
    """Runs (name -> config) one after another in one launch of two processes; name -> adapter, results."""
    argvs = {name: ["--config", cfg, "--set", f"run_name={name}"] for name, cfg in configs.items()}
    _, stderr = train_many(argvs, tmp_path)
    return {name: {"stderr": stderr, "adapter": run_adapter(tmp_path / "runs" / name),
                   "results": json.loads((tmp_path / "runs" / name / "results.json").read_text())} for name in configs}


@pytest.mark.parametrize("in_memory", [False, True])
def test_training_under_torchrun_from_a_failing_server_equals_training_from_disk(served, tiny_shards, tmp_path,
                                                                                  in_memory):
    """Two ranks, one loader worker each. Streaming reads every training shard each epoch; in memory
    each rank reads them all once. A reset, a 503 and a stall on three training shards and a 503 on
    a test shard are each retried. With the cache on, a second run makes no shard request at all.
    Streaming from disk with data.decode: device (the files decoded in the training process, on the CPU
    here) trains the same adapter as decoding in the workers."""
    fetch = {"retries": 2, "read_timeout_s": 2.0, "retry_backoff_s": 0.01}
    common = {"in_memory": in_memory, "val_split": None}
    disk = write_config(tmp_path / "disk.yaml", tiny_shards, tmp_path / "runs", data=common, train={"epochs": 2})
    http = write_config(tmp_path / "http.yaml", served.url, tmp_path / "runs", train={"epochs": 2},
                        data={**common, **fetch, "cache_dir": str(tmp_path / "cache") if not in_memory else None})
    for shard, fault in (("train800-000001", "reset"), ("train800-000003", "503"), ("train800-000004", "stall")):
        served.fail(f"train800/{shard}.tar", fault)
    served.fail("test/test-000002.tar", "503")
    on_device = {} if in_memory else {"device": write_config(tmp_path / "device.yaml", tiny_shards, tmp_path / "runs",
                                                             data={**common, "decode": "device"}, train={"epochs": 2})}
    # one launch: the server's faults are in the http run's stderr
    trained = _train(tmp_path, disk=disk, http=http, **on_device)
    from_disk, from_server = trained["disk"], trained["http"]
    if not in_memory:
        assert_same_tensors(trained["device"]["adapter"], from_disk["adapter"])
        assert trained["device"]["results"]["history"] == from_disk["results"]["history"]
    assert_same_tensors(from_server["adapter"], from_disk["adapter"])
    assert from_server["results"]["history"] == from_disk["results"]["history"]
    assert from_server["results"]["train_samples_skipped"] == 0
    for reason in ("curl: (56)|curl: (18)", "error: 503", "no data for 2 s"):
        assert any(r in from_server["stderr"] for r in reason.split("|")), reason
    if not in_memory:
        before = served.shard_requests()
        again = _train(tmp_path, cached=http)["cached"]
        assert served.shard_requests() == before  # every shard came from the node's cache
        assert_same_tensors(again["adapter"], from_disk["adapter"])
