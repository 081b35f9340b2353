"""rlrr.train.main and launch/train.py end to end on a tiny timm ViT and generated shards (CPU)."""
import json
import os
import signal
import subprocess

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlrr.config import ConfigError, load_config
from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.transforms import Recipe, normalize

from helpers import assert_same_tensors, entry_point, run_adapter, train_cmd, write_config

main = entry_point().main

integration = pytest.mark.integration  # torchrun / DeepSpeed / subprocess runs: make test, not make test-fast


@pytest.fixture
def shards(tiny_shards):
    return tiny_shards


def test_single_process_run_writes_everything(shards, tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs")
    results = main(["--config", cfg])
    run = tmp_path / "runs" / "tiny"
    assert sorted(os.listdir(run)) == ["adapter.safetensors", "checkpoints", "config.yaml", "inference.json",
                                       "merged.safetensors", "results.json", "tensorboard"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["test_acc1_final"] == results["test_acc1_final"]
    for key in ("test_acc1_final", "test_acc1_at_best_val", "test_acc1_best_over_epochs"):
        assert 0.0 <= saved[key] <= 100.0
        assert round(saved[key] * 13 / 100) * 100 / 13 == pytest.approx(saved[key], abs=1e-3)  # k of 13 test images
    assert saved["epochs"] == 2 and saved["steps"] == 12 and saved["trainable_params"] > 0
    assert len(saved["config_hash"]) == 12
    assert saved["test_acc1_best_over_epochs"] >= saved["test_acc1_final"]
    # merged model: a plain timm model, strictly loadable, equal to the adapted one
    plain = timm.create_model("test_vit", num_classes=4, img_size=32).eval()
    plain.load_state_dict(load_file(str(run / "merged.safetensors")), strict=True)
    test = SplitLoader(Manifest(shards), "test", train=False, batch_size=5, recipe=Recipe("vtab", False, image_size=32))
    with torch.no_grad():
        correct = sum(int((plain(normalize(x, load_config(str(run / "config.yaml")).data.stats)).argmax(1) == y).sum())
                      for x, y, _ in test.epoch(0))
    assert correct * 100 / 13 == pytest.approx(saved["test_acc1_final"], abs=1e-3)  # the trained model, merged
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 0.01 and resolved["run_name"] == "tiny"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "val/acc1", "test/acc1",
            "sys/peak_memory_mb"} <= tags
    assert len(events.Scalars("train/loss")) == 12
    assert [e.value for e in events.Scalars("test/acc1")][-1] == pytest.approx(saved["test_acc1_final"], abs=1e-4)
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(1e-7, rel=1e-3) and max(lrs) > 5e-3  # warmup from warmup_lr, then cosine


def test_resume_gives_identical_adapter(shards, tmp_path):
    straight = write_config(tmp_path / "straight.yaml", shards, tmp_path / "runs")
    main(["--config", straight])
    halves = write_config(tmp_path / "halves.yaml", shards, tmp_path / "runs")
    stopped = main(["--config", halves, "--set", "train.max_steps=9"])  # stops mid-way through epoch 2
    assert stopped == {"stopped_at_step": 9}
    ckpt = torch.load(tmp_path / "runs" / "halves" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["step_in_epoch"] == 3
    with pytest.raises(ConfigError, match="already holds a run; pass --resume latest"):
        main(["--config", halves])
    main(["--config", halves, "--resume", "latest"])
    assert_same_tensors(run_adapter(tmp_path / "runs" / "straight"), run_adapter(tmp_path / "runs" / "halves"))
    ra = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "runs" / "halves" / "results.json").read_text())
    assert ra["history"] == rb["history"]


def test_the_loop_reads_each_step_back_once_the_next_one_is_queued(shards, tmp_path, monkeypatch):
    """A host read of a device value (item(), float(), bool()) waits for the GPU to finish all the work
    queued before it, and leaves the GPU idle while the host then queues the next work. rlrr's loop (the
    DDP engine) reads no device value itself: each optimizer step's outcome (its losses, gradient norm,
    whether it was applied, the ranks' flags) is copied to the host behind the step (StepOutcome), and the
    loop reads that copy only once the next step's forward and backward are queued, so the GPU has them to
    run while the host waits for the last step alone. Except: the first step (warm-up, its time is booked
    apart) and each epoch's last step. Two micro-batches a step: the read follows the next window's
    first. Work queued is counted as any other op dispatched since the last read."""
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    import rlrr
    import rlrr.train
    from rlrr.engine import DDPEngine

    library = os.path.dirname(os.path.abspath(rlrr.__file__)) + os.sep
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    dispatch = tuple(torch_dir + p for p in ("_dynamo" + os.sep, "_compile.py", "utils" + os.sep + "_python_dispatch"))
    waits, queued, events = [], [False], []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten._local_scalar_dense.default:
                queued[0] = True
            else:
                caller = sys._getframe(1)  # the Python line that asked for the value, past torch's dispatch
                while caller.f_code.co_filename.startswith(dispatch):
                    caller = caller.f_back
                if caller.f_code.co_filename.startswith(library) and queued[0]:
                    waits.append(f"{caller.f_code.co_filename[len(library):]}:{caller.f_code.co_name}")
                    queued[0] = False
            return func(*args, **(kwargs or {}))

    one_epoch, backward, read = rlrr.train.train_one_epoch, DDPEngine.backward, rlrr.train.StepOutcome.read

    def counted(run, epoch):
        queued[0] = True
        with HostReads():
            one_epoch(run, epoch)
        events.append("epoch end")

    def counted_backward(self, *args, **kwargs):
        events.append("backward")
        return backward(self, *args, **kwargs)

    def counted_read(self):
        events.append(f"read {self.step}")
        return read(self)

    monkeypatch.setattr(rlrr.train, "train_one_epoch", counted)
    monkeypatch.setattr(DDPEngine, "backward", counted_backward)
    monkeypatch.setattr(rlrr.train.StepOutcome, "read", counted_read)
    cfg = write_config(tmp_path / "reads.yaml", shards, tmp_path / "runs", train={"grad_accum": 2})
    results = main(["--config", cfg])
    assert results["steps"] == 12 and results["epochs"] == 2 and waits == [], waits
    # step 1 read at once (warm-up); steps 2-5 after the next window's first backward; step 6 at the epoch's end
    first = ["backward", "backward", "read 1", *_shifted(2, 6), "read 6", "epoch end"]
    assert events[:len(first)] == first, events
    assert events[len(first):] == [*_shifted(7, 12), "read 12", "epoch end"], events  # no warm-up in epoch 2


def _shifted(first: int, last: int) -> list:
    """The events of steps ``first``..``last`` when each is read after the next window's first backward."""
    out = []
    for k in range(first, last + 1):
        out += ["backward"] + ([f"read {k - 1}"] if k > first else []) + ["backward"]
    return out


def test_profile_steps_profiles_timed_steps_and_books_them_apart(shards, tmp_path, capsys):
    """train.profile_steps: after the warm-up step, that many optimizer steps run under torch.profiler
    (a table and a trace in <run>/profile, a summary in the log and results.json), booked apart from
    img/s as the warm-up is. A window the epoch's end reaches first closes there, with the steps it had."""
    import gzip

    for steps, counted in ((3, 3), (10, 4)):  # 6 steps an epoch: the window opens after step 2
        runs = tmp_path / f"runs{steps}"
        results = main(["--config", write_config(tmp_path / f"p{steps}.yaml", shards, runs,
                                                 train={"profile_steps": steps})])
        profile = results["profile"]
        assert profile["steps"] == counted and profile["wall_ms"] > 0 and set(profile) == {"steps", "wall_ms"}
        folder = runs / f"p{steps}" / "profile"
        table = (folder / "profile.txt").read_text()
        assert table.startswith(f"{counted} steps profiled: ") and "host (self CPU time)" in table
        assert "traceEvents" in json.loads(gzip.open(folder / "trace.json.gz").read())
        assert f"{counted} steps profiled: " in capsys.readouterr().out
        saved = torch.load(runs / f"p{steps}" / "checkpoints" / "last.pt", weights_only=True)["state"]
        assert saved["warmup_images"] == (1 + counted) * 4 and saved["images"] == 12 * 4  # batch 4
        timed = (saved["images"] - saved["warmup_images"]) / (saved["train_time"] - saved["warmup_s"])
        assert results["img_per_s"] == round(timed, 1)


def test_with_cuda_graphs_the_first_two_steps_are_warm_up(shards, tmp_path, monkeypatch, capsys):
    """A run that replays CUDA graphs runs each graph eagerly at the first step and records it at the
    second: both steps are booked as warm-up, apart from img/s (here an eager run on the CPU, told so)."""
    from rlrr.compile import CompilePlan

    monkeypatch.setattr(CompilePlan, "warmup_steps", property(lambda plan: 2))
    main(["--config", write_config(tmp_path / "w.yaml", shards, tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "first step: " in out and "first step: " not in out.split("img/s counts from here")[-1]
    assert "second step: " in out.split("; img/s counts from here")[0].splitlines()[-1]
    saved = torch.load(tmp_path / "runs" / "w" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert saved["warmup_images"] == 2 * 4 and saved["images"] == 12 * 4 and saved["warmup_s"] > 0


@integration
def test_ddp_two_processes(shards, tmp_path):
    """Also with bf16 autocast and bf16-stored frozen weights (DDP broadcasts those at start)."""
    cfg = write_config(tmp_path / "ddp.yaml", shards, tmp_path / "runs",
                       train={"precision": "bf16", "frozen_dtype": "bf16"})
    res = subprocess.run(train_cmd("--config", cfg, nproc=2), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "frozen linear weights stored in bf16" in res.stdout
    results = json.loads((tmp_path / "runs" / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 12  # global batch 4 = 2 ranks x 2
    assert results["history"][-1]["test_acc1"] == results["test_acc1_final"]


@integration
def test_sigterm_saves_a_resumable_checkpoint(shards, tmp_path):
    cfg = write_config(tmp_path / "long.yaml", shards, tmp_path / "runs", train={"epochs": 400, "eval_every": 1000})
    proc = subprocess.Popen(train_cmd("--config", cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 2/400" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "resume with --resume latest" in out
    state = torch.load(tmp_path / "runs" / "long" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert 2 <= state["epoch"] < 400 and state["global_step"] >= 12
    res = subprocess.run(train_cmd("--config", cfg, "--resume", "latest", "--set", "train.epochs=4"),
                         capture_output=True, text=True, timeout=300)
    # the resumed run honours its new (shorter) schedule length and finishes
    assert res.returncode == 0 and f"resumed {tmp_path / 'runs' / 'long'}" in res.stdout, res.stderr[-2000:]


@integration
def test_command_line_errors_exit_2_with_one_line(shards, tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", shards, tmp_path / "runs")
    res = subprocess.run(train_cmd("--config", cfg, "--set", "train.lrr=0.1"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr[-500:]
    assert res.stderr.strip() == f"train: error: {cfg}: unknown key train.lrr; did you mean train.lr?"


def test_batch_that_does_not_split_over_ranks_is_a_clear_error(shards, tmp_path):
    cfg = write_config(tmp_path / "b.yaml", shards, tmp_path / "runs", train={"batch_size": 5, "grad_accum": 2})
    with pytest.raises(ConfigError, match="train.batch_size = 5 is not divisible by world size 1 x train.grad_accum 2"):
        main(["--config", cfg])


def test_class_count_mismatch_is_a_clear_error(shards, tmp_path):
    cfg = write_config(tmp_path / "n.yaml", shards, tmp_path / "runs", data={"num_classes": 7})
    with pytest.raises(ConfigError, match=r"data.num_classes = 7 but .*manifest.json has 4 classes"):
        main(["--config", cfg])


@integration
def test_deepspeed_zero2_resume_is_exact(shards, tmp_path, uninterrupted):
    """2 processes each: ZeRO-2 straight vs stopped + resumed (identical adapters). ZeRO-3 and the
    shipped JSONs (bf16): tests/test_scale.py."""
    zero2 = {"engine": "deepspeed", "zero_stage": 2}
    cfg = write_config(tmp_path / "ds.yaml", shards, tmp_path / "runs", train=zero2)
    runs = tmp_path / "runs"
    for args in (["--set", "run_name=halves", "train.max_steps=8"], ["--set", "run_name=halves", "--resume", "latest"]):
        res = subprocess.run(train_cmd("--config", cfg, *args, nproc=2), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (runs / "halves" / "checkpoints" / "latest").read_text().strip() == "step12"
    assert_same_tensors(run_adapter(uninterrupted(train=zero2)), run_adapter(runs / "halves"))
    # frozen weights never reach a DeepSpeed checkpoint: the model states hold only the trainable tensors
    states = torch.load(next((runs / "halves" / "checkpoints" / "step12").glob("*model_states.pt")),
                        map_location="cpu", weights_only=True)
    assert "blocks.0.attn.qkv.weight" not in states["module"] and "blocks.0.attn.qkv.scale_in" in states["module"]


def test_bf16_frozen_weights_train_exactly_like_their_fp32_copy(shards, tmp_path, capsys):
    """train.frozen_dtype=bf16 (with bf16 autocast) changes only how W is stored: from a backbone whose
    linear weights are already bf16-representable it trains to the same adapter and accuracy, bit
    for bit, as keeping those weights in fp32. Merging still starts from the fp32 file."""
    backbone = timm.create_model("test_vit", num_classes=4, img_size=32)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.bfloat16().float())
    save_file(backbone.state_dict(), str(tmp_path / "rounded.safetensors"))
    results = {}
    for frozen in ("fp32", "bf16", "auto"):  # auto, the default: bf16 in a bf16 run
        cfg = write_config(tmp_path / f"frozen_{frozen}.yaml", shards, tmp_path / "runs",
                           model={"pretrained": str(tmp_path / "rounded.safetensors")},
                           train={"epochs": 1, "precision": "bf16", "frozen_dtype": frozen})
        results[frozen] = main(["--config", cfg])
        assert ("frozen linear weights stored in bf16" in capsys.readouterr().out) == (frozen != "fp32")
    for frozen in ("bf16", "auto"):
        runs = tmp_path / "runs"
        assert_same_tensors(run_adapter(runs / "frozen_fp32"), run_adapter(runs / f"frozen_{frozen}"))
        assert results[frozen]["test_acc1_final"] == results["fp32"]["test_acc1_final"]
    merged = load_file(str(tmp_path / "runs" / "frozen_bf16" / "merged.safetensors"))
    assert merged["blocks.0.attn.qkv.weight"].dtype == torch.float32


def test_torchelastic_restart_resumes_by_itself(shards, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "elastic.yaml", shards, tmp_path / "runs")
    main(["--config", cfg, "--set", "train.max_steps=5"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun --max-restarts sets in a restarted worker
    results = main(["--config", cfg])
    assert results["steps"] == 12 and results["epochs"] == 2


def test_log_lines_go_to_stdout_as_it_is_when_they_are_written(capsys):
    """A run set up inside a redirect (a notebook cell, a test's capture) keeps logging after the
    redirect's stream is closed: to the stdout of the moment, with no "--- Logging error ---"."""
    import contextlib
    import io
    import logging

    from rlrr.run import log_to_stdout
    inside = io.StringIO()
    with contextlib.redirect_stdout(inside):
        log_to_stdout(rank=0)
        logging.getLogger("rlrr").info("inside the redirect")
        assert inside.getvalue().endswith("inside the redirect\n")
    inside.close()
    logging.getLogger("rlrr").info("after it")
    out, err = capsys.readouterr()
    assert out.endswith("after it\n") and "inside" not in out and err == ""


def test_the_watchdog_is_rearmed_once_a_tenth_of_its_time_has_passed(monkeypatch):
    """Arming faulthandler's watchdog starts a thread (0.17 ms of host time): not at every batch, but once
    a tenth of train.watchdog_s (at most a second) has passed since the last arming, so it still fires
    at least 0.9 x watchdog_s after the last batch. Off cancels it."""
    import types

    from rlrr import run as run_module
    armed, now = [], [100.0]
    monkeypatch.setattr(run_module.faulthandler, "dump_traceback_later", lambda s, **kw: armed.append(s))
    monkeypatch.setattr(run_module.faulthandler, "cancel_dump_traceback_later", lambda: armed.append("off"))
    monkeypatch.setattr(run_module.time, "monotonic", lambda: now[0])
    run = types.SimpleNamespace(cfg=load_config(None, ["data.shards=x", "train.watchdog_s=6"]),
                                watchdog_armed=-float("inf"))
    for t in (100.0, 100.3, 100.55, 100.65, 100.7, 101.3):
        now[0] = t
        run_module.watchdog(run)
    assert armed == [6.0, 6.0, 6.0]  # at 100.0, 100.65 and 101.3 (0.6 s apart at least)
    run_module.watchdog(run, off=True)
    run_module.watchdog(run)
    assert armed[-2:] == ["off", 6.0]  # armed again at once after being cancelled
