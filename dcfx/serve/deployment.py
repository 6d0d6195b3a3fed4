"""Ray Serve: the replicas (`DiffusionDeployment`), the HTTP ingress in front of them
(`HTTPIngress`) and the application of both (`app`). The only module of `dcfx.serve` that
imports Ray.

HTTP reaches `HTTPIngress`, which hands each request to a replica through Serve's router. A
replica holds at most `max_batch_size` requests; up to `max_queued_requests` more wait in the
router (Serve's `max_queued_requests`), and a request beyond those gets HTTP 503 with a
Retry-After header at once. A request not answered `request_timeout_s` after it arrived gets
504, and is taken out of the router's queue or its replica's batch queue (a replica also skips
a job whose deadline has passed, or would pass before its group finished: `Service.run`).
A replica that dies under a request gives it a 503 that says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import package as packages
from .options import ServeOptions, resolve
from .service import BadRequest, DeadlineExceeded, Job, Service, count_images


# Requests the ingress may be refusing at one time: each costs it a coroutine, no more.
_REFUSALS_IN_FLIGHT = 256


@serve.deployment
class DiffusionDeployment:
    """The replicas: request bodies in, `@serve.batch` batches of images, `Service` out.

    `answer(method, body, received)` takes an HTTP method, a raw body and the time the request
    arrived (`time.time()`), and returns (HTTP status, JSON-able answer); `HTTPIngress` is its
    front. POST a JSON object: "label" (a class or a list) or "prompt" (a string or a list),
    and optionally "seed" (image i gets seed + i; random when absent), "steps", "guidance" and
    "dcfx" (a setting name: "off", "3:0", ...). The answer: "images" (label or prompt, seed,
    base64 PNG each), "history" ('F'/'S' per U-Net call), "flops" (U-Net FLOPs spent on these
    images), "seconds" (the pipeline call), "queued_seconds" (from arrival to that call),
    "batch_size" (images in that call) and "replica". A bad request gets 400 and
    {"error": "..."}, one past its deadline 504; GET describes what is accepted.
    """

    def __init__(self, options: ServeOptions):
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        self.service = Service(options)
        self.generate.set_max_batch_size(options.max_batch_size)
        self.generate.set_batch_wait_timeout_s(options.batch_wait_s)
        self._replica = serve.get_replica_context().replica_id.unique_id

    async def answer(self, method: str, body: bytes, received: float | None = None) -> tuple[int, dict[str, Any]]:
        if method == "GET":
            return 200, {**self.service.describe(), "replica": self._replica}
        if method != "POST":
            return 405, {"error": f"{method} is not served: POST a JSON request, or GET a description"}
        try:
            job = self.service.parse(json.loads(body), received)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return 400, {"error": f"malformed JSON: {e}"}
        except BadRequest as e:
            return 400, {"error": str(e)}
        result = await self.generate(job)
        if isinstance(result, DeadlineExceeded):
            return 504, {"error": str(result)}
        if isinstance(result, Exception):
            return 500, {"error": f"generation failed: {type(result).__name__}: {result}"}
        return 200, {**result, "replica": self._replica}

    @serve.batch(batch_size_fn=count_images)
    async def generate(self, jobs: list[Job]) -> list[dict[str, Any] | Exception]:
        # The batch runs here, on the replica's event loop, not in a thread: requests that
        # arrive meanwhile wait outside the batch queue, so the next batch takes all of them.
        # (In a thread, Serve would close the next batch batch_wait_s after its first request
        # while this one still runs: with two replicas that halved the batches.)
        return self.service.run(jobs)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class HTTPIngress:
    """HTTP in front of the replicas: forwards each request to a `DiffusionDeployment` replica,
    and answers in JSON what Serve's proxy would say in a bare line or not at all: a full
    queue (503 with Retry-After), a request past its deadline (504, and it is cancelled), a
    replica that died under the request (503; Serve starts a replacement on its own)."""

    def __init__(self, replicas: DeploymentHandle, options: ServeOptions):
        self._replicas = replicas
        self._options = options

    async def __call__(self, request: Request) -> Response:
        received = time.time()
        body = await request.body()
        options, headers = self._options, {}
        response = None
        try:
            response = self._replicas.answer.remote(request.method, body, received)
            status, answer = await asyncio.wait_for(response, options.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            status, answer = 504, {"error": (
                f"not answered within request_timeout_s={options.request_timeout_s:g}: the deployment is busy "
                f"(or the request asks for many steps); send it again later"
            )}
        except BackPressureError:
            status, answer = 503, {"error": (
                f"the deployment is full: its replicas hold {options.replicas * options.max_batch_size} requests "
                f"and {options.max_queued_requests} more wait (max_queued_requests); send it again after "
                f"Retry-After seconds"
            )}
            headers["Retry-After"] = str(math.ceil(options.retry_after_s))
        except RayActorError as e:
            status, answer = 503, {"error": (
                f"the replica running this request stopped ({type(e).__name__}); Serve replaces it: send the "
                f"request again"
            )}
        return JSONResponse(answer, status_code=status, headers=headers)


def app(options: ServeOptions | None = None, **changes: Any) -> serve.Application:
    """The deployment as a Ray Serve application, for `serve.run(app(...))`: an `HTTPIngress`
    (no CPU reserved) in front of `options.replicas` `DiffusionDeployment` replicas, each with
    `cpus_per_replica` CPUs, `gpus_per_replica` GPUs (with a GPU it runs on CUDA) and
    `threads` torch threads (default: its CPUs). `app(settings=["3:0"])` is
    `app(ServeOptions(settings=["3:0"]))`. Paths must exist on every node that runs a replica;
    they and a package's fit are checked here, before any replica starts.

    >>> from ray import serve
    >>> serve.run(app(settings=["3:0", "5:0:nonuniform"], replicas=2))  # doctest: +SKIP
    """
    options = resolve(options, **changes)
    for name in ("model", "package"):
        path = getattr(options, name)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{name} {path}: no such file or folder")
    if options.package is not None:
        packages.check(options)  # the replicas would refuse it too
    options = dataclasses.replace(
        options,
        model=None if options.model is None else str(Path(options.model).resolve()),
        package=None if options.package is None else str(Path(options.package).resolve()),
        threads=options.threads or max(1, int(options.cpus_per_replica)),
    )
    queued = options.max_queued_requests
    replicas = DiffusionDeployment.options(
        num_replicas=options.replicas,
        # A replica running a full batch takes no more: new requests go to an idle replica, or
        # wait in Serve's router (up to max_queued_requests) and reach this one together.
        max_ongoing_requests=options.max_batch_size,
        max_queued_requests=-1 if queued is None else queued,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
    ).bind(options)
    # Room for every request the replicas hold or queue and for a burst of refusals on their way
    # out: the bound is the replicas' queue. Serve's proxy may queue a burst for the ingress a
    # moment (its count lags the assignments, so a bound as small as the replicas' would refuse
    # early); beyond that it refuses the same way (503 with Retry-After), in a line of text.
    held = options.replicas * options.max_batch_size
    ingress = HTTPIngress.options(
        max_ongoing_requests=held + (queued or 0) + _REFUSALS_IN_FLIGHT,
        max_queued_requests=_REFUSALS_IN_FLIGHT,
        backpressure_config=BackpressureConfig(retry_after_s=options.retry_after_s),
    )
    return ingress.bind(replicas, options)
