"""dcfx serve without Ray: the options record and its checks, the service's deadline (a job
whose deadline has passed, or would pass before its group finished, is answered with
`DeadlineExceeded` and not run), the order of a batch's groups, the step limit, and that the
service imports where Ray cannot be imported at all.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcfx.serve import OFF, BadRequest, DeadlineExceeded, Service, ServeOptions, parse_setting

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60.0  # the options' default deadline; tests place a job's arrival to reach it


@pytest.mark.subprocess
def test_the_service_imports_where_ray_cannot_be_imported():
    # `sys.modules["ray"] = None` makes every `import ray` fail, as where Ray is not installed.
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "import dcfx.serve\n"
        "from dcfx.serve import Service, ServeOptions, build_package, DeadlineExceeded\n"
        "assert Service.__module__ == 'dcfx.serve.service' and ServeOptions().max_batch_size == 4\n"
        "try:\n"
        "    dcfx.serve.app\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'dcfx.serve.app needs Ray Serve, which is not installed: pip install "dcfx[serve]"' in out.stdout


@pytest.mark.parametrize("changes,says", [
    ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
    ({"replicas": 1.5}, "replicas must be an integer >= 1"),
    ({"max_steps": 0}, "max_steps must be an integer >= 1"),
    ({"max_queued_requests": 0}, "max_queued_requests must be an integer >= 1"),
    ({"request_timeout_s": 0}, "request_timeout_s must be a finite number > 0"),
    ({"batch_wait_s": -1}, "batch_wait_s must be a finite number >= 0"),
    ({"cpus_per_replica": 0}, "cpus_per_replica must be a finite number > 0"),
    ({"retry_after_s": float("inf")}, "retry_after_s must be a finite number >= 0"),
    ({"threads": 0}, "threads must be an integer >= 1"),
    ({"settings": "3:0"}, "settings must be a sequence of setting strings"),
    ({"settings": ["turbo"]}, "setting 'turbo' must be N:B"),
    ({"settings": ["cut:0:0.15"]}, "is adaptive, which dcfx serve does not offer"),
    ({"package": "x.pt2", "compile": True}, "compiled already"),
])
def test_bad_options_name_the_valid_range(changes, says):
    with pytest.raises(ValueError) as e:
        ServeOptions(**changes)
    assert says in str(e.value)


def test_options_keep_canonical_setting_names_and_take_keywords():
    options = ServeOptions(settings=["3:0:uniform", "3:0", " OFF ", "2:0:f1"], request_timeout_s=None)
    assert options.settings == ("3:0", OFF, "2:0:f1") and options.request_timeout_s is None
    assert list(options.configs) == ["3:0", OFF, "2:0:f1"] and options.configs["2:0:f1"].forecast == 1
    assert parse_setting("5:2:nonuniform")[0] == "5:2:nonuniform"
    with pytest.raises(TypeError, match="unknown option"):
        Service(max_batch=2)


@pytest.fixture(scope="module")
def service() -> Service:
    return Service(settings=["3:0"], max_batch_size=2, max_steps=20, warm_up=False)


def arrived(seconds_left: float) -> float:
    """The arrival time of a request whose deadline is `seconds_left` from now."""
    return time.time() - TIMEOUT_S + seconds_left


def test_a_job_past_its_deadline_is_not_run(service, monkeypatch):
    ran = []
    monkeypatch.setitem(service.pipes, "3:0", lambda *a, **k: ran.append(k) or pytest.fail("a late job ran"))
    late = service.parse({"label": 3, "steps": 2}, received=arrived(-1))
    on_time = service.parse({"label": 4, "steps": 2, "dcfx": OFF}, received=arrived(TIMEOUT_S))
    assert late.deadline == pytest.approx(late.received + TIMEOUT_S)
    refused, served = service.run([late, on_time])
    assert isinstance(refused, DeadlineExceeded) and ran == []
    assert f"not started within request_timeout_s={TIMEOUT_S:g}: it waited" in str(refused)
    assert served["history"] == "FF" and len(served["images"]) == 1


def test_a_job_that_would_end_after_its_deadline_is_not_run(service):
    [first] = service.run([service.parse({"label": 3, "steps": 4, "dcfx": OFF})])  # measures a step
    per_step = first["seconds"] / 4
    # 20 steps of that pace would end after a deadline half as far away: refused at once.
    [refused] = service.run([service.parse({"label": 5, "steps": 20, "dcfx": OFF}, received=arrived(10 * per_step))])
    assert isinstance(refused, DeadlineExceeded) and "20 steps would take about" in str(refused)


def test_a_batch_runs_its_shortest_group_first(service):
    longer = service.parse({"label": 1, "seed": 0, "steps": 6, "dcfx": OFF})
    shorter = service.parse({"label": 2, "seed": 0, "steps": 2, "dcfx": OFF})
    first, second = service.run([longer, shorter])
    assert (first["history"], second["history"]) == ("F" * 6, "FF")  # answers in the order asked
    assert second["queued_seconds"] < first["queued_seconds"]  # ... the 2-step call ran first


def test_steps_are_bounded_by_max_steps(service):
    with pytest.raises(BadRequest, match=r"steps must be an integer in 1..20 \(this deployment's max_steps\), got 21"):
        service.parse({"label": 1, "steps": 21})
    assert service.describe()["max_steps"] == 20
    with pytest.raises(ValueError, match=r"max_steps must be <= 1000 \(the scheduler's training steps\)"):
        Service(max_steps=1001, warm_up=False)


def test_a_unet_folder_is_refused(tmp_path):
    from _tiny_unet import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="is not a diffusers pipeline folder"):
        Service(model=tmp_path, warm_up=False)
