"""tools/report.py and tools/analyze_svd.py on runs made by the real training entry point."""
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from rlrr import paper

from helpers import run_tool, run_tool_here, tool_module

report = tool_module("report.py")


pytestmark = pytest.mark.integration  # command-line tools on runs trained end to end


@pytest.fixture
def runs(two_runs):
    return two_runs["runs"]


def test_paper_row_reproduces_the_papers_means():
    tasks = {t.group: [] for t in paper.VTAB}
    for t in paper.VTAB:
        tasks[t.group].append(t.paper)
    means = {g: sum(v) / len(v) for g, v in tasks.items()}
    assert [len(tasks[g]) for g in ("Natural", "Specialized", "Structured")] == [7, 4, 8]
    for g, m in means.items():
        assert m == pytest.approx(paper.PAPER_MEANS["vtab"][g], abs=0.1)  # the paper averages unrounded values
    assert sum(t.paper for t in paper.VTAB) / 19 == pytest.approx(74.5, abs=0.05)
    assert sum(means.values()) / 3 == pytest.approx(76.7, abs=0.06)


def test_report_tables_mark_missing_tasks_and_never_average_them(runs, tmp_path):
    res = run_tool("report.py", runs, "--csv", tmp_path / "r.csv", "--png", tmp_path / "r.png",
                   "--md", tmp_path / "r.md")
    assert res.returncode == 0, res.stderr
    ours = {d.name: json.loads((runs / d.name / "results.json").read_text())["test_acc1_final"] for d in runs.iterdir()}
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / "r.csv").open())}
    assert float(rows["DTD"]["ours"]) == pytest.approx(ours["dtd"], abs=0.005)
    assert float(rows["KITTI-Dist"]["ours"]) == pytest.approx(ours["kitti"], abs=0.005)
    assert float(rows["DTD"]["diff"]) == pytest.approx(ours["dtd"] - 72.9, abs=0.01)
    assert rows["CIFAR-100"]["ours"] == "" and rows["CIFAR-100"]["paper"] == "75.6"
    assert rows["Natural"]["ours"] == "" and rows["Mean (19 tasks)"]["ours"] == ""  # incomplete, not zero-filled
    md = (tmp_path / "r.md").read_text()
    assert "| RLRR (paper) | 75.6 | 92.4 |" in md and "incomplete (1/7)" in md and "incomplete (2/19)" in md
    assert "Missing: CIFAR-100" in md and "On the 2 tasks present" in md
    assert md.strip() in res.stdout.strip()
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "FGVC" not in md  # no FGVC run, no FGVC table


def test_report_complete_suite_means_and_errors(tmp_path):
    for t in paper.VTAB:  # a complete sweep where we match the paper to the digit, plus one repeated seed
        for seed, delta in ((0, 0.0), (1, 1.0)) if t.name == "dtd" else ((0, 0.0),):
            run = tmp_path / "all" / f"s{seed}" / t.name
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps({"test_acc1_final": t.paper + delta}))
    values, unmatched = report.collect(report.find_runs([tmp_path / "all"]), "test_acc1_final")
    table = {r["name"]: r for r in paper.rows(paper.VTAB, values, "vtab")}
    assert table["DTD"]["ours"] == pytest.approx(73.4) and table["DTD"]["runs"] == 2 and not unmatched
    assert table["Specialized"]["ours"] == pytest.approx(85.8)
    assert table["Mean (19 tasks)"]["ours"] == pytest.approx((sum(t.paper for t in paper.VTAB) + 0.5) / 19)
    res = run_tool_here("report.py", tmp_path / "all", "--metric", "at_best_val")
    assert res.returncode == 2 and "test_acc1_at_best_val is missing or null" in res.stderr
    (tmp_path / "other" / "imagenet").mkdir(parents=True)
    (tmp_path / "other" / "imagenet" / "results.json").write_text("{}")
    res = run_tool_here("report.py", tmp_path / "other")
    assert res.returncode == 2 and "no run matches a VTAB-1k or FGVC task" in res.stderr
    assert "imagenet is not a VTAB-1k or FGVC task name" in res.stderr
    res = run_tool_here("report.py", tmp_path / "nothing-here")
    assert res.returncode == 2 and "not a directory" in res.stderr


def test_svd_analysis_tables_and_plots(runs, tmp_path):
    res = run_tool("analyze_svd.py", runs / "kitti", "--top-k", "4", "--out", tmp_path / "svd")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((tmp_path / "svd" / "svd.csv").open()))
    layers = [r["layer"] for r in rows]
    # test_vit: 2 blocks; q, k, v analysed separately, then proj, fc1, fc2 (+ the head is not adapted)
    assert layers[:6] == ["blocks.0.attn.qkv[q]", "blocks.0.attn.qkv[k]", "blocks.0.attn.qkv[v]",
                          "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    spectra = json.loads((tmp_path / "svd" / "spectra.json").read_text())
    from rlrr.adapter import read_adapter
    tensors, _ = read_adapter(str(runs / "kitti" / "adapter.safetensors"))
    # recompute one row independently from the adapter file and the run's own merged model
    merged = load_file(str(runs / "kitti" / "merged.safetensors"))
    w_after = merged["blocks.0.mlp.fc1.weight"].double()
    s_after = torch.linalg.svdvals(w_after)
    assert torch.allclose(torch.tensor(spectra["blocks.0.mlp.fc1"]["after"], dtype=torch.float64), s_after, rtol=1e-4)
    s_in, s_out = tensors["blocks.0.mlp.fc1.scale_in"].double(), tensors["blocks.0.mlp.fc1.scale_out"].double()
    w_before = w_after / (1 + s_out[:, None] * s_in[0][None, :])
    s_before = torch.linalg.svdvals(w_before)
    assert torch.allclose(torch.tensor(spectra["blocks.0.mlp.fc1"]["before"], dtype=torch.float64), s_before, rtol=1e-4)
    fc1 = next(r for r in rows if r["layer"] == "blocks.0.mlp.fc1")
    assert float(fc1["sigma1_change_pct"]) == pytest.approx(float((s_after[0] / s_before[0] - 1) * 100), abs=1e-3)
    assert 0 <= float(fc1["angle_left_deg"]) <= 90 and float(fc1["rel_frobenius_change"]) > 0
    for png in ("spectra.png", "angles.png"):
        assert (tmp_path / "svd" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| blocks.0.mlp.fc1 |" in (tmp_path / "svd" / "svd.md").read_text()
    bad = run_tool_here("analyze_svd.py", tmp_path)
    assert bad.returncode == 2 and "config.yaml does not exist" in bad.stderr
