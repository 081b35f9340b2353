"""Malformed configs and overrides through the command-line entry (rlrr.train.cli, which launch/train.py
calls): every one exits 2 with exactly one line on stderr naming what is wrong, and nothing is written."""
import dataclasses
import typing

import pytest

from rlrr.config import DataConfig, LoraConfig, ModelConfig, RLRRConfig, TrainConfig
from rlrr.config_types import Range, choices

from helpers import ROOT, entry_point, write_config

cli = entry_point().cli

SECTIONS = {"model": ModelConfig, "model.rlrr": RLRRConfig, "model.lora": LoraConfig, "data": DataConfig,
            "train": TrainConfig}


def _field_cases() -> list[tuple[str, str]]:
    """(override, expected text) for every typed field: out of range, wrong type, not a choice."""
    cases = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            key, hint = f"{section}.{f.name}", hints[f.name]
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
                if typing.get_origin(hint) is typing.Union else hint
            if typing.get_origin(base) is typing.Annotated:
                kind, bounds = typing.get_args(base)
                assert isinstance(bounds, Range)
                cases.append((f"{key}={bounds.low - 1}", f"{key} = {kind(bounds.low - 1)!r}: expected"))
                cases.append((f"{key}=[1, 2]", f"{key} = [1, 2]: expected {kind.__name__}"))
            elif choices(base):
                cases.append((f"{key}=bogus", f"{key} = 'bogus': expected one of"))
            elif base is bool:
                cases.append((f"{key}=maybe", f"{key} = 'maybe': expected bool"))
            elif base is str:
                cases.append((f"{key}=[1]", f"{key} = [1]: expected str"))
    return cases


FIELD_CASES = _field_cases()
OTHER_CASES = [
    ("train.lrr=0.1", "unknown key train.lrr; did you mean train.lr"),
    ("modle.name=x", "unknown key modle; did you mean model"),
    ("train=3", "train must be a mapping"),
    ("train.lr", "--set 'train.lr': expected key=value"),
    ("data.eval_batch_size=8", "data.eval_batch_size was renamed to data.eval_batch_size_per_rank"),
    ("model.rank=2", "model.rank was renamed to model.rlrr.rank"),
    ("train.lr=.nan", "train.lr = nan: expected a number > 0"),
    ("train.lr=.inf", "train.lr = inf: expected a number > 0"),
    ("train.warmup_epochs=3", "train.warmup_epochs = 3: expected 0..train.epochs (2)"),
    ("train.frozen_dtype=bf16", "train.frozen_dtype = bf16 needs train.precision = bf16"),
    ("train.precision=fp16", "train.precision = fp16 needs a CUDA device"),
    ("run_name=../elsewhere", "run_name = '../elsewhere': expected a plain folder name"),
    ("run_name=/tmp/abs", "run_name = '/tmp/abs': expected a plain folder name"),
    ("model.name=vit_bse_patch16_224", "model.name = 'vit_bse_patch16_224': not a timm model; did you mean"),
    ("model.pretrained=/nonexistent/ViT-B_16.npz", "model.pretrained = '/nonexistent/ViT-B_16.npz': file not found"),
    ("train.deepspeed_config=/nonexistent/ds.json", "train.deepspeed_config = '/nonexistent/ds.json': file not found"),
    ("data.shards=/nonexistent/shards", "shard manifest not found: /nonexistent/shards/manifest.json"),
    ("data.test_split=tset", "no split 'tset'; splits are"),
    ("data.val_split=val", "no split 'val'; splits are"),
    ("data.num_classes=7", "data.num_classes = 7 but"),
    ("train.grad_accum=3", "train.batch_size = 4 is not divisible by world size 1 x train.grad_accum 3"),
]


@pytest.mark.parametrize("override,expected", FIELD_CASES + OTHER_CASES, ids=[c[0] for c in FIELD_CASES + OTHER_CASES])
def test_every_malformed_override_is_one_line_and_exit_2(override, expected, tiny_shards, tmp_path, capsys):
    cfg = write_config(tmp_path / "fuzz.yaml", tiny_shards, tmp_path / "runs")
    code = cli(["--config", cfg, "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("train: error: "), err
    assert expected in err, err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_at_least_fifty_cases():
    assert len(FIELD_CASES) + len(OTHER_CASES) >= 50


@pytest.mark.parametrize("text,expected", [
    ("train: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("base: fuzz.yaml\n", "'base' inheritance loops back to itself"),
    ("base: missing.yaml\n", "config file not found"),
    ("model: 3\n", "model must be a mapping"),
])
def test_malformed_files_are_one_line_and_exit_2(text, expected, tmp_path, capsys):
    (tmp_path / "fuzz.yaml").write_text(text)
    assert cli(["--config", str(tmp_path / "fuzz.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_a_deepspeed_json_contradicting_the_run_config_is_one_line_and_exit_2(tiny_shards, tmp_path, capsys):
    cfg = write_config(tmp_path / "ds.yaml", tiny_shards, tmp_path / "runs")
    path = ROOT / "configs" / "deepspeed" / "zero3_bf16.json"
    assert cli(["--config", cfg, "--set", "train.engine=deepspeed", f"train.deepspeed_config={path}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"train: error: {path}: bf16.enabled = true conflicts with train.precision = fp32; make them "
                   "agree or leave the key out of the JSON (the run config sets it)\n")
    assert not (tmp_path / "runs").exists()
