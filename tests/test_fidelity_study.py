"""benchmarks/fidelity_study.py and its package benchmarks/study/: methods as data, cost from
history, verdicts between rows that exist, and resumption (tiny grids: two samples, a few
steps). Its Ray path runs in tests/test_serve.py, on dcfx serve's cluster.
"""

import shutil
import sys

import pytest

from _benchmarks import package, script, tiny_study as _study
from dcfx import DeepCacheConfig

pkg = package("study")
analysis, methods, report, tasks = pkg.analysis, pkg.methods, pkg.report, pkg.tasks
fs = script("fidelity_study")
Method = methods.Method


# Each kind of task once, two seeds: one worker may run several, in any order.
TINY = [Method("dpm++2m", 3), Method("dpm++2m", 4, DeepCacheConfig(interval=2, branch=0)), Method("ddim", 2)]
TASKS = [(m, s) for s in (0, 1) for m in TINY]


def _finished(study, tasks_dir):
    return {study.task_key(m, s): tasks.load_task(tasks.task_path(tasks_dir, study.task_key(m, s))) for m, s in TASKS}


def test_methods_are_data():
    m = methods.parse_method("dpm++2m:20:interval=2,branch=0,schedule=(0, 3, 7)")
    assert m == Method("dpm++2m", 20, DeepCacheConfig(interval=2, schedule=(0, 3, 7)))
    assert m.kind == "dcfx policy" and m.plain == Method("dpm++2m", 20)
    assert m.label == "DPM-Solver++ 2M 20 + DeepCache explicit 3 full N=2 b=0"
    uniform = Method("ddim", 10, DeepCacheConfig(interval=2))
    assert uniform.kind == "uniform DeepCache" and uniform.family == "DDIM + DeepCache uniform N=2 b=0"
    assert Method("unipc", 5).kind == "plain" and Method("unipc", 5, family="mine").family == "mine"
    # Only interval, branch and fields off their defaults name a config: fields added later with
    # defaults keep finished tasks' names.
    assert methods.config_fields(DeepCacheConfig(interval=2)) == {"interval": 2, "branch": 0}
    # The setting is dcfx's short form as well: N:B[:nonuniform][:fK], SIGNAL:B[:THRESHOLD].
    assert methods.parse_method("dpm++2m:20:2:0:f1") == Method("dpm++2m", 20, DeepCacheConfig(interval=2, forecast=1))
    assert methods.parse_method("unipc:9:cut:0:0.15").config == DeepCacheConfig(adaptive="cut", threshold=0.15)
    assert methods.parse_method("ddim:7").config is None
    with pytest.raises(ValueError, match="unknown scheduler"):
        methods.parse_method("euler:10")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        methods.parse_method("ddim:10:interval")
    with pytest.raises(ValueError, match="SCHEDULER:STEPS"):
        methods.parse_method("ddim")


def test_cost_counts_the_steps_that_ran():
    fraction = {0: 0.1, 1: 0.25}
    assert analysis.cost_of("FFFF", None, fraction) == 4
    assert analysis.cost_of("FSFSS", DeepCacheConfig(branch=1), fraction) == pytest.approx(2 + 3 * 0.25)
    # An adaptive policy's seeds may run different steps: each is priced by its own history.
    assert analysis.cost_of("FSSSS", DeepCacheConfig(), fraction) == pytest.approx(1.4)


def _measured(*specs):
    """(method, cost, PSNR per seed) -> the rows measured, two seeds, accuracy 0.9 throughout."""
    rows = [analysis.Row(m, seed, "", cost, 0.0, {"psnr_ref": p, "accuracy": 0.9})
            for m, cost, psnr in specs for seed, p in enumerate(psnr)]
    return analysis.by_method(rows)


def test_verdicts_compare_rows_at_or_under_the_budget():
    f1 = DeepCacheConfig(interval=2, forecast=1)
    measured = _measured((Method("unipc", 4), 4.0, (20.0, 20.5)), (Method("unipc", 8), 8.0, (25.0, 25.4)),
                         (Method("unipc", 16), 16.0, (30.0, 30.2)),
                         (Method("dpm++2m", 10, DeepCacheConfig(interval=2)), 5.5, (23.0, 23.2)),
                         (Method("dpm++2m", 14, f1), 7.7, (28.0, 28.5)), (Method("dpm++2m", 20, f1), 11.0, (31.0, 31.0)))
    label = lambda m: m.method.label if m else None  # noqa: E731
    assert label(analysis.best_row(measured, 10, kind="plain")) == "UniPC 8"  # a row, never a value between 8 and 16
    assert label(analysis.best_row(measured, 16, kind="plain")) == "UniPC 16"  # a row at the budget counts
    assert analysis.best_row(measured, 3.9, kind="plain") is None
    assert label(analysis.best_row(measured, 7.9, family="UniPC")) == "UniPC 4"
    goal = analysis.goal_at(measured, 8, goal_db=3)
    assert (label(goal.plain), label(goal.uniform), label(goal.policy)) == ("UniPC 8", "DPM-Solver++ 2M 10 + DeepCache uniform N=2 b=0",
                                                                           "DPM-Solver++ 2M 14 + DeepCache uniform N=2 b=0 forecast=1")
    assert goal.vs_plain == pytest.approx((3.05, 0.0707), abs=1e-4) and goal.state == "met"
    assert analysis.goal_at(measured, 8, goal_db=3.1).state == "not met"
    assert analysis.goal_at(measured, 5, goal_db=3).state == "not judged"  # no uniform DeepCache row that cheap
    # Each dcfx row against the best plain row that costs no more: the policy at 7.7 against UniPC 4.
    verdicts = {v.row.method.steps: v for v in analysis.row_verdicts(measured)}
    assert label(verdicts[14].plain) == "UniPC 4" and verdicts[14].vs_plain == pytest.approx((8.0, 0.0))
    assert verdicts[14].verdict == "better" and label(verdicts[14].uniform) == label(goal.uniform)
    assert verdicts[10].uniform is None  # uniform DeepCache is not judged against itself
    with pytest.raises(ValueError, match="one of plain"):
        analysis.best_row(measured, 10, kind="fast")


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """TASKS run here, one after the other: (study, tasks dir)."""
    study, folder = _study(), tmp_path_factory.mktemp("serial")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # the serial path must never import ray
        assert tasks.execute(study, TASKS, folder) == len(TASKS)
    return study, folder


@pytest.mark.trained
def test_serial_run_resumes_from_finished_tasks(serial, tmp_path, monkeypatch):
    study, folder = serial
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    ran = []
    run = tasks.run_task
    monkeypatch.setattr(tasks, "run_task", lambda *a: ran.append(a[1:]) or run(*a))
    monkeypatch.setitem(sys.modules, "ray", None)
    assert tasks.execute(study, TASKS, tmp_path) == 0 and ran == []
    tasks.task_path(tmp_path, study.task_key(*TASKS[1])).unlink()
    assert tasks.execute(study, TASKS, tmp_path) == 1 and ran == [TASKS[1]]
    first, again = _finished(study, folder), _finished(study, tmp_path)
    for key, task in first.items():  # a re-run task is the same bit for bit
        assert again[key]["images"].tobytes() == task["images"].tobytes()
    dc = first[study.task_key(*TASKS[1])]
    assert dc["history"] == "FSFS" and dc["images"].shape == (2, 1, 16, 16)
    # Anything that changes the images changes the task's name.
    assert len({s.task_key(*TASKS[0]) for s in (study, _study(threads=2), _study(spacing="leading"), _study(samples=3))}) == 4


class _Judge:
    """Stands in for the digits judge (which trains for seconds): the study's arithmetic is tested."""

    test_accuracy = 1.0

    def accuracy(self, images, labels):
        return float((images.flatten(1).mean(1) > 0.2).float().mean())

    def frechet_to_test(self, images):
        return float(images.mean())


@pytest.mark.trained
def test_cli_writes_tables_and_csv_and_resumes(tmp_path, monkeypatch, capsys):
    import dcfx.models.quality as quality

    monkeypatch.setattr(quality, "judge", lambda: _Judge())
    monkeypatch.setitem(sys.modules, "ray", None)
    argv = ["--grid", "none", "--method", "dpm++2m:3", "--method", "dpm++2m:4:interval=2,branch=0",
            "--method", "dpm++2m:4:interval=2,branch=0,schedule='nonuniform',center=1", "--samples", "2",
            "--seeds", "0", "--reference", "dpm++2m:6", "--check-steps", "5", "--budgets", "3",
            "--out-dir", str(tmp_path), "--no-plot"]
    rows = fs.main(argv)
    first = (tmp_path / "fidelity_none.md").read_text()
    assert "ran 6 of them" in first  # reference, check, 3 rows and the plain partner of the dcfx rows
    assert "| budget | best plain |" in first and "Goal met at 0 of 1 budgets" in first
    dc = [r for r in rows if r.method.config is not None and r.method.kind == "uniform DeepCache"]
    assert {r.history for r in dc} == {"FSFS"}
    assert dc[0].cost == pytest.approx(2 + 2 * analysis.shallow_fractions(None, [0], 1.5)[0])
    assert "| 3 | DPM-Solver++ 2M 3 (3.00) |" in first  # the verdict names the row that won
    csv_lines = (tmp_path / "fidelity_none.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 and csv_lines[0].startswith("label,family,kind,scheduler,steps,config,seed")
    capsys.readouterr()
    fs.main(argv)
    second = (tmp_path / "fidelity_none.md").read_text()
    assert "ran 0 of them" in second
    assert second.split("\n", 1)[1] == first.split("\n", 1)[1]  # same tables from the finished tasks


def test_frontier_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for seed in (0, 1):
        for steps in (4, 8):
            for m in (Method("unipc", steps), Method("unipc", 2 * steps, DeepCacheConfig(interval=2))):
                cost = float(steps) if m.config is None else steps * 1.1
                rows.append(analysis.Row(m, seed, "", cost, 0.0, {"psnr_ref": 20 + steps + seed, "accuracy": 0.9}))
    report.plot(rows, tmp_path / "f.png", [5, 7], "test")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_ddim50_grid_matches_plain_ddim_at_the_same_cost():
    # Uniform N=n at 50 steps runs ceil(50/n) full steps; the rest cost the branch's fraction.
    rows = methods.ddim50_grid({0: 0.1, 1: 0.28, 3: 0.6})
    matched = {rows[i].label: rows[i + 1].steps for i in range(1, len(rows), 2)}
    assert matched["DDIM 50 + DeepCache uniform N=3 b=0"] == 20  # 17 + 33 * 0.1
    assert matched["DDIM 50 + DeepCache uniform N=5 b=0"] == 14  # 10 + 40 * 0.1
    assert matched["DDIM 50 + DeepCache uniform N=2 b=1"] == 32  # 25 + 25 * 0.28
    assert matched["DDIM 50 + DeepCache uniform N=2 b=3"] == 40  # 25 + 25 * 0.6
    assert all(m.scheduler == "ddim" and m.steps <= 50 for m in rows)


@pytest.mark.trained
def test_shallow_fractions_grow_with_the_branch():
    f = analysis.shallow_fractions(None, [0, 1, 3], 1.5)
    assert 0 < f[0] < f[1] < f[3] < 1

def test_ray_without_an_address_starts_an_instance_of_its_own(tmp_path, monkeypatch):
    # The tasks themselves run on Ray in tests/test_serve.py, joining dcfx serve's cluster by
    # address; here `--ray` alone must ask for a new local instance, never one found running.
    ray = pytest.importorskip("ray")
    asked = []

    def init(**kwargs):
        asked.append(kwargs)
        raise ConnectionAbortedError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ConnectionAbortedError):
        tasks.execute(_study(), TASKS[:1], tmp_path, ray_address="")
    assert asked[0]["address"] == "local" and not list(tmp_path.iterdir())
