"""Every engine path trains the same model: the engine equivalence matrix, through launch/train.py.

Reference: one process, DDP engine, grad_accum 1. Every cell (2 processes: DDP, DeepSpeed ZeRO 0-3)
uses the same global batch, fp32 and the same data order (in memory, no flip, no drop-path), so its
adapter must equal the reference's up to fp32 rounding. The factors are engine (5), grad_accum (1, 2),
clip_grad (off, on) and model.grad_checkpointing (off, on); the ten cells below hold every value of
every factor and every pair of values of every two factors (a covering array of strength 2: the full
product would be 40 runs). Two more cells compile the model by blocks (train.compile, inductor's C++ backend
here), with DDP (accumulating, clipped, checkpointed) and DeepSpeed ZeRO-2: the same model within the same
tolerance.

Tolerance: |cell - reference| <= 1e-4 on every adapter entry after 6 AdamW steps at lr 1e-2 (the
entries move by up to ~6e-2; rounding differences between reduction orders stay below 3e-5). One
exception: the key third of each qkv bias shift. Softmax ignores a constant added to every key, so
that bias has an exactly zero gradient; Adam divides rounding noise by its own size and moves those
entries by up to lr per step in a direction set by the noise. They are left out of the comparison.
"""
import json

import pytest
from safetensors.torch import load_file

from helpers import comparable_adapter as comparable
from helpers import entry_point, train_many, write_config

pytestmark = pytest.mark.integration

ATOL = 1e-4
CLIP = 0.05  # below the tiny model's gradient norms, so clipping changes every step
#       name         engine     stage accum clip  checkpointing
CELLS = [("ddp-a1",  "ddp",       None, 1, False, False),
         ("ddp-a2",  "ddp",       None, 2, True,  True),
         ("z0-a1",   "deepspeed", 0,    1, True,  False),
         ("z0-a2",   "deepspeed", 0,    2, False, True),
         ("z1-a1",   "deepspeed", 1,    1, False, True),
         ("z1-a2",   "deepspeed", 1,    2, True,  False),
         ("z2-a1",   "deepspeed", 2,    1, True,  True),
         ("z2-a2",   "deepspeed", 2,    2, False, False),
         ("z3-a1",   "deepspeed", 3,    1, False, False),
         ("z3-a2",   "deepspeed", 3,    2, True,  True)]
COMPILED_CELLS = [("ddp-compiled", "ddp", None, 2, True, True),  # train.compile=true: by blocks
                  ("z2-compiled", "deepspeed", 2, 1, False, False)]


def test_the_cells_cover_every_pair_of_factor_values():
    factors = [[c[1] + str(c[2]) for c in CELLS], [c[3] for c in CELLS], [c[4] for c in CELLS], [c[5] for c in CELLS]]
    for i in range(len(factors)):
        for j in range(i + 1, len(factors)):
            pairs = set(zip(factors[i], factors[j]))
            assert len(pairs) == len(set(factors[i])) * len(set(factors[j])), (i, j)


SHORT_WINDOW = ["train.batch_size=10", "train.grad_accum=5", "train.engine=deepspeed", "train.zero_stage=2"]


def _cell_overrides(engine, stage, accum, clip, ckpt) -> list[str]:
    overrides = [f"train.engine={engine}", f"train.grad_accum={accum}", f"model.grad_checkpointing={ckpt}"]
    overrides += [f"train.zero_stage={stage}"] if stage is not None else []
    return overrides + ([f"train.clip_grad={CLIP}"] if clip else [])


@pytest.fixture(scope="module")
def matrix(tiny_shards, tmp_path_factory):
    """name -> (adapter, results) of every run: the two one-process references through the entry point in
    this process, and every 2-process run through it in one torchrun launch (tests/train_many.py: the
    runs one after another in the same two processes, each as a fresh process would run it)."""
    tmp = tmp_path_factory.mktemp("matrix")
    cfg = write_config(tmp / "m.yaml", tiny_shards, tmp / "runs", model={"drop_path": 0.0},
                       data={"flip": False, "in_memory": True},
                       train={"epochs": 1, "warmup_epochs": 0, "lr": 0.01, "eval_every": 100})

    def argv(name, *overrides):
        return ["--config", cfg, "--set", f"run_name={name}", *overrides]
    for clip in (False, True):
        entry_point().main(argv(f"ref-clip{clip}", *([f"train.clip_grad={CLIP}"] if clip else [])))
    runs = {c[0]: argv(c[0], *_cell_overrides(*c[1:])) for c in CELLS}
    runs.update({c[0]: argv(c[0], *_cell_overrides(*c[1:]), "train.compile=true") for c in COMPILED_CELLS})
    runs["short-z2"] = argv("short-z2", *SHORT_WINDOW)
    errors = {name: o["error"] for name, o in train_many(runs, tmp, all_must_finish=False)[0].items() if "error" in o}

    def run(name):
        assert name not in errors, f"{name}: {errors[name]}"
        run_dir = tmp / "runs" / name
        return load_file(str(run_dir / "adapter.safetensors")), json.loads((run_dir / "results.json").read_text())
    return run


@pytest.fixture(scope="module")
def references(matrix):
    return {clip: matrix(f"ref-clip{clip}") for clip in (False, True)}


def test_clipping_is_active_in_the_reference(references):
    plain, clipped = comparable(references[False][0]), comparable(references[True][0])
    assert max((plain[k] - clipped[k]).abs().max().item() for k in plain) > 100 * ATOL


@pytest.mark.parametrize("name,engine,stage,accum,clip,ckpt", CELLS + COMPILED_CELLS,
                         ids=[c[0] for c in CELLS + COMPILED_CELLS])
def test_every_engine_cell_trains_the_reference_model(matrix, references, name, engine, stage, accum, clip, ckpt):
    adapter, results = matrix(name)
    ref_adapter, ref_results = references[clip]
    assert results["world_size"] == 2
    assert results["compile"]["compile"] == name.endswith("-compiled") and results["compile"]["scope"] == "blocks"
    # 24 samples, global batch 4: 6 optimizer steps, counted by the loop and by Adam itself
    assert results["steps"] == ref_results["steps"] == 6
    assert results["optimizer_updates"] == ref_results["optimizer_updates"] == 6
    got, want = comparable(adapter), comparable(ref_adapter)
    assert got.keys() == want.keys()
    worst = max(((got[k] - want[k]).abs().max().item(), k) for k in want)
    assert worst[0] <= ATOL, f"{name}: {worst[1]} differs by {worst[0]:.2e} from the one-process DDP reference"


def test_a_short_last_window_is_one_update_under_deepspeed(matrix):
    """24 samples, global batch 10 = 2 ranks x 1 x grad_accum 5: 12 micro-batches per rank, so the
    epoch ends with a window of 2. DeepSpeed must close it where the loop does: 3 updates (counting
    micro-batches itself, it would make 2 and carry the last window's gradients into the next epoch)."""
    _, results = matrix("short-z2")
    assert results["steps"] == results["optimizer_updates"] == 3
