"""launch/train.py and rlrr.train.main end to end on a tiny timm ViT and generated shards (CPU)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlrr.config import ConfigError, load_config
from rlrr.data.loader import Manifest, SplitLoader
from rlrr.data.transforms import Recipe, normalize
from rlrr.train import build_model, main
from rlrr.optim import param_groups
from test_data import tiny_vtab_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_vtab_shards(tmp_path_factory.mktemp("train"), n_train=24, n_val=8, n_test=13, shard_size=4)


def write_config(path: Path, shards: str, out: Path, **sections) -> str:
    cfg = {"model": {"name": "test_vit", "img_size": 32, "drop_path": 0.1},
           "data": {"shards": shards, "train_split": "train800", "val_split": "val200", "flip": True, "workers": 1},
           "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 4, "lr": 0.01, "log_every": 1},
           "output_dir": str(out)}
    for k, v in sections.items():
        cfg[k].update(v)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_single_process_run_writes_everything(shards, tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs")
    results = main(["--config", cfg])
    run = tmp_path / "runs" / "tiny"
    assert sorted(os.listdir(run)) == ["adapter.safetensors", "checkpoints", "config.yaml", "merged.safetensors",
                                       "results.json", "tensorboard"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["test_acc1_final"] == results["test_acc1_final"]
    for key in ("test_acc1_final", "test_acc1_at_best_val", "test_acc1_best_over_epochs"):
        assert 0.0 <= saved[key] <= 100.0
        assert round(saved[key] * 13 / 100) * 100 / 13 == pytest.approx(saved[key], abs=1e-3)  # k of 13 test images
    assert saved["epochs"] == 2 and saved["steps"] == 12 and saved["trainable_params"] > 0 and len(saved["config_hash"]) == 12
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
    a = load_file(str(tmp_path / "runs" / "straight" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "runs" / "halves" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "runs" / "halves" / "results.json").read_text())
    assert ra["history"] == rb["history"]


def _train_cmd(*args, nproc=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    return launcher + [str(ROOT / "launch" / "train.py"), *args]


def test_ddp_two_processes(shards, tmp_path):
    """Also with bf16 autocast and bf16-stored frozen weights (DDP broadcasts those at start)."""
    cfg = write_config(tmp_path / "ddp.yaml", shards, tmp_path / "runs",
                       train={"precision": "bf16", "frozen_dtype": "bf16"})
    res = subprocess.run(_train_cmd("--config", cfg, nproc=2), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "frozen linear weights stored in bf16" in res.stdout
    results = json.loads((tmp_path / "runs" / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 12  # global batch 4 = 2 ranks x 2
    assert results["history"][-1]["test_acc1"] == results["test_acc1_final"]


def test_sigterm_saves_a_resumable_checkpoint(shards, tmp_path):
    cfg = write_config(tmp_path / "long.yaml", shards, tmp_path / "runs", train={"epochs": 400, "eval_every": 1000})
    proc = subprocess.Popen(_train_cmd("--config", cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 2/400" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "resume with --resume latest" in out
    state = torch.load(tmp_path / "runs" / "long" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert 2 <= state["epoch"] < 400 and state["global_step"] >= 12
    res = subprocess.run(_train_cmd("--config", cfg, "--resume", "latest", "--set", "train.epochs=4"),
                         capture_output=True, text=True, timeout=300)
    # the resumed run honours its new (shorter) schedule length and finishes
    assert res.returncode == 0 and f"resumed {tmp_path / 'runs' / 'long'}" in res.stdout, res.stderr[-2000:]


def test_config_errors_are_single_clear_lines(shards, tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", shards, tmp_path / "runs")
    cases = [
        (["--set", "train.lrr=0.1"], "unknown key train.lrr; did you mean train.lr"),
        (["--set", "train.epochs=ten"], "train.epochs = 'ten': expected int"),
        (["--set", "train.precision=fp8"], "train.precision = 'fp8': expected one of fp32, bf16, fp16"),
        (["--set", "modle.name=x"], "unknown key modle; did you mean model"),
        (["--set", "train.frozen_dtype=bf16"], "train.frozen_dtype = bf16 needs train.precision = bf16 (got fp32)"),
        (["--set", "train.batch_size=5"], "train.batch_size = 5 is not divisible by world size 1 x train.grad_accum 2"),
    ]
    for extra, message in cases:
        if "batch_size" in extra[1]:
            extra = extra + ["train.grad_accum=2"]
        res = subprocess.run(_train_cmd("--config", cfg, *extra), capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (extra, res.stderr[-500:])
        assert message in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {shards: s, flip: true}\ntrain: {lr: 0.001, epochs: 100}\n")
    (tmp_path / "task.yaml").write_text("base: base.yaml\ntrain: {lr: 0.003}\n")
    cfg = load_config(str(tmp_path / "task.yaml"), ["train.weight_decay=0.05", "model.split_qkv=null"])
    assert cfg.train.lr == 0.003 and cfg.train.epochs == 100 and cfg.data.flip is True
    assert cfg.train.weight_decay == 0.05 and cfg.run_name == "task"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_drop_path_modes_and_weight_decay_groups(tmp_path):
    cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.drop_path=0.2"])
    model = build_model(cfg, num_classes=3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert len(drops) == 2 * 5 and max(m.p for m in drops) == pytest.approx(0.2)  # linear 0 -> 0.2 over 6 blocks
    cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.drop_path=0.2",
                             "model.drop_path_mode=stochastic_depth"])
    assert any(isinstance(m, timm.layers.DropPath) for m in build_model(cfg, 3).modules())
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert {"blocks.0.attn.qkv.scale_in", "blocks.0.attn.qkv.scale_out", "patch_embed.proj.ssf_scale", "head.weight"} <= decay
    assert {"blocks.0.attn.qkv.bias_shift", "blocks.0.norm1.ssf_scale", "norm.ssf_shift", "head.bias"} <= no_decay
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


# RLRR.md section 6: task -> (classes, lr, weight decay, drop path, flip)
VTAB = {"cifar": (100, 3e-3, 5e-5, 0.1, False), "caltech101": (102, 1e-3, 5e-5, 0.1, False),
        "dtd": (47, 2e-3, 5e-5, 0.1, True), "oxford_flowers102": (102, 3e-3, 5e-2, 0.3, False),
        "oxford_iiit_pet": (37, 1e-3, 5e-5, 0.1, True), "svhn": (10, 5e-3, 5e-5, 0.3, False),
        "sun397": (397, 1e-3, 5e-5, 0.1, False), "patch_camelyon": (2, 3e-3, 5e-2, 0.3, True),
        "eurosat": (10, 1e-3, 5e-5, 0.1, True), "resisc45": (45, 3e-3, 5e-5, 0.0, False),
        "diabetic_retinopathy": (5, 5e-3, 5e-5, 0.1, True), "clevr_count": (8, 5e-3, 5e-5, 0.5, True),
        "clevr_dist": (6, 1e-2, 5e-5, 0.2, True), "dmlab": (6, 5e-3, 5e-5, 0.3, True),
        "kitti": (4, 3e-3, 5e-2, 0.3, True), "dsprites_loc": (16, 1e-2, 5e-5, 0.1, False),
        "dsprites_ori": (16, 5e-3, 5e-5, 0.1, False), "smallnorb_azi": (18, 5e-3, 5e-2, 0.3, False),
        "smallnorb_ele": (9, 1e-3, 5e-5, 0.3, True)}
FGVC = {"CUB_200_2011": (200, 3e-3, 0.1), "NABirds": (555, 5e-4, 0.3), "OxfordFlowers": (102, 3e-3, 0.2),
        "StanfordCars": (196, 3e-3, 0.2), "StanfordDogs": (120, 1e-4, 0.0)}


def test_task_configs_hold_the_reference_hyper_parameters():
    for task, (classes, lr, wd, dp, flip) in VTAB.items():
        cfg = load_config(str(ROOT / "configs" / "vtab" / f"{task}.yaml"))
        got = (cfg.data.num_classes, cfg.train.lr, cfg.train.weight_decay, cfg.model.drop_path, cfg.data.flip)
        assert got == (classes, lr, wd, dp, flip), task
        assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.batch_size) == (100, 10, 32)
        assert (cfg.data.recipe, cfg.data.train_split, cfg.model.name) == ("vtab", "train800val200", "vit_base_patch16_224")
        assert cfg.run_name == task and cfg.model.drop_path_mode == "dropout"
    for name, (classes, lr, dp) in FGVC.items():
        cfg = load_config(str(ROOT / "configs" / "fgvc" / f"{name}.yaml"))
        assert (cfg.data.num_classes, cfg.train.lr, cfg.model.drop_path, cfg.train.weight_decay) == (classes, lr, dp, 5e-2)
        assert cfg.data.recipe == "fgvc" and cfg.data.train_split == "trainval"
    models = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224",
              "vit_h14": "vit_huge_patch14_224", "swin_b": "swin_base_patch4_window7_224"}
    for file, name in models.items():
        cfg = load_config(str(ROOT / "configs" / "models" / f"{file}.yaml"), ["data.shards=x"])
        assert cfg.model.name == name and cfg.model.pretrained.startswith("pretrained/")


def test_class_count_mismatch_is_a_clear_error(shards, tmp_path):
    cfg = write_config(tmp_path / "n.yaml", shards, tmp_path / "runs", data={"num_classes": 7})
    with pytest.raises(ConfigError, match=r"data.num_classes = 7 but .*manifest.json has 4 classes"):
        main(["--config", cfg])


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter.safetensors"))


def test_deepspeed_zero2_resume_is_exact_and_zero3_bf16_runs(shards, tmp_path):
    """2 processes each: ZeRO-2 straight vs stopped + resumed (identical adapters); ZeRO-3 bf16 end to end."""
    cfg = write_config(tmp_path / "ds.yaml", shards, tmp_path / "runs", train={"engine": "deepspeed", "zero_stage": 2})
    runs = tmp_path / "runs"
    for args in (["--set", "run_name=straight"], ["--set", "run_name=halves", "train.max_steps=8"],
                 ["--set", "run_name=halves", "--resume", "latest"]):
        res = subprocess.run(_train_cmd("--config", cfg, *args, nproc=2), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (runs / "halves" / "checkpoints" / "latest").read_text().strip() == "step12"
    a, b = _adapter(runs / "straight"), _adapter(runs / "halves")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    # frozen weights never reach a DeepSpeed checkpoint: the model states hold only the trainable tensors
    states = torch.load(next((runs / "halves" / "checkpoints" / "step12").glob("*model_states.pt")),
                        map_location="cpu", weights_only=True)
    assert "blocks.0.attn.qkv.weight" not in states["module"] and "blocks.0.attn.qkv.scale_in" in states["module"]

    res = subprocess.run(_train_cmd("--config", cfg, "--set", "run_name=z3", "train.zero_stage=3",
                                    "train.precision=bf16", nproc=2), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((runs / "z3" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 12 and 0 <= results["test_acc1_final"] <= 100
    plain = timm.create_model("test_vit", num_classes=4, img_size=32)
    plain.load_state_dict(load_file(str(runs / "z3" / "merged.safetensors")), strict=True)


def test_compiled_training_matches_eager(shards, tmp_path):
    """train.compile=true (inductor on CPU here) trains to the same adapter and test accuracy as eager.
    No dropout: compiled and eager graphs draw different random numbers."""
    results = {}
    for compiled in (False, True):
        cfg = write_config(tmp_path / f"compile{int(compiled)}.yaml", shards, tmp_path / "runs",
                           model={"drop_path": 0.0}, train={"epochs": 1, "compile": compiled})
        results[compiled] = main(["--config", cfg])
    eager, comp = _adapter(tmp_path / "runs" / "compile0"), _adapter(tmp_path / "runs" / "compile1")
    assert eager.keys() == comp.keys()
    for k in eager:  # atol: the key bias's true gradient is 0, and AdamW scales its rounding noise up to ~lr
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-4)
    assert results[True]["test_acc1_final"] == results[False]["test_acc1_final"]


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
    for frozen in ("fp32", "bf16"):
        cfg = write_config(tmp_path / f"frozen_{frozen}.yaml", shards, tmp_path / "runs",
                           model={"pretrained": str(tmp_path / "rounded.safetensors")},
                           train={"epochs": 1, "precision": "bf16", "frozen_dtype": frozen})
        results[frozen] = main(["--config", cfg])
        assert ("frozen linear weights stored in bf16" in capsys.readouterr().out) == (frozen == "bf16")
    wide, narrow = _adapter(tmp_path / "runs" / "frozen_fp32"), _adapter(tmp_path / "runs" / "frozen_bf16")
    assert wide.keys() == narrow.keys() and all(torch.equal(wide[k], narrow[k]) for k in wide)
    assert results["bf16"]["test_acc1_final"] == results["fp32"]["test_acc1_final"]
    merged = load_file(str(tmp_path / "runs" / "frozen_bf16" / "merged.safetensors"))
    assert merged["blocks.0.attn.qkv.weight"].dtype == torch.float32


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 with grad_accum=2 leave the same gradients as one batch of 4."""
    from rlrr.distributed import DistInfo
    from rlrr.engine import DDPEngine
    grads = []
    for accum in (1, 2):
        cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.img_size=32",
                                 f"train.grad_accum={accum}", "train.batch_size=4"])
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=3)
        with torch.no_grad():
            model.head.weight.normal_()  # a non-zero head, so the backbone gets gradients
        engine = DDPEngine(model, cfg, DistInfo(), micro=4 // accum)
        torch.manual_seed(1)
        images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
        for chunk in range(accum):
            part = slice(chunk * 4 // accum, (chunk + 1) * 4 // accum)
            engine.backward(images[part], labels[part], last_micro=chunk == accum - 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4, msg=n)


def test_torchelastic_restart_resumes_by_itself(shards, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "elastic.yaml", shards, tmp_path / "runs")
    main(["--config", cfg, "--set", "train.max_steps=5"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun --max-restarts sets in a restarted worker
    results = main(["--config", cfg])
    assert results["steps"] == 12 and results["epochs"] == 2


def test_slurm_variables_are_the_fallback_for_rank_and_world(monkeypatch):
    from rlrr.distributed import world_from_env
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert world_from_env() == (0, 0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert world_from_env() == (5, 1, 8)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert world_from_env() == (2, 0, 4)  # torchrun's variables win
