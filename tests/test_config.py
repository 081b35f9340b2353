"""rlrr/config.py: the run schema, base inheritance, --set overrides, one-line errors, and the shipped configs."""
import pytest
import yaml

from rlrr.config import ConfigError, RunConfig, frozen_storage, load_config, save_config
from rlrr.config_types import check_value, choices

from helpers import ROOT


def _error(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, ["data.shards=x", *overrides])
    return str(e.value)


@pytest.mark.parametrize("override,message", [
    ("train.lrr=0.1", "unknown key train.lrr; did you mean train.lr"),
    ("train.epochs=ten", "train.epochs = 'ten': expected int"),
    ("train.precision=fp8", "train.precision = 'fp8': expected one of fp32, bf16, fp16"),
    ("train.zero_stage=true", "train.zero_stage = True: expected one of 0, 1, 2, 3"),  # not taken for 1
    ("model.method=lora2", "model.method = 'lora2': expected one of rlrr, linear, full"),
    ("model.rlrr.init=zeros", "model.rlrr.init = 'zeros': expected one of auto, official, identity"),
    ("data.stats=clip", "data.stats = 'clip': expected one of half, imagenet"),
    ("data.recipe=inat", "data.recipe = 'inat': expected one of vtab, fgvc"),
    ("modle.name=x", "unknown key modle; did you mean model"),
    ("train.frozen_dtype=bf16", "train.frozen_dtype = bf16 needs train.precision = bf16 (got fp32)"),
    ("data.eval_batch_size=32", "data.eval_batch_size was renamed to data.eval_batch_size_per_rank"),
    ("model.drop_path=1.5", "model.drop_path = 1.5: expected a number in [0, 1)"),
    ("train.eval_every=0", "train.eval_every = 0: expected an integer >= 1"),
    ("train.clip_grad=-1", "train.clip_grad = -1.0: expected a number > 0"),
    ("train.max_steps=-5", "train.max_steps = -5: expected an integer >= 0"),
])
def test_errors_name_the_key_value_and_what_was_expected(override, message):
    text = _error(override)
    assert message in text and "\n" not in text, text


def test_numbers_are_read_as_a_user_means_them(tmp_path):
    cfg = load_config(None, ["data.shards=x", "train.lr=2e-3", "train.weight_decay=1e-4", "train.clip_grad=1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.clip_grad) == (2e-3, 1e-4, 1.0)
    (tmp_path / "c.yaml").write_text("data: {shards: s}\ntrain: {lr: 5e-4}\n")  # YAML 1.1 reads 5e-4 as a string
    assert load_config(str(tmp_path / "c.yaml")).train.lr == 5e-4


def test_renamed_key_in_a_file_names_the_file_and_the_new_key(tmp_path):
    (tmp_path / "old.yaml").write_text("data: {shards: s, eval_batch_size: 100}\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: data\.eval_batch_size was renamed to "
                                          r"data\.eval_batch_size_per_rank"):
        load_config(str(tmp_path / "old.yaml"))


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {shards: s, flip: true}\ntrain: {lr: 0.001, epochs: 100}\n")
    (tmp_path / "task.yaml").write_text("base: base.yaml\ntrain: {lr: 0.003}\n")
    cfg = load_config(str(tmp_path / "task.yaml"), ["train.weight_decay=0.05", "model.rlrr.split_qkv=null",
                                                    "model.rlrr.ssf=false"])
    assert cfg.train.lr == 0.003 and cfg.train.epochs == 100 and cfg.data.flip is True
    assert cfg.train.weight_decay == 0.05 and cfg.run_name == "task" and cfg.model.rlrr.ssf is False
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.shards=x", "train.zero_stage=3", "model.method=linear", "run_name=r"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg and again.digest() == cfg.digest() and isinstance(again, RunConfig)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["eval_batch_size_per_rank"] == 64


def test_choices_come_from_the_field_types():
    from typing import Literal, Optional
    assert choices(Literal["a", "b"]) == ("a", "b") and choices(Optional[Literal[1, 2]]) == (1, 2)
    assert choices(int) is None
    assert check_value(3, float, "k", "s") == 3.0 and isinstance(check_value(3, float, "k", "s"), float)
    with pytest.raises(ConfigError, match="s: k = 1: expected one of True"):
        check_value(1, Literal[True], "k", "s")


@pytest.mark.parametrize("frozen,precision,engine,stored", [
    ("auto", "bf16", "ddp", "bf16"),  # the default: bf16 matmuls, the weights in bf16
    ("auto", "fp32", "ddp", "fp32"), ("auto", "fp16", "ddp", "fp32"),
    ("auto", "bf16", "deepspeed", "fp32"),  # DeepSpeed's bf16 casts the whole module itself
    ("fp32", "bf16", "ddp", "fp32"), ("bf16", "bf16", "deepspeed", "bf16"),  # asked for: kept
])
def test_frozen_weights_are_stored_in_bf16_by_default_only_with_bf16_matmuls(frozen, precision, engine, stored):
    assert frozen_storage(frozen, precision, engine) == stored
    assert load_config(None, ["data.shards=x"]).train.frozen_dtype == "auto"


# docs/method.md, section 6: task -> (classes, lr, weight decay, drop path, flip)
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
        assert (cfg.data.recipe, cfg.data.train_split, cfg.model.name) == \
            ("vtab", "train800val200", "vit_base_patch16_224")
        assert cfg.run_name == task and cfg.model.drop_path_mode == "dropout"
    for name, (classes, lr, dp) in FGVC.items():
        cfg = load_config(str(ROOT / "configs" / "fgvc" / f"{name}.yaml"))
        assert (cfg.data.num_classes, cfg.train.lr, cfg.model.drop_path, cfg.train.weight_decay) == \
            (classes, lr, dp, 5e-2)
        assert cfg.data.recipe == "fgvc" and cfg.data.train_split == "trainval" and cfg.data.flip is True
    models = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224",
              "vit_h14": "vit_huge_patch14_224", "swin_b": "swin_base_patch4_window7_224"}
    for file, name in models.items():
        cfg = load_config(str(ROOT / "configs" / "models" / f"{file}.yaml"), ["data.shards=x"])
        assert cfg.model.name == name and cfg.model.pretrained.startswith("pretrained/")
    demo = load_config(str(ROOT / "configs" / "demo.yaml"))
    assert demo.data.eval_batch_size_per_rank == 100 and demo.model.name == "vit_small_patch14_dinov2"


def test_every_shipped_config_loads():
    for path in sorted(ROOT.glob("configs/**/*.yaml")):
        overrides = [] if "shards" in path.read_text() or path.name == "demo.yaml" else ["data.shards=x"]
        cfg = load_config(str(path), overrides)
        expected = path.stem if path.parent.name == "methods" else "rlrr"  # configs/methods/<method>.yaml
        assert cfg.model.method == expected, path
