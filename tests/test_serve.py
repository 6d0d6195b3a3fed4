"""dcfx serve: requests checked with clear messages, batching that leaves each image as the local
pipeline draws it, a diffusers text-to-image folder served with prompts, and `dcfx serve` itself:
a local Ray cluster with one replica answering HTTP, refusing what its queue cannot take with
503 and Retry-After, stopped by Ctrl-C without leaving a process behind. The fidelity study's
Ray path joins that cluster.

One local Ray instance serves all of it: `dcfx serve` starts when the module does (Ray, Serve
and the replica's warm-up take about 25 s); the in-process tests and then the study's tasks
run meanwhile, and the HTTP tests use the running deployment.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import package, tiny_study
from _tiny_unet import float32_noise
from _tolerance import assert_float32_close

pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "dcfx[serve]"; the test extra has it)')

import dcfx  # noqa: E402
from dcfx import DeepCacheConfig  # noqa: E402
from dcfx.models import digits, load  # noqa: E402
from dcfx.serve import OFF, BadRequest, Service, parse_setting  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH = 2
# Requests that may wait for the replica besides the MAX_BATCH it holds. Serve's router may
# refuse a request when more than this many arrive at once, so no other test sends more.
MAX_QUEUED = 4
STEPS = 6  # N=3: FSSFSS
START_TIMEOUT_S = 240  # a loaded 2-core machine; ready in about 30-45 s
# One level of an 8-bit image. A batched image differs from the one-image call by float32
# rounding only (the CPU's GEMMs sum in another order for another row count), checked against
# a float64 run (tests/_tolerance.py) and to be less than a level: so in the PNGs it is at
# most one level away (both round to the nearest level).
LEVEL = 1 / 255


# -- the server, started first --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dcfx serve` in its own session (so Ctrl-C can go to its whole process group, as a
    terminal sends it, and leftovers can be found), its stdout lines on a queue."""

    def __init__(self):
        self.port = _free_port()
        env = {
            **os.environ,
            # The replica and the study's tasks at the priority of the other pytest worker (Ray
            # lowers its workers' to nice 15: beside a busy worker they would wait for the CPU).
            "RAY_worker_niceness": "0",
            # This process joins the cluster by address, and Ray reads the mode once, on import
            # (already done here): a loopback cluster of the test's own needs no token.
            "RAY_AUTH_MODE": "disabled",
        }
        self.process = subprocess.Popen(
            # Two CPUs: the replica's and one for the study's tasks.
            [sys.executable, "-P", "-m", "dcfx", "serve", "--num-cpus", "2", "--max-batch-size", str(MAX_BATCH),
             "--batch-wait-s", "0.5", "--settings", "3:0", "--max-queued-requests", str(MAX_QUEUED),
             "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, self.errors.append), daemon=True).start()
        self.seen: list[str] = []

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line)
        put(None)

    def wait_line(self, prefix: str) -> str:
        """The first line of its stdout that starts with `prefix`, waiting for it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any(line.startswith(prefix) for line in self.seen):
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"dcfx serve did not print {prefix!r} in {START_TIMEOUT_S} s:\n{self.stderr_tail()}")
            if line is None:
                pytest.fail(f"dcfx serve exited ({self.process.wait()}) before printing {prefix!r}:\n{self.stderr_tail()}")
            self.seen.append(line)
        return next(line for line in self.seen if line.startswith(prefix))

    def cluster(self) -> str:
        """The local Ray cluster's address."""
        return re.match(r"dcfx serve: local Ray cluster at (\S+);", self.wait_line("dcfx serve: local Ray cluster at ")).group(1)

    def wait_ready(self) -> str:
        """The deployment's URL, once it serves."""
        return self.wait_line("dcfx serve: http://").split()[2]

    def stderr_tail(self, lines: int = 80) -> str:
        return "".join(line for line in self.errors[-lines:] if line)

    def session_processes(self) -> list[str]:
        out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.split()[1:2] == [str(self.process.pid)]]


@pytest.fixture(scope="module", autouse=True)
def server():
    s = Server()
    yield s
    if s.process.poll() is None:  # a test failed before Ctrl-C: stop it all the same
        os.killpg(s.process.pid, signal.SIGINT)
        try:
            s.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(s.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.wait_ready()


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    status, answer, _ = post_with_headers(url, body)
    return status, answer


def post_with_headers(url: str, body: bytes | dict) -> tuple[int, dict, Message]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.load(r), r.headers
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text), e.headers
        except ValueError:  # Serve's proxy answers in a line of text
            return e.code, {"error": text}, e.headers


def pixels(png_base64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))), dtype=np.int16)


# -- in-process: the Service ----------------------------------------------------------------


@pytest.fixture(scope="module")
def service() -> Service:
    return Service(settings=["3:0"], max_batch_size=MAX_BATCH, warm_up=False)


@pytest.fixture(scope="module")
def pipe(service):
    """The local pipeline: `dcfx.models.digits()`, as the service loaded it (so that dcfx's
    captures of its U-Net are shared, not made twice)."""
    assert type(service.pipe) is type(digits())
    return service.pipe


def test_settings_have_one_name_and_bad_ones_say_the_form():
    assert parse_setting("3:0:uniform")[0] == "3:0"
    assert parse_setting(" OFF ") == (OFF, None)
    name, config = parse_setting("5:2:nonuniform")
    assert (name, config.interval, config.branch, config.schedule) == ("5:2:nonuniform", 5, 2, "nonuniform")
    for bad, says in [("fast", "INTERVAL:BRANCH"), ("0:0", "interval must be"), ("3:0:quad", "schedule must be"), (3, "string")]:
        with pytest.raises(ValueError, match=says):
            parse_setting(bad)


@pytest.mark.parametrize("body,says", [
    ({"label": 12}, "unknown label(s) 12: this model draws the classes 0..9"),
    ({"label": [1, -1]}, "unknown label(s) -1"),
    ({"label": 3, "steps": 0}, "steps must be an integer in 1..1000"),
    ({"label": 3, "steps": -5}, "steps must be an integer in 1..1000"),
    ({"label": 3, "steps": 2.5}, "steps must be an integer"),
    ({"label": [1, 2, 3]}, f"at most {MAX_BATCH} images"),
    ({"label": 3, "dcfx": "4:0"}, "'4:0' is not served here; this deployment offers 3:0, off"),
    ({"label": 3, "dcfx": "turbo"}, "offers the dcfx settings 3:0, off"),
    ({"label": 3, "seeds": 1}, "unknown field(s) 'seeds'; valid fields are label, prompt, seed"),
    ({"prompt": "a three"}, "takes 'label', not 'prompt'"),
    ({"steps": 10}, "the field 'label' is missing"),
    ({"label": 3, "seed": -1}, "seed must be an integer"),
    ({"label": 3, "guidance": float("nan")}, "guidance must be a finite number"),
    ([3], "must be a JSON object"),
])
def test_bad_requests_name_the_problem_and_the_valid_choices(service, body, says):
    with pytest.raises(BadRequest) as e:
        service.parse(body)
    assert says in str(e.value)


def test_a_request_gets_defaults_and_one_seed_per_image(service):
    job = service.parse({"label": [4, 2], "seed": 7})
    assert job.seeds == (7, 8) and job.steps == 50 and job.guidance == 1.5 and job.setting == "3:0"
    assert service.parse({"label": 1}).seeds[0] >= 0  # drawn, and returned with the image
    assert service.describe()["dcfx"] == ["3:0", OFF]


def float64_images(setting: str, labels: list, seeds: list[int], steps: int, guidance: float,
                   model: str | None = None) -> torch.Tensor:
    """What `Service._generate(setting, ...)` draws, run on float64 copies of the digits
    pipeline's models (`model`, a folder, or the embedded one) from the same (float32) noise.
    The pipeline returns its images in float32: one rounding at the end, far below float32's
    error over the steps."""
    pipe = digits() if model is None else load(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch.float64)
    _, config = parse_setting(setting)
    if config is not None:
        dcfx.enable(pipe, config)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with float32_noise():
        return pipe(labels, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt").images


@pytest.mark.parametrize("setting", ["3:0", OFF])
def test_batching_leaves_each_image_as_its_own_seed_draws_it(service, setting):
    def draw(labels, seeds):
        return service._generate(setting, labels, seeds, STEPS, 1.5, output_type="pt")

    alone, history = draw([3], [11])
    first, _ = draw([3, 5], [11, 0])
    second, _ = draw([9, 3], [4, 11])
    assert history == ("FSSFSS" if setting != OFF else "F" * STEPS)
    # Same batch size, another batch-mate and position: bit for bit.
    torch.testing.assert_close(first[0], second[1], rtol=0, atol=0)
    # Another batch size: the GEMMs' summation order differs, nothing else.
    assert_float32_close(first[0], alone[0], float64_images(setting, [3], [11], STEPS, 1.5)[0], what="batched")
    assert (first[0] - alone[0]).abs().max() < LEVEL  # what the PNG comparison below relies on
    assert (first[1] - alone[0]).abs().max() > 0.1  # a batch-mate is another image


def test_a_batch_is_grouped_by_setting_and_steps(service):
    jobs = [
        service.parse({"label": 3, "seed": 0, "steps": STEPS}),
        service.parse({"label": [5, 6], "seed": 1, "steps": STEPS, "dcfx": OFF}),
        service.parse({"label": 7, "seed": 2, "steps": STEPS}),
        service.parse({"label": 8, "seed": 3, "steps": 4}),
    ]
    first, plain, second, shorter = service.run(jobs)
    assert (first["batch_size"], first["history"]) == (2, "FSSFSS") and second["history"] == "FSSFSS"
    assert (plain["batch_size"], plain["history"], plain["dcfx"]) == (2, "F" * STEPS, OFF)
    assert (shorter["batch_size"], shorter["history"]) == (1, "FSSF")
    assert [i["seed"] for i in plain["images"]] == [1, 2]
    # FLOPs per image: plain pays STEPS full calls; N=3 two full and four shallow ones (FSSFSS).
    full = plain["flops"] // (2 * STEPS)
    shallow = (first["flops"] - 2 * full) // 4
    assert first["flops"] == second["flops"] == 2 * full + 4 * shallow
    assert 0 < shallow < full / 5  # branch 0: the outermost layers only
    assert shorter["flops"] == 2 * full + 2 * shallow  # FSSF


def test_a_failing_group_fails_its_own_requests_only(service, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(service.pipes, "3:0", broken)
    failed, served = service.run([
        service.parse({"label": 3, "steps": 2}),
        service.parse({"label": 4, "steps": 2, "dcfx": OFF}),
    ])
    assert isinstance(failed, RuntimeError) and "out of memory" in str(failed)
    assert served["history"] == "FF" and len(served["images"]) == 1


# A tokenizer of single letters, so a text-to-image folder can be made without a download.
def _tiny_text_pipeline(folder: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from _tiny_unet import tiny_unet

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab.update({c: 2 + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": 2 + len(letters) + i for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    vae = AutoencoderKL(
        latent_channels=4, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=8,
    ).eval()
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
    ).save_pretrained(folder / "pipeline")


def test_a_text_to_image_folder_is_served_with_prompts(tmp_path):
    _tiny_text_pipeline(tmp_path)
    served = Service(model=tmp_path / "pipeline", settings=["2:0"], max_batch_size=2, warm_up=False)
    with pytest.raises(BadRequest, match="takes 'prompt', not 'label'"):
        served.parse({"label": 3})
    assert served.parse({"prompt": ["a cat", "dog"], "seed": 5}).inputs == ("a cat", "dog")
    [result] = served.run([served.parse({"prompt": "a cat", "seed": 5, "steps": 4})])
    assert result["history"] == "FSFS" and result["images"][0]["prompt"] == "a cat"

    local = served.pipe  # StableDiffusionPipeline.from_pretrained(folder), as a user loads it
    dcfx.enable(local, interval=2, branch=0)
    try:
        ref = local("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(5)).images[0]
    finally:
        dcfx.disable(local)
    assert np.array_equal(pixels(result["images"][0]["png"]), np.asarray(ref))


# -- the fidelity study's Ray path, on the same cluster ---------------------------------------


def test_the_study_on_the_served_cluster_gives_the_serial_images_bit_for_bit(server, tmp_path):
    # `fidelity_study.py --ray ADDRESS`: a plain and a dcfx task, while the replica warms up.
    # Serve places the replica seconds after it starts, during the in-process tests; its
    # cluster then has one CPU left, so one Ray worker runs both tasks (Python, torch and
    # diffusers start once).
    fs = package("study")
    study = tiny_study()
    tasks = [(fs.Method("dpm++2m", 3), 0), (fs.Method("dpm++2m", 4, DeepCacheConfig(interval=2, branch=0)), 1)]
    assert fs.execute(study, tasks, tmp_path / "ray", ray_address=server.cluster()) == 2
    assert fs.execute(study, tasks, tmp_path / "serial") == 2
    for method, seed in tasks:
        name = study.task_key(method, seed)
        ray, serial = (fs.load_task(fs.task_path(tmp_path / where, name)) for where in ("ray", "serial"))
        assert ray["history"] == serial["history"] == ("FSFS" if method.config is not None else "FFF")
        assert ray["images"].tobytes() == serial["images"].tobytes(), method.label
    # Resuming on the Ray path: nothing is pending, so Ray is not even joined.
    assert fs.execute(study, tasks, tmp_path / "ray", ray_address="no cluster here") == 0


# -- over HTTP: the local cluster's replica -------------------------------------------------


def test_served_images_equal_the_local_pipeline(url, pipe):
    alone_status, alone = post(url, {"label": 4, "seed": 21, "steps": STEPS})
    bodies = [
        {"label": [5, 7], "seed": 10, "steps": STEPS},  # two images: one full batch on its own
        {"label": 3, "seed": 0, "steps": STEPS},
        {"label": 1, "seed": 2, "steps": STEPS, "dcfx": OFF},
        {"label": 9, "seed": 3, "steps": STEPS},
    ]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(url, b), bodies))
    assert alone_status == 200 and alone["batch_size"] == 1 and alone["history"] == "FSSFSS"
    assert [status for status, _ in answers] == [200] * len(bodies), answers
    assert answers[0][1]["batch_size"] == 2 and answers[2][1]["history"] == "F" * STEPS

    fast = dcfx.enable(pipe, interval=3, branch=0)
    try:
        ref = pipe(4, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(21)).images[0]
        assert np.array_equal(pixels(alone["images"][0]["png"]), np.asarray(ref))  # both one-image calls
        assert fast.history[-1] == alone["history"]
        expected = {}
        for body in bodies:
            if body.get("dcfx") != OFF:
                labels = body["label"] if isinstance(body["label"], list) else [body["label"]]
                for i, label in enumerate(labels):
                    g = torch.Generator().manual_seed(body["seed"] + i)
                    expected[label] = pipe(label, num_inference_steps=STEPS, generator=g).images[0]
    finally:
        dcfx.disable(pipe)
    expected[1] = pipe(1, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2)).images[0]
    for _, answer in answers:
        for image in answer["images"]:
            difference = np.abs(pixels(image["png"]) - np.asarray(expected[image["label"]], dtype=np.int16))
            assert difference.max() <= 1, image["label"]  # a batch against one image: see LEVEL


def test_bad_requests_get_a_400_naming_the_problem(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        status, described = r.status, json.load(r)
    assert status == 200 and described["dcfx"] == ["3:0", OFF] and described["max_images_per_request"] == MAX_BATCH
    for body, says in [
        ({"label": 10}, "unknown label(s) 10"),
        ({"label": 1, "steps": 0}, "steps must be an integer in 1..1000"),
        ({"label": [1, 2, 3]}, f"at most {MAX_BATCH} images"),
        ({"label": 1, "dcfx": "9:9"}, "offers 3:0, off"),
        (b'{"label": 3,', "malformed JSON"),
    ]:
        status, answer = post(url, body)
        assert status == 400 and says in answer["error"], (body, status, answer)


def test_a_full_queue_answers_503_with_retry_after_and_serves_the_rest(url):
    # At once: more requests than the replica holds (MAX_BATCH) and its queue takes (MAX_QUEUED).
    bodies = [{"label": i % 10, "seed": i, "steps": 30} for i in range(3 * (MAX_BATCH + MAX_QUEUED))]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post_with_headers(url, b), bodies))
    served = [answer for status, answer, _ in answers if status == 200]
    refused = [(answer, headers) for status, answer, headers in answers if status == 503]
    assert len(served) + len(refused) == len(bodies), [status for status, _, _ in answers]
    # The bound holds at each instant: requests that arrive after others were answered find room.
    assert refused and len(served) >= MAX_BATCH
    for answer, headers in refused:
        assert "max_queued_requests" in answer["error"] and headers.get("Retry-After") == "2", (answer, headers)
    assert all(len(answer["images"]) == 1 and answer["history"] == "FSS" * 10 for answer in served)


def test_ctrl_c_stops_the_deployment_and_the_local_cluster(server, url):
    os.killpg(server.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    try:
        code = server.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.kill(server.process.pid, signal.SIGUSR1)  # dcfx serve dumps its threads' stacks
        time.sleep(2)
        pytest.fail(f"dcfx serve did not stop within 90 s of Ctrl-C; its stderr:\n{server.stderr_tail()}")
    assert code == 0, server.stderr_tail()
    assert "dcfx serve: stopping" in server.stderr_tail()
    deadline = time.monotonic() + 30
    while server.session_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.session_processes() == []
