"""After training: the self-contained run directory, tools/predict.py, tools/evaluate.py,
tools/export.py (ONNX) and the AdapterBank, on runs made by the real training entry point."""
import json
import os
import shutil

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.samples import read_split
from rlrr.data.transforms import Recipe, normalize
from rlrr.inference import AdapterBank, load_model

from helpers import run_tool, tool_main

pytestmark = pytest.mark.integration  # tools on runs trained end to end


@pytest.fixture
def trained(two_runs):
    return two_runs


def _reference_probs(run, shards) -> dict:
    """Softmax of the plain timm model (merged file) on the test split through the training loader's
    eval pipeline (not the inference module), keyed by sample key."""
    model = timm.create_model("test_vit", img_size=32, num_classes=4)
    model.load_state_dict(load_file(str(run / "merged.safetensors")), strict=True)
    loader = SplitLoader(Manifest(shards), "test", train=False, batch_size=64, recipe=Recipe("vtab", False, False, 32),
                         workers=0, in_memory=True)
    out = {}
    with torch.no_grad():
        for images, _, keys in loader.epoch(0):
            for key, p in zip(keys, model.eval()(normalize(images, "half")).softmax(-1)):
                out[key] = p
    return out


def test_run_directory_is_self_contained_and_loads_with_the_timm_one_liner(trained):
    run = trained["runs"] / "dtd"
    card = json.loads((run / "inference.json").read_text())
    manifest = Manifest(trained["shards"])
    assert card["class_names"] == manifest.class_names and card["num_classes"] == 4
    assert card["backbone"] == "test_vit" and card["img_size"] == 32
    assert card["preprocessing"] == {"shards": {"image_size": 32, "resize": "square", "interpolation": "bicubic"},
                                     "recipe": "vtab", "image_size": 32, "stats": "half",
                                     "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    # the documented one-liner, as written in the card, loads the merged file into plain timm
    merged_file = str(run / "merged.safetensors")
    one_liner = card["timm"].replace("'merged.safetensors'", repr(merged_file))
    plain = eval(one_liner, {"timm": timm})
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged, _ = load_model(str(run))
        adapted, _ = load_model(str(run), source="adapter")
        assert torch.allclose(plain.eval()(x), merged(x), atol=1e-6)
        assert torch.allclose(adapted(x), merged(x), atol=1e-5)


def test_predict_on_files_and_shards_equals_the_models_own_probabilities(trained, tmp_path):
    run, shards = trained["runs"] / "dtd", trained["shards"]
    expected = _reference_probs(run, shards)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for image, _, key in read_split(Manifest(shards).split("test").shards, Manifest(shards).reader()):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / "sub" / f"{key}.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    out_json, out_csv = tmp_path / "p.json", tmp_path / "p.csv"
    assert tool_main("predict.py")([str(run), str(images), "--top-k", "3", "--batch-size", "5",
                                    "--json", str(out_json), "--csv", str(out_csv)]) == 0
    rows = json.loads(out_json.read_text())
    assert len(rows) == len(expected) + 1
    broken = [r for r in rows if r["image"].endswith("broken.jpg")]
    assert broken and "error" in broken[0]  # reported, and the rest of the batch still answered
    names = Manifest(shards).class_names
    for r in rows:
        if "error" in r:
            continue
        p = expected[os.path.basename(r["image"])[:-4]]
        top = p.topk(3)
        assert [t["class"] for t in r["top"]] == [names[i] for i in top.indices.tolist()]
        assert [t["prob"] for t in r["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert out_csv.read_text().count("\n") == len(rows) + 1
    # --shards: the same answers, keyed by sample
    assert tool_main("predict.py")([str(run), "--shards", shards, "--split", "test", "--json", str(out_json)]) == 0
    for r in json.loads(out_json.read_text()):
        assert r["top"][0]["prob"] == pytest.approx(expected[r["image"]].max().item(), abs=1e-5)
    # nothing readable at all: exit 1
    assert tool_main("predict.py")([str(run), str(images / "broken.jpg")]) == 1


def test_evaluate_under_torchrun_equals_the_runs_own_test_accuracy(trained, tmp_path):
    run = trained["runs"] / "dtd"
    results = json.loads((run / "results.json").read_text())
    proc = run_tool("evaluate.py", run, "--out", tmp_path / "two", nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert ev["world_size"] == 2 and ev["samples"] == 13
    assert ev["acc1"] == pytest.approx(results["test_acc1_final"], abs=1e-4)  # one sample is 7.7 points
    assert ev["acc5"] == pytest.approx(results["test_acc5_final"], abs=1e-4)
    assert sum(map(sum, ev["confusion"])) == 13 and len(ev["per_class_acc1"]) == 4
    assert (tmp_path / "two" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # one process, backbone + adapter: the same numbers
    assert tool_main("evaluate.py")([str(run), "--source", "adapter", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    assert (one["acc1"], one["confusion"]) == (ev["acc1"], ev["confusion"])
    assert tool_main("evaluate.py")([str(run), "--split", "nope"]) == 2


def test_onnx_export_agrees_with_pytorch_and_fails_loudly(trained, tmp_path, capsys):
    run = trained["runs"] / "dtd"
    onnx_path = tmp_path / "model.onnx"
    assert tool_main("export.py")([str(run), "--onnx", str(onnx_path), "--images", "13"]) == 0
    report = json.loads((tmp_path / "model.onnx.json").read_text())
    assert report["ok"] and report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    assert report["opset"] == 18 and report["batch_sizes"] == [1, 13] and "onnxruntime" in report["versions"]
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic batch axis
    # a tolerance the export cannot meet (float32 kernels differ in rounding): exit 1, named figures
    assert tool_main("export.py")([str(run), "--onnx", str(onnx_path), "--atol", "0"]) == 1
    assert "onnxruntime disagrees with PyTorch (max abs diff" in capsys.readouterr().err
    assert json.loads((tmp_path / "model.onnx.json").read_text())["ok"] is False


def test_adapter_bank_gives_each_tasks_own_model(trained, tmp_path):
    runs = [trained["runs"] / "dtd", trained["runs"] / "kitti"]
    bank = AdapterBank.from_runs([str(r) for r in runs])
    backbone = bank.model.blocks[0].attn.qkv.weight
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        separate = {r.name: load_model(str(r))[0](x) for r in runs}
        assert not torch.allclose(separate["dtd"], separate["kitti"], atol=1e-3)
        for name in ("dtd", "kitti", "dtd", "kitti"):  # switch back and forth
            assert torch.allclose(bank.use(name)(x), separate[name], atol=1e-5), name
    assert bank.model.blocks[0].attn.qkv.weight is backbone  # the backbone was never reloaded
    # predict --adapters: one backbone, both tasks, the same answers as each run alone
    image = tmp_path / "x.png"
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy()
                    ).save(image)
    assert tool_main("predict.py")(["--adapters", *map(str, runs), "--json", str(tmp_path / "m.json"), "--",
                                    str(image)]) == 0
    multi = {r["task"]: r["top"] for r in json.loads((tmp_path / "m.json").read_text())}
    for r in runs:
        assert tool_main("predict.py")([str(r), str(image), "--json", str(tmp_path / "s.json")]) == 0
        single = json.loads((tmp_path / "s.json").read_text())[0]["top"]
        assert [t["class"] for t in multi[r.name]] == [t["class"] for t in single]
        assert [t["prob"] for t in multi[r.name]] == pytest.approx([t["prob"] for t in single], abs=1e-5)
    # a run on another backbone is refused with the differing key named
    other = trained["tmp"] / "other"
    shutil.copytree(runs[1], other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("rank: 1", "rank: 2"))
    with pytest.raises(ValueError, match=r"trained on another backbone or method \(model.rlrr.rank: 2 vs 1\)"):
        bank.add("other", str(other))
