"""tools/protocol.py on one machine: two small tasks of real images (Fashion-MNIST and a sample of MNIST
digits), a 2 x 2 grid, 2 seeds, on the tiny test ViT (the session fixture
local_protocol in conftest.py runs it): the choice, the retraining splits, the report's numbers, a
stopped call resumed, and a failed run. rlrr/protocol.py's pieces too."""
import json
import statistics

import pytest
import yaml

from rlrr.protocol import Plan, Task, parse_grid, point_label

from helpers import protocol_argv, tool_main


def test_grid_points_labels_and_the_tie_rule_order():
    grid = parse_grid(["train.lr=1e-3,3e-3", "model.rlrr.init=official,identity"])
    assert grid == {"train.lr": [1e-3, 3e-3], "model.rlrr.init": ["official", "identity"]}
    task = Task("kitti", "kitti.yaml", "train800", "val200", "train800val200", "test", 100,
                {"train800": 800, "val200": 200, "train800val200": 1000, "test": 711})
    plan = Plan([task], grid, [42, 43], None, "/tmp/p")
    points = plan.points()
    assert points[0] == {"train.lr": 1e-3, "model.rlrr.init": "official"} and len(points) == 4
    assert point_label(points[1]) == "lr0.001-initidentity"
    grid_job = plan.grid_jobs(task)[1]
    assert grid_job.label == "kitti-lr0.001-initidentity"
    assert grid_job.run_dir == "/tmp/p/grid/kitti-lr0.001-initidentity"
    assert {"data.train_split=train800", "data.test_split=val200", "data.val_split=null"} <= set(grid_job.overrides)
    retrain = plan.retrain_jobs(task, points[2])
    assert [j.label for j in retrain] == ["kitti-seed42", "kitti-seed43"]
    assert {"data.train_split=train800val200", "data.test_split=test", "train.seed=43",
            'model.rlrr.init="official"', "train.lr=0.003"} <= set(retrain[1].overrides)


@pytest.mark.integration
def test_a_stopped_protocol_resumes_without_repeating_a_finished_run(local_protocol):
    finished = local_protocol["finished_after_stop"]
    assert 3 <= len(finished) < 8
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # no finished run was trained again


@pytest.mark.integration
def test_a_run_that_keeps_failing_is_retried_once_then_shown_as_failed_and_the_rest_complete(local_protocol):
    second = local_protocol["second"]
    assert second["code"] == 1, second["stderr"][-3000:]
    by_task = {t["task"]: t for t in second["report"]["tasks"]}
    assert by_task["digits"]["status"] == "FAILED" and by_task["digits"]["failed"] == ["digits-seed43"]
    assert "injected failure" in by_task["digits"]["errors"][0] and "FAILED (digits-seed43: " in second["md"]
    assert by_task["fmnist"]["status"] == "ok"
    assert second["report"]["groups"]["all"] is None  # no test number for digits: no overall mean made up
    assert second["log"].count("RuntimeError: injected failure") == 2  # the first attempt and its one retry
    # the third call trained only that run, and everything is complete
    assert local_protocol["third_code"] == 0 and local_protocol["report"]["groups"]["all"] is not None


@pytest.mark.integration
def test_the_choice_the_retraining_and_the_report_follow_the_runs_own_results(local_protocol):
    out, report = local_protocol["out"], local_protocol["report"]
    means = []
    for task in report["tasks"]:
        name = task["task"]
        grid = {}  # the choice: the best val top-1 of the task's own grid runs, the first listed winning a tie
        for run in sorted(out.glob(f"grid/{name}-*/results.json")):
            cfg = yaml.safe_load((run.parent / "config.yaml").read_text())
            assert cfg["data"]["train_split"] == "train" and cfg["data"]["test_split"] == "val"
            grid[(cfg["train"]["lr"], cfg["train"]["weight_decay"])] = json.loads(run.read_text())["test_acc1_final"]
        order = [(lr, wd) for lr in (0.003, 0.03) for wd in (0.0001, 0.05)]
        assert sorted(grid) == sorted(order)
        best = max(order, key=lambda p: grid[p])
        assert (task["point"]["train.lr"], task["point"]["train.weight_decay"]) == best
        assert task["val_acc1"] == grid[best]
        tests = []  # the retraining: train+val, the test split, the chosen point, one run per seed
        for seed in (42, 43):
            run = out / "retrain" / f"{name}-seed{seed}"
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["data"]["train_split"] == "trainval" and cfg["data"]["test_split"] == "test"
            assert (cfg["train"]["lr"], cfg["train"]["weight_decay"], cfg["train"]["seed"]) == (*best, seed)
            results = json.loads((run / "results.json").read_text())
            assert results["epochs"] == 3 and results["run_s"] > 0
            tests.append(results["test_acc1_final"])
        assert task["test_acc1"] == tests and task["test_mean"] == pytest.approx(statistics.fmean(tests))
        assert task["test_std"] == pytest.approx(statistics.stdev(tests))
        means.append(task["test_mean"])
    assert report["groups"]["all"] == pytest.approx(statistics.fmean(means))
    assert report["cost"]["total"] == pytest.approx(report["cost"]["grid"] + report["cost"]["retrain"], abs=2e-4)
    assert report["cost"]["total"] > 0 and report["cost_unit"] == "CPU process-hours"
    md = (out / "protocol.md").read_text()
    assert "| fmnist | train.lr=" in md and "Cost (CPU process-hours): grid " in md


@pytest.mark.integration
def test_dry_run_lists_every_run_and_estimates_the_cost(local_protocol, tmp_path, capsys):
    assert tool_main("protocol.py")(protocol_argv(local_protocol["tasks"], tmp_path / "dry", "--dry-run")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum(ln.startswith("grid ") for ln in lines) == 8 and sum(ln.startswith("retrain ") for ln in lines) == 4
    assert "2 tasks, 12 runs; estimated device-hours still to spend" in out
    assert not (tmp_path / "dry").exists()
    # measured runs replace the estimate: a plan over the finished protocol has nothing left to spend
    assert tool_main("protocol.py")(protocol_argv(local_protocol["tasks"], local_protocol["out"], "--dry-run")) == 0
    assert "still to spend: grid 0.00, retrain 0.00, total 0.00" in capsys.readouterr().out
