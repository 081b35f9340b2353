"""tools/check_gradients.py: compiled and fused training paths against an eager float64 step."""
import json
import math

import pytest
import torch

from helpers import run_tool, tool_module

cg = tool_module("check_gradients.py")


def test_relative_error_is_the_largest_difference_over_the_largest_reference_entry():
    ref = torch.tensor([2.0, -4.0, 1.0], dtype=torch.float64)
    assert cg.relative_error(torch.tensor([2.0, -3.0, 1.0]), ref) == 0.25
    assert cg.relative_error(torch.zeros(2), torch.zeros(2, dtype=torch.float64)) == 0.0
    assert cg.relative_error(torch.ones(2), torch.zeros(2, dtype=torch.float64)) == math.inf


def test_verdict_bounds_each_tensor_by_the_eager_error_and_flags_a_stale_one():
    """8x the eager error plus 2 bf16 unit roundoffs (2^-7): a reordered sum passes, a gradient from the wrong
    step (O(1) off) does not, even where eager's own error is large."""
    floor = {"a": 0.01, "b": 0.0, "c": 0.05}
    ok = cg.verdict({"a": 0.05, "b": 2.0 ** -8, "c": 0.3}, floor, "bf16")
    assert ok["over_bound"] == [] and ok["worst_tensor"] == "c" and ok["worst_ratio"] == round(0.3 / (0.4 + 2 ** -7), 4)
    stale = cg.verdict({"a": 0.05, "b": 0.0, "c": 1.0}, floor, "bf16")
    assert stale["over_bound"] == ["c"] and stale["worst_ratio"] > 2
    # fp32: the slack is 2^-23, so an error eager does not make fails at 1e-5
    assert cg.verdict({"b": 1e-5}, {"b": 0.0}, "fp32")["over_bound"] == ["b"]


def test_unknown_path_is_a_one_line_error():
    with pytest.raises(SystemExit):
        cg.parse_args(["--paths", "compiled,warp"])


@pytest.mark.integration  # builds inductor's C++ kernels
def test_compiled_whole_model_matches_eager_and_a_path_that_cannot_run_fails_the_check(tmp_path, monkeypatch):
    """The real engine, compiled whole on CPU, two steps of a 2-block ViT and an evaluation forward: within
    its bound, one graph, no break; the Triton path off CUDA (no interpreter) fails with its reason, and the
    command exits 1."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "grads.json"
    res = run_tool("check_gradients.py", "--set", "model.name=test_vit", "--set", "model.img_size=32",
                   "--set", "model.timm_kwargs={depth: 2}", "--batch-size", "4", "--steps", "2", "--device", "cpu",
                   "--paths", "compiled,fused", "--json", out, timeout=600)
    assert res.returncode == 1, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rlrr = data["methods"]["rlrr"]
    compiled = rlrr["paths"]["compiled"]
    assert compiled["over_bound"] == [] and 0 < compiled["worst_ratio"] <= 1
    assert compiled["graphs"] == 1 and compiled["graph_breaks"] == 0
    # the evaluation forward (eval mode, no autograd: a graph of its own) within the same bound
    assert 0 < compiled["eval_error"] <= 8 * compiled["floor_eval_error"] + 2 ** -7
    assert rlrr["plans"]["compiled"]["compile"] and rlrr["plans"]["compiled"]["scope"] == "model"
    assert 0 < rlrr["floor"]["worst_error"] < 0.1  # bf16 autocast against float64
    assert "triton" in rlrr["failed"]["fused"] and not data["ok"]
    assert "rlrr+compiled: worst" in res.stdout and "rlrr+fused: FAILED" in res.stdout
