"""rlrr/engine.py, in process: the DDP engine's accumulation and its checkpoint round trip; the DeepSpeed
config resolution."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlrr.checkpoint import CheckpointStore
from rlrr.config import ConfigError, load_config
from rlrr.distributed import DistInfo
from rlrr.engine import ENGINES, ZERO3_LIVE_DEFAULTS, DDPEngine, deepspeed_config
from rlrr.model import build_model

from helpers import ROOT


def _engine(tmp_cfg, accum=1, dtype=torch.float32):
    cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.img_size=32",
                             f"train.grad_accum={accum}", "train.batch_size=4", *tmp_cfg])
    model = build_model(cfg.model, num_classes=3, seed=0).to(dtype)
    with torch.no_grad():
        # a non-zero head, so the backbone gets gradients
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    return model, DDPEngine(model, cfg, DistInfo())


def test_every_engine_name_has_a_class():
    assert set(ENGINES) == {"ddp", "deepspeed"}


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 with grad_accum=2 leave the same gradients as one batch of 4.

    An identity, so it is checked in float64: the two ways sum the same terms in different orders
    (and GEMM libraries pick their order by CPU), which in fp32 differs by up to ~1e-4 relative on a
    near-cancelling sum; in float64 the same bound is ~1e-13, far below the 1e-9 allowed here."""
    grads = []
    for accum in (1, 2):
        model, engine = _engine([], accum, dtype=torch.float64)
        torch.manual_seed(1)
        images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
        for chunk in range(accum):
            part = slice(chunk * 4 // accum, (chunk + 1) * 4 // accum)
            engine.backward(images[part], labels[part], last_micro=chunk == accum - 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-12, rtol=1e-9, msg=n)


def test_a_non_finite_loss_or_gradient_never_reaches_the_weights():
    model, engine = _engine([])
    before = {n: t.clone() for n, t in engine.trainable_fp32().items()}  # fp32 on the CPU: the parameters themselves
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    bad = images.clone()
    bad[0, 0, 0, 0] = float("inf")  # the loss is not finite: every gradient is made NaN, none of them kept
    loss, done = engine.backward(bad, labels, last_micro=True, loss_ok=lambda x: pytest.fail("asked the host"))
    assert done and not torch.isfinite(loss)
    assert all(torch.isnan(p.grad).all() for p in model.parameters() if p.requires_grad)
    for finite_loss in (False, True):  # the non-finite loss's gradients, then a finite loss's with one NaN
        if finite_loss:
            engine.backward(images, labels, last_micro=True)
            model.head.weight.grad[0, 0] = float("nan")
        norm, applied = engine.step()  # decided on the device: tensors the loop reads when it waits anyway
        assert isinstance(applied, torch.Tensor) and not applied and norm != norm  # NaN norm: no update
        after = engine.trainable_fp32()
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert all(p.grad is None for p in model.parameters())  # and the bad gradients are gone
        assert engine.optimizer_updates() == 0 and all(  # nor did AdamW's moments or step count move
            not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in engine.optimizer.state.values())
    engine.backward(images, labels, last_micro=True)
    norm, applied = engine.step()
    assert applied and 0 < norm < float("inf") and engine.optimizer_updates() == 1
    assert not all(torch.equal(before[n], t) for n, t in engine.trainable_fp32().items())


def test_the_fp16_gradient_scaler_skips_an_overflowed_step_through_the_fused_adamw():
    """fp16's path (on a GPU; torch's CPU scaler stands in here): the scaler's own inf check skips the
    update on the device and halves the scale; the engine reports the step as not applied."""
    model, engine = _engine([])
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    engine.backward(images, labels, last_micro=True)
    norm, applied = engine.step()
    assert applied and engine.optimizer_updates() == 1 and engine.scaler.get_scale() == 256.0
    before = {n: t.clone() for n, t in engine.trainable_fp32().items()}
    engine.backward(images, labels, last_micro=True)
    model.head.weight.grad[0, 0] = float("inf")
    norm, applied = engine.step()
    assert not applied and norm == float("inf") and engine.optimizer_updates() == 1
    assert all(torch.equal(before[n], t) for n, t in engine.trainable_fp32().items())
    assert engine.scaler.get_scale() == 128.0 and not hasattr(engine.optimizer, "found_inf")


class OpsSeen(TorchDispatchMode):
    """The aten ops dispatched inside, by name."""

    def __enter__(self):
        self.names = set()
        super().__enter__()
        return self.names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_clipping_bounds_the_gradients_and_checkpoint_round_trips(tmp_path):
    """train.clip_grad scales the gradients AdamW steps with to that norm and reports the norm before;
    without it the gradients reach AdamW as the backward left them."""
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])

    def total_norm(grads):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))

    for clip in (None, 0.001):
        model, engine = _engine([f"train.clip_grad={clip}"] if clip else [])
        engine.backward(images, labels, last_micro=True)
        left = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stepped = {}
        engine.optimizer.register_step_pre_hook(lambda *_: stepped.update(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        with OpsSeen() as ops:
            norm, applied = engine.step()
        assert applied and stepped.keys() == left.keys()
        torch.testing.assert_close(norm, total_norm(left))
        if clip is None:  # not even a multiply by 1: no pass over the gradients
            assert all(torch.equal(stepped[n], left[n]) for n in left) and "aten._foreach_mul_.Tensor" not in ops
        else:  # to the bound (torch's coefficient: bound / (norm + 1e-6))
            assert norm > 0.001 and abs(total_norm(stepped).item() - 0.001) < 1e-6
    store = CheckpointStore(str(tmp_path), sharded=False)
    engine.save(store, {"state": {"global_step": 1}})
    trained = engine.trainable_fp32()
    other_model, other = _engine([])
    assert store.saved() == ["last.pt"]
    other.load(store, "last.pt")
    assert all(torch.equal(trained[n], t) for n, t in other.trainable_fp32().items())
    assert other.optimizer.state_dict()["state"].keys() == engine.optimizer.state_dict()["state"].keys()


def test_a_step_does_not_walk_the_module_tree(monkeypatch):
    """The DDP engine lists the trainable parameters once: a walk of the module tree for them cost 0.8 ms of
    host time a step on ViT-B/16, time that a GPU step at a small batch does not have to spare."""
    model, engine = _engine(["train.clip_grad=1.0"])
    trainable = [p for p in model.parameters() if p.requires_grad]

    def walked(*args, **kwargs):
        raise AssertionError("named_parameters() during a step")
    monkeypatch.setattr(model, "named_parameters", walked)
    engine.backward(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1]), last_micro=True)
    norm, applied = engine.step()
    assert norm > 0 and applied and engine.trainable_finite()
    assert len(engine.trainable) == len(trainable) and all(a is b for a, b in zip(engine.trainable, trainable))


def test_a_checkpoint_of_the_unfused_adamw_resumes_into_the_fused_one(tmp_path):
    """Checkpoints written before the DDP engine's AdamW was fused (its step counts on the CPU, its
    groups marked unfused) resume: the next step runs fused, from the saved moments, as the unfused
    AdamW would have taken it."""
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    model, engine = _engine([])
    unfused = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                 for g in engine.optimizer.param_groups], lr=engine.optimizer.param_groups[0]["lr"])
    engine.optimizer = unfused  # one step as rlrr took it before
    engine.backward(images, labels, last_micro=True)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    store = CheckpointStore(str(tmp_path), sharded=False)
    engine.save(store, {})
    assert {g["fused"] for g in torch.load(store.path("last.pt"), weights_only=True)["optimizer"]["param_groups"]} \
        == {None}
    engine.backward(images, labels, last_micro=True)
    unfused.step()
    expected = {n: t.clone() for n, t in engine.trainable_fp32().items()}
    _, resumed = _engine([])
    resumed.load(store, "last.pt")
    resumed.backward(images, labels, last_micro=True)
    norm, applied = resumed.step()
    assert applied and resumed.optimizer_updates() == 2
    for n, t in resumed.trainable_fp32().items():  # two ways of the same arithmetic, in fp32
        torch.testing.assert_close(t, expected[n], rtol=1e-5, atol=1e-6, msg=n)


def _train(*overrides):
    return load_config(None, ["data.shards=x", "train.engine=deepspeed", *overrides]).train


def test_the_run_config_fills_in_what_a_deepspeed_json_leaves_out_or_marks_auto(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": "auto", "bf16": {"enabled": "auto"},
                                                  "zero_optimization": {"overlap_comm": False}}))
    ds = deepspeed_config(_train(f"train.deepspeed_config={tmp_path / 'ds.json'}", "train.batch_size=32",
                                 "train.grad_accum=2", "train.clip_grad=1.5", "train.zero_stage=3",
                                 "train.precision=bf16"), world=4)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"overlap_comm": False, "stage": 3, **ZERO3_LIVE_DEFAULTS}  # JSON knob kept


@pytest.mark.parametrize("name,stage", [("zero1_bf16", 1), ("zero2_bf16", 2), ("zero3_bf16", 3)])
def test_each_shipped_deepspeed_json_agrees_with_its_run_config_and_refuses_another(name, stage):
    path = ROOT / "configs" / "deepspeed" / f"{name}.json"
    ds = deepspeed_config(_train(f"train.deepspeed_config={path}", f"train.zero_stage={stage}",
                                 "train.precision=bf16"), world=2)
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"]
    with pytest.raises(ConfigError) as e:
        deepspeed_config(_train(f"train.deepspeed_config={path}", f"train.zero_stage={stage}"), world=2)
    assert str(e.value) == (f"{path}: bf16.enabled = true conflicts with train.precision = fp32; make them agree "
                            "or leave the key out of the JSON (the run config sets it)")
    other = 3 if stage != 3 else 2
    with pytest.raises(ConfigError, match=f"zero_optimization.stage = {stage} conflicts with train.zero_stage = "
                                          f"{other};"):
        deepspeed_config(_train(f"train.deepspeed_config={path}", f"train.zero_stage={other}",
                                "train.precision=bf16"), world=2)


@pytest.mark.parametrize("content,expected", [
    ({"train_batch_size": 64}, "train_batch_size = 64 conflicts with train.batch_size = 32"),
    ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu = 2 conflicts with train.batch_size / "
                                            "(world 4 x train.grad_accum) = 8"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps = 4 conflicts with train.grad_accum = 1"),
    ({"gradient_clipping": 1.0}, "gradient_clipping = 1.0 conflicts with train.clip_grad = 0.0"),
    ({"fp16": {"enabled": True}}, "fp16.enabled = true conflicts with train.precision = fp32"),
    ({"optimizer": {"type": "Adam"}}, "remove \"optimizer\": rlrr builds AdamW"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove \"scheduler\""),
    ([1, 2], "expected a JSON object"),
])
def test_a_deepspeed_json_that_contradicts_the_run_config_is_one_clear_error(content, expected, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError) as e:
        deepspeed_config(_train(f"train.deepspeed_config={tmp_path / 'ds.json'}", "train.batch_size=32"), world=4)
    assert str(e.value).startswith(f"{tmp_path / 'ds.json'}: ") and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_a_deepspeed_json_that_is_not_json_is_one_clear_error(tmp_path):
    (tmp_path / "ds.json").write_text("{stage: 2")
    with pytest.raises(ConfigError, match=r"train.deepspeed_config = '.*ds.json': not a readable JSON"):
        deepspeed_config(_train(f"train.deepspeed_config={tmp_path / 'ds.json'}"), world=1)


def test_zero3_keeps_only_a_few_blocks_gathered_unless_the_json_says_otherwise(tmp_path):
    ds = deepspeed_config(_train("train.zero_stage=3"), world=2)
    assert {k: ds["zero_optimization"][k] for k in ZERO3_LIVE_DEFAULTS} == ZERO3_LIVE_DEFAULTS
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 1e9}}))
    ds = deepspeed_config(_train("train.zero_stage=3", f"train.deepspeed_config={tmp_path / 'ds.json'}"), world=2)
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 1e9  # a tuning knob: the JSON's value
    zero2 = deepspeed_config(_train("train.zero_stage=2"), world=2)
    assert "stage3_max_live_parameters" not in zero2["zero_optimization"]


# (device, train.compile_scope): tools/gpu_acceptance.sh runs cuda, compiled whole (a one-process run's default) and
# by blocks; on CPU nothing compiles, so one scope
GRAPH_CASES = [("cpu", "blocks")] + ([("cuda", "model"), ("cuda", "blocks")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,scope", GRAPH_CASES)
def test_under_cuda_graphs_accumulation_keeps_its_gradients_out_of_the_graphs_memory(device, scope):
    """grad_accum = 3 with CUDA graphs: after each micro-batch but the last, no parameter holds as .grad the
    tensor its backward produced (on a GPU, memory of the graph pool that the next replay overwrites), and
    after a step and a second window the gradients equal those of the same engine without CUDA graphs. On
    CPU the engine takes its CUDA-graph path uncompiled; on a GPU, the model compiled (whole or by blocks)
    with and without graphs."""
    from rlrr.compile import CompilePlan
    dev = torch.device(device)
    grads = []
    for graphs in (False, True):
        cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.img_size=32", "train.grad_accum=3",
                                 "train.batch_size=6"])
        model = build_model(cfg.model, num_classes=3, seed=0)
        with torch.no_grad():
            model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
        plan = CompilePlan(compile=dev.type == "cuda", cuda_graphs=graphs, cache_dir="-", scope=scope)
        engine = DDPEngine(model, cfg, DistInfo(device=dev), plan)
        produced = {}

        def record(p):  # after accumulation: the first backward's .grad is the tensor it produced
            produced.setdefault(p, p.grad.data_ptr())
        for p in engine.trainable:
            p.register_post_accumulate_grad_hook(record)
        torch.manual_seed(1)
        images, labels = torch.randn(6, 3, 32, 32, device=dev), torch.tensor([0, 1, 2, 1, 0, 2], device=dev)
        for window in range(2):  # on a GPU the second window's micro-batches are all graph replays
            if window:
                engine.step()
            for micro in range(3):
                produced.clear()
                part = slice(2 * micro, 2 * micro + 2)
                engine.backward(images[part], labels[part] if window else labels[part].flip(0), last_micro=micro == 2)
                if graphs and micro < 2:
                    held = [p for p, ptr in produced.items() if p.grad.data_ptr() == ptr]
                    assert produced and not held
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    # CPU: the same sums in the same order (the copies are exact). GPU: two separate compiles, which may split
    # their fp32 reductions differently; a replay that overwrote the first terms would be off by O(1)
    tol = dict(atol=0, rtol=0) if dev.type == "cpu" else dict(atol=1e-6, rtol=1e-4)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **tol, msg=n)
