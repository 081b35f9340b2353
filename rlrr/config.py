"""One typed schema for training runs: YAML (with ``base:`` inheritance) -> command-line ``--set
key=value`` overrides -> validated dataclasses. Allowed values are the ``Literal`` types of the
fields; code below this module trusts them. Errors are one line naming the file, key and what was
expected (rlrr.config_types); an unknown key suggests the closest valid ones, a renamed key names its
new name."""
import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

import yaml

from .atomic import write_text_atomic
from .config_types import (
    ConfigError,
    Count,
    DecodeOn,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Range,
    Rate,
    RecipeName,
    Stats,
    check_dataclass,
    check_value,
)
from .layers.variants import LINEAR_TARGETS, Form, Init, Kernel, Sides, variant_problem

Method = Literal["rlrr", "linear", "full", "bitfit", "ssf", "lora"]  # rlrr.model.METHODS: one builder per name
DropPathMode = Literal["dropout", "stochastic_depth"]
Precision = Literal["fp32", "bf16", "fp16"]
FrozenDtype = Literal["auto", "fp32", "bf16"]  # frozen_storage resolves "auto"
EngineName = Literal["ddp", "deepspeed"]  # rlrr.engine.ENGINES holds one class per name
ZeroStage = Literal[0, 1, 2, 3]
NonFinite = Literal["skip", "stop"]
CompileScope = Literal["auto", "blocks", "model"]  # rlrr.compile.compile_plan


def frozen_storage(frozen_dtype: str, precision: str, engine: str = "ddp") -> str:
    """train.frozen_dtype resolved to "fp32" or "bf16". "auto" stores the frozen linear weights in bf16 where the
    matmuls run in bf16 (train.precision bf16) under the DDP engine: autocast would cast W' to bf16 anyway, W' is
    still formed in fp32 from the stored W, and the weights take half the memory (DeepSpeed's bf16 holds the
    whole module in bf16 itself). fp32 otherwise."""
    if frozen_dtype != "auto":
        return frozen_dtype
    return "bf16" if precision == "bf16" and engine == "ddp" else "fp32"


@dataclass
class LoraConfig:
    r: PositiveInt = 8
    alpha: PositiveFloat = 8.0
    dropout: Rate = 0.0
    targets: list = field(default_factory=lambda: ["qkv"])  # timm linear names (qkv, proj, fc1, fc2)


@dataclass
class RLRRConfig:
    """The method's options (docs/method.md); ``model.rlrr`` in a run config.

    init: "official" (the reference's random start, W' != W at step 0), "identity" (W' = W and SSF =
        identity at step 0, so features equal the pre-trained backbone's), or "auto" (the default): the
        reference's start on ViT, Swin and ordinary convolutions, identity on convolutions whose small
        fan-in would let it scale weights by more than 2x or flip them (depthwise ones, say).
    split_qkv: one input-side vector per q/k/v chunk of the fused qkv layer. None follows the
        reference: True on ViT (separate q, k, v layers there), False on Swin (fused there).
    ssf: add the SSF scale/shift after the norms (part of RLRR; off only for ablations).
    rank, sides, form: the paper's ablations (rlrr.layers): rank r of S_out S_in; "both" sides or
        one ("out": rows, "in": columns, rank 1 only); "residual" W*(1+D), "plain" W*D, "additive" W+D.
    targets: the linears to adapt by their last name (qkv, proj, fc1, fc2, reduction); None: all of
        them (on CNNs: every plain conv).
    """
    init: Init = "auto"
    split_qkv: Optional[bool] = None
    ssf: bool = True
    rank: PositiveInt = 1
    sides: Sides = "both"
    form: Form = "residual"
    targets: Optional[list] = None

    def __post_init__(self):  # the types; how rank, sides and targets combine: check_rlrr_variant
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        check_dataclass(self, "RLRRConfig")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"  # a timm ViT or Swin
    pretrained: Optional[str] = None  # local .npz / .safetensors / .pth
    img_size: PositiveInt = 224
    method: Method = "rlrr"  # rlrr | linear (head only) | full (every weight): docs/method.md
    rlrr: RLRRConfig = field(default_factory=RLRRConfig)  # method rlrr: init, split_qkv, ssf, rank, sides, ...
    lora: LoraConfig = field(default_factory=LoraConfig)  # method lora only
    drop_path: Rate = 0.0
    drop_path_mode: DropPathMode = "dropout"  # dropout (the reference) | stochastic_depth (timm)
    grad_checkpointing: bool = False
    fused_attn: bool = True  # SDPA in every attention module (Swin too); false: the explicit softmax
    kernel: Kernel = "auto"  # RLRR linears: auto (Triton on CUDA, torch ops on CPU and when compiled) | triton | torch
    timm_kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    shards: str = ""  # folder with manifest.json (tools/make_shards.py): a path, http(s):// URL, or pipe: command
    num_classes: Optional[PositiveInt] = None  # if set, must equal the manifest's class count
    train_split: str = "train800val200"
    val_split: Optional[str] = None  # selection split; null: no selection
    test_split: str = "test"
    recipe: RecipeName = "vtab"  # vtab: resize | fgvc: resize 256, crop 224
    flip: bool = False  # random horizontal flip in training (the FGVC configs set it, as the reference does)
    stats: Stats = "half"  # half (mean = std = 0.5, the reference) | imagenet
    in_memory: Optional[bool] = None  # null: in memory when a split has at most in_memory_max samples
    in_memory_max: Count = 5000
    workers: Count = 2  # loader processes per rank (0: load in the training process)
    # streamed splits: workers decode, resize and augment (CPU) | device: workers pass the files still encoded,
    # the training process decodes each batch on its device (nvJPEG on a GPU; PNGs on the CPU) and augments there
    decode: DecodeOn = "workers"
    verify: Optional[bool] = None  # check the shards' sha256 before training; null: when they are <= 2 GiB
    eval_batch_size_per_rank: PositiveInt = 64  # evaluation batch on each rank (train.batch_size is global)
    # remote shards (http(s):// or pipe:): attempts after a failed, stalled or sha256-mismatched read, with
    # waits of retry_backoff_s doubling each time; a read stalls after read_timeout_s without a byte
    retries: Count = 3
    read_timeout_s: PositiveFloat = 60.0
    retry_backoff_s: NonNegativeFloat = 1.0
    cache_dir: Optional[str] = None  # remote shards kept here by sha256, fetched once per node; null: no cache


@dataclass
class TrainConfig:
    epochs: PositiveInt = 100
    warmup_epochs: Count = 10
    batch_size: PositiveInt = 32  # global: per-rank batch = batch_size / (world size * grad_accum)
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    warmup_lr: NonNegativeFloat = 1e-7
    min_lr: NonNegativeFloat = 1e-8
    weight_decay: NonNegativeFloat = 5e-5
    clip_grad: Optional[PositiveFloat] = None  # max global gradient norm; null: no clipping
    nonfinite: NonFinite = "skip"  # a non-finite loss or gradient: drop the step (skip) or stop the run
    nonfinite_max_in_a_row: PositiveInt = 10  # skip: stop after more than this many dropped steps in a row
    precision: Precision = "fp32"
    frozen_dtype: FrozenDtype = "auto"  # how frozen linear weights are stored: bf16 with bf16 matmuls (DDP), else fp32
    engine: EngineName = "ddp"
    zero_stage: ZeroStage = 2
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON's tuning knobs; it may not contradict this config
    seed: Count = 42
    eval_every: PositiveInt = 1  # epochs
    save_every_epochs: PositiveInt = 1
    save_every_steps: Count = 0  # 0: only at epoch ends
    max_steps: Count = 0  # stop after this many optimizer steps (0: run all epochs); for tests and smoke runs
    log_every: PositiveInt = 10
    profile_steps: Count = 0  # after the warm-up, profile this many steps on rank 0 (<run>/profile; results.json)
    dist_timeout_s: Annotated[float, Range(10)] = 900.0  # bounds process-group start-up and every collective
    watchdog_s: Annotated[float, Range(0)] = 1200.0  # no batch done for this long: print stacks, exit 1 (0: off)
    compile: Optional[bool] = None  # torch.compile (see compile_scope); null: on CUDA only
    cuda_graphs: Optional[bool] = None  # replay compiled steps as CUDA graphs; null: see rlrr/compile.py
    compile_scope: CompileScope = "auto"  # the whole model where steps replay as CUDA graphs, else each block
    compile_cache: Optional[str] = None  # inductor/Triton cache; null: <output_dir>/compile_cache, shared by restarts


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # default: the config file's name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


RENAMED = {"data.eval_batch_size": "data.eval_batch_size_per_rank",  # old key -> new key
           **{f"model.{f.name}": f"model.rlrr.{f.name}" for f in dataclasses.fields(RLRRConfig)}}


def flat_dict(d: dict, prefix: str = "") -> dict:
    """A config dict with dotted keys (``{"model.rlrr.rank": 1, ...}``); timm_kwargs stays one value."""
    out = {}
    for k, v in d.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "timm_kwargs" else {prefix + k: v})
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str, _seen=()) -> dict:
    """A YAML file with its ``base:`` chain merged in (paths relative to the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"{path}: 'base' inheritance loops back to itself")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, load_yaml(os.path.join(os.path.dirname(path), b), _seen + (os.path.abspath(path),)))
    return _merge(merged, data)


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {}
    for k, v in data.items():
        if prefix + k in RENAMED:
            raise ConfigError(f"{source}: {prefix}{k} was renamed to {RENAMED[prefix + k]}")
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else \
                f"; valid keys: {', '.join(prefix + f for f in fields)}"
            raise ConfigError(f"{source}: unknown key {prefix}{k}{hint}")
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], v, f"{prefix}{k}.", source)
        else:
            kwargs[k] = check_value(v, hints[k], prefix + k, source)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=0.003")
    return key.split("."), yaml.safe_load(raw) if raw else None


def apply_override(data: dict, text: str) -> None:
    """``key.sub=value`` written into the nested mapping ``data`` (sections made as needed)."""
    keys, value = parse_override(text)
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    data = load_yaml(path) if path else {}
    for text in overrides:
        apply_override(data, text)
    source = path or "--set"
    cfg = _build(RunConfig, data, "", source)
    if cfg.run_name is None and path:
        cfg.run_name = os.path.splitext(os.path.basename(path))[0]
    _check(cfg, source)
    return cfg


def check_rlrr_variant(r: RLRRConfig, source: str, prefix: str = "") -> None:
    """The checks the types alone cannot make (rlrr.layers.variants), as one ConfigError naming the key."""
    problem = variant_problem(r.rank, r.sides, r.targets, prefix)
    if problem:
        raise ConfigError(f"{source}: {problem}")


def _check(cfg: RunConfig, source: str) -> None:
    m = cfg.model
    check_rlrr_variant(m.rlrr, source, prefix="model.rlrr.")
    bad = [t for t in m.lora.targets if t not in LINEAR_TARGETS[:4]] if isinstance(m.lora.targets, list) else [0]
    if bad or not m.lora.targets:
        raise ConfigError(f"{source}: model.lora.targets = {m.lora.targets!r}: expected a non-empty list of "
                          f"{', '.join(LINEAR_TARGETS[:4])}")
    if not cfg.data.shards:
        raise ConfigError(f"{source}: data.shards is required (a folder made by tools/make_shards.py)")
    t = cfg.train
    if t.warmup_epochs > t.epochs:
        raise ConfigError(f"{source}: train.warmup_epochs = {t.warmup_epochs}: expected 0..train.epochs ({t.epochs})")
    if t.frozen_dtype == "bf16" and t.precision != "bf16":
        raise ConfigError(f"{source}: train.frozen_dtype = bf16 needs train.precision = bf16 "
                          f"(got {t.precision}): only bf16 matmuls leave the model unchanged")
    name = cfg.run_name
    if name is not None and (not name or os.path.isabs(name) or os.path.normpath(name) != name
                             or name in (".", "..") or os.sep in name):
        raise ConfigError(f"{source}: run_name = {name!r}: expected a plain folder name (no path separators or '..')")


def save_config(cfg: RunConfig, path: str) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
