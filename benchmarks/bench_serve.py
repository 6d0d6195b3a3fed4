"""Serving under load and under faults: `dcfx.serve` on a local Ray cluster, over loopback HTTP.

    python benchmarks/bench_serve.py [--requests 16] [--concurrency 4] [--steps 20] [--setting 3:0]
                                     [--max-batch-size 4] [--fault-requests 32] [--cluster-cpus 2]
                                     [--burst 64] [--max-queued-requests 8] [--request-timeout-s 20]
                                     [--long-steps 1000] [--port 8123] [--out FILE]

Every phase is bounded in requests and in time (each request times out after --timeout-s):

1. Load. For 1 and then 2 replicas (1 CPU and 1 torch thread each, batches of up to
   --max-batch-size images), --concurrency closed-loop clients per replica send --requests
   one-image requests per replica (labels 0-9, distinct seeds, --steps DDIM steps, guidance
   1.5), once with dcfx "off" and once with --setting, after an untimed round of each. Reported:
   images per second over the phase, p50 and p95 latency, mean images per batch, U-Net GFLOPs
   per image (from the answers).
2. A replica killed mid-load. With 2 replicas, --fault-requests requests go out from the same
   clients; when a quarter of them have completed, the replica that answered last is killed
   (`ray.kill`, as a crash) a quarter of a batch's time later, in the middle of its next
   batch. Every request ends as completed, refused with an HTTP error (status and message
   counted), or lost (no answer before its timeout). Then: how long until Serve reports both
   replicas running again, and whether a new replica answers.
3. Overload. One replica with a bounded queue (--max-queued-requests) and a deadline
   (--request-timeout-s): --burst one-image requests sent at once, each counted as completed,
   refused (503, with its Retry-After) or past its deadline (504), with the latency of each
   kind; then one --long-steps request and, half a second later, 8 ten-step ones: how long the
   short ones took, and how the long one ended.
4. Bad requests: one of each kind, with the HTTP status and the error message.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

APP = "bench"
DEPLOYMENT = "DiffusionDeployment"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=16, help="timed requests per replica and setting")
    p.add_argument("--concurrency", type=int, default=4, help="client threads per replica")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per image")
    p.add_argument("--setting", default="3:0", help="the dcfx setting compared with off")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--batch-wait-s", type=float, default=0.05)
    p.add_argument("--fault-requests", type=int, default=32, help="requests of the fault phase")
    p.add_argument("--cluster-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--burst", type=int, default=64, help="requests sent at once in the overload phase")
    p.add_argument("--max-queued-requests", type=int, default=8, help="the overload phase's queue bound")
    p.add_argument("--request-timeout-s", type=float, default=20.0, help="the overload phase's deadline")
    p.add_argument("--long-steps", type=int, default=1000, help="steps of the overload phase's long request")
    p.add_argument("--port", type=int, default=8123, help="HTTP port on 127.0.0.1")
    p.add_argument("--timeout-s", type=float, default=180.0, help="a request without an answer by then is lost")
    p.add_argument("--out", type=Path, help="also write the markdown tables to this file")


# -- a client ---------------------------------------------------------------------------------


class Outcome:
    """One request: when it went out and came back, and how it ended (with a refusal's Retry-After)."""

    def __init__(self, started: float, ended: float, status: int | None, answer: dict | None, error: str | None,
                 retry_after: str | None = None):
        self.started, self.ended, self.status, self.answer, self.error = started, ended, status, answer, error
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        if self.status == 200:
            return "completed"
        return "error" if self.status is not None else "lost"


def send(url: str, body: bytes | dict, timeout: float) -> Outcome:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Outcome(started, time.perf_counter(), r.status, json.load(r), None)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            message = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            message = text
        return Outcome(started, time.perf_counter(), e.code, None, " ".join(str(message).split())[:160],
                       e.headers.get("Retry-After"))
    except (urllib.error.URLError, OSError) as e:  # refused, reset or timed out: no answer
        return Outcome(started, time.perf_counter(), None, None, f"{type(e).__name__}: {e}"[:160])


def load(url: str, bodies: list[dict], concurrency: int, timeout: float, on_done=None) -> list[Outcome]:
    """Closed loop: `concurrency` clients, each sending its next body once the last one returned."""
    todo = collections.deque(bodies)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                body = todo.popleft()
            outcome = send(url, body, timeout)
            with lock:
                outcomes.append(outcome)
                done = len(outcomes)
            if on_done is not None:
                on_done(done, outcome)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return outcomes


def bodies(n: int, steps: int, setting: str, first_seed: int) -> list[dict]:
    return [{"label": i % 10, "seed": first_seed + i, "steps": steps, "dcfx": setting} for i in range(n)]


# -- phases -----------------------------------------------------------------------------------


def deploy(serve, dcfx_serve, args: argparse.Namespace, replicas: int, **options) -> None:
    application = dcfx_serve.app(
        settings=[args.setting], max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_s,
        replicas=replicas, cpus_per_replica=1, threads=1, **options,
    )
    started = time.perf_counter()
    serve.run(application, name=APP, route_prefix="/", logging_config={"enable_access_log": False})
    print(f"[deploy] {replicas} replica(s) running after {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def measure(url: str, args: argparse.Namespace, replicas: int, setting: str, seed: int) -> dict:
    clients = args.concurrency * replicas
    load(url, bodies(clients, args.steps, setting, 10**6 + seed), clients, args.timeout_s)  # untimed round
    outcomes = load(url, bodies(args.requests * replicas, args.steps, setting, seed), clients, args.timeout_s)
    failed = [o for o in outcomes if o.kind != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed under plain load: {failed[0].status} {failed[0].error}")
    latency = np.array([o.ended - o.started for o in outcomes])
    span = max(o.ended for o in outcomes) - min(o.started for o in outcomes)
    answers = [o.answer for o in outcomes]
    row = {
        "replicas": replicas,
        "dcfx": setting,
        "requests": len(outcomes),
        "clients": clients,
        "images_per_s": len(outcomes) / span,
        "p50_s": float(np.percentile(latency, 50)),
        "p95_s": float(np.percentile(latency, 95)),
        "batch": float(np.mean([a["batch_size"] for a in answers])),
        "gflops": float(np.mean([a["flops"] for a in answers])) / 1e9,
        "history": answers[0]["history"],
        "replicas_seen": len({a["replica"] for a in answers}),
    }
    print(f"[load] {row}", file=sys.stderr, flush=True)
    return row


def replica_actors(ray) -> list[str]:
    """The Ray actor names of the model's replicas (not the HTTP ingress)."""
    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if a["namespace"] == "serve" and a["name"].startswith(prefix))


def running_replicas(serve) -> int:
    app = serve.status().applications.get(APP)
    deployment = app.deployments.get(DEPLOYMENT) if app is not None else None
    return deployment.replica_states.get("RUNNING", 0) if deployment is not None else 0


def fault(url: str, ray, serve, args: argparse.Namespace) -> dict:
    before = replica_actors(ray)
    if len(before) != 2:
        raise RuntimeError(f"expected 2 replicas before the fault, found {before}")
    killed: dict = {}
    lock = threading.Lock()

    def kill(name: str, done: int) -> None:
        killed.update(name=name, at=time.perf_counter(), after=done)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        print(f"[fault] killed {name} after {done} completed request(s)", file=sys.stderr, flush=True)

    def on_done(done: int, outcome: Outcome) -> None:
        # The replica that just answered takes its next batch at once: kill it a quarter of a
        # batch's time later, in the middle of that batch.
        if done < args.fault_requests // 4 or outcome.answer is None:
            return
        with lock:
            if "timer" in killed:
                return
            name = next(n for n in before if n.endswith("#" + outcome.answer["replica"]))
            killed["timer"] = threading.Timer(outcome.answer["seconds"] / 4, kill, (name, done))
        killed["timer"].start()

    outcomes = load(url, bodies(args.fault_requests, args.steps, args.setting, 5000), 2 * args.concurrency,
                    args.timeout_s, on_done)
    if "timer" in killed:
        killed["timer"].join()
    if "name" not in killed:
        raise RuntimeError("no replica was killed: too few --fault-requests completed")
    victim = killed["name"]
    # Recovered: the killed replica is gone, a new one took its place, and Serve runs two.
    deadline = time.perf_counter() + args.timeout_s
    while True:
        names = replica_actors(ray)
        recovered = victim not in names and bool(set(names) - set(before)) and running_replicas(serve) >= 2
        if recovered or time.perf_counter() > deadline:
            break
        time.sleep(0.5)
    recovery_s = time.perf_counter() - killed["at"] if recovered else None
    after = load(url, bodies(4 * args.concurrency, args.steps, args.setting, 9000), 2 * args.concurrency, args.timeout_s)
    victim_id = victim.rsplit("#", 1)[-1]
    served_by = {o.answer["replica"] for o in outcomes + after if o.answer}
    counts = collections.Counter(o.kind for o in outcomes)
    errors = collections.Counter(f"HTTP {o.status}: {o.error}" for o in outcomes if o.kind == "error")
    lost = collections.Counter(o.error for o in outcomes if o.kind == "lost")
    result = {
        "sent": len(outcomes),
        "killed_after": killed["after"],
        "completed": counts["completed"],
        "error": counts["error"],
        "lost": counts["lost"],
        "errors": dict(errors),
        "lost_reasons": dict(lost),
        "recovered": recovered,
        "recovery_s": recovery_s,
        "after_completed": sum(o.kind == "completed" for o in after),
        "after_sent": len(after),
        "new_replica_answered": bool({o.answer["replica"] for o in after if o.answer} - {n.rsplit("#", 1)[-1] for n in before}),
        "victim_answered_after_kill": victim_id in {o.answer["replica"] for o in after if o.answer},
        "replicas_seen": len(served_by),
    }
    print(f"[fault] {result}", file=sys.stderr, flush=True)
    return result


def overload(url: str, args: argparse.Namespace) -> dict:
    """A burst at one replica, then a long request ahead of short ones (see the docstring)."""
    started = time.perf_counter()
    burst = bodies(args.burst, args.steps, args.setting, 7000)
    with concurrent.futures.ThreadPoolExecutor(len(burst)) as pool:
        outcomes = list(pool.map(lambda b: send(url, b, args.timeout_s), burst))
    by_status = collections.defaultdict(list)
    for o in outcomes:
        by_status[o.status].append(o)
    latency = {status: [o.ended - o.started for o in group] for status, group in by_status.items()}
    result = {
        "burst": len(outcomes),
        "counts": {str(k): len(v) for k, v in sorted(by_status.items(), key=lambda kv: str(kv[0]))},
        "p50_s": {str(k): float(np.percentile(v, 50)) for k, v in latency.items()},
        "max_s": {str(k): max(v) for k, v in latency.items()},
        "retry_after": sorted({o.retry_after for o in by_status.get(503, [])} - {None}),
        "errors": dict(collections.Counter(o.error for o in outcomes if o.error)),
    }
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        long = pool.submit(send, url, {"label": 0, "seed": 1, "steps": args.long_steps, "dcfx": args.setting}, args.timeout_s)
        time.sleep(0.5)
        short = list(pool.map(lambda b: send(url, b, args.timeout_s), bodies(8, 10, args.setting, 8000)))
        long = long.result()
    result.update({
        "long_status": long.status,
        "long_s": long.ended - long.started,
        "long_error": long.error,
        "short_statuses": dict(collections.Counter(o.status for o in short)),
        "short_max_s": max(o.ended - o.started for o in short),
        "seconds": time.perf_counter() - started,
    })
    print(f"[overload] {result}", file=sys.stderr, flush=True)
    return result


BAD_REQUESTS = [
    ("unknown label", {"label": 12}),
    ("0 steps", {"label": 3, "steps": 0}),
    ("negative steps", {"label": 3, "steps": -4}),
    ("batch larger than allowed", {"label": [1, 2, 3, 4, 5, 6, 7, 8, 9]}),
    ("unknown dcfx setting", {"label": 3, "dcfx": "4:1"}),
    ("malformed JSON", b'{"label": 3, "steps": '),
    ("unknown field", {"label": 3, "sed": 1}),
    ("prompt to the digits model", {"prompt": "a three"}),
]


def bad_requests(url: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, body in BAD_REQUESTS:
        o = send(url, body, args.timeout_s)
        rows.append({"request": name, "body": body.decode() if isinstance(body, bytes) else json.dumps(body),
                     "status": o.status, "error": o.error})
    return rows


# -- report -----------------------------------------------------------------------------------


def report(args: argparse.Namespace, rows: list[dict], faults: dict, over: dict, bad: list[dict], seconds: float,
           loads: tuple) -> str:
    import ray
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -P`
    from bench_package import _cpu  # its neighbour in benchmarks/

    command = " ".join(["python benchmarks/bench_serve.py", *sys.argv[1:]])
    lines = [
        f"Digits model (`dcfx.models.digits()`), one image per request, {args.steps} DDIM steps, guidance 1.5, "
        f"batches of up to {args.max_batch_size} images (wait {args.batch_wait_s:g} s); each replica 1 CPU and 1 torch "
        f"thread; {args.concurrency} closed-loop clients per replica; loopback HTTP. {_cpu()}, {os.cpu_count()} cores "
        f"shared with other work (load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end), "
        f"torch {torch.__version__}, Ray {ray.__version__}. `{command}`: {seconds / 60:.1f} min in all.",
        "",
        "| replicas | dcfx | requests | images/s | p50 latency s | p95 latency s | images per batch | U-Net GFLOPs per image | steps |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['replicas']} | {r['dcfx']} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | "
            f"{r['p95_s']:.2f} | {r['batch']:.2f} | {r['gflops']:.2f} | `{r['history']}` |"
        )
    f = faults
    recovery = f"{f['recovery_s']:.1f} s after the kill" if f["recovered"] else f"not within {args.timeout_s:g} s"
    lines += [
        "",
        f"Replica killed mid-load (2 replicas, dcfx {args.setting}, {f['sent']} requests, `ray.kill` of one replica "
        f"after {f['killed_after']} had completed):",
        "",
        "| sent | completed | refused with an error | lost (no answer) |",
        "|---:|---:|---:|---:|",
        f"| {f['sent']} | {f['completed']} | {f['error']} | {f['lost']} |",
        "",
    ]
    for message, n in f["errors"].items():
        lines.append(f"- {n} x {message}")
    for message, n in f["lost_reasons"].items():
        lines.append(f"- lost, {n} x {message}")
    lines += [
        f"- Serve reported 2 running replicas again {recovery}; afterwards {f['after_completed']} of "
        f"{f['after_sent']} requests completed, a new replica answered: {'yes' if f['new_replica_answered'] else 'no'}, "
        f"the killed one: {'yes' if f['victim_answered_after_kill'] else 'no'}.",
        "",
        f"Overload (1 replica, dcfx {args.setting}, max_queued_requests={args.max_queued_requests}, "
        f"request_timeout_s={args.request_timeout_s:g}): {over['burst']} requests of {args.steps} steps at once.",
        "",
        "| HTTP status | requests | p50 latency s | max latency s |",
        "|---|---:|---:|---:|",
    ]
    for status, n in over["counts"].items():
        lines.append(f"| {status} | {n} | {over['p50_s'][status]:.2f} | {over['max_s'][status]:.2f} |")
    lines += [""] + [f"- {n} x {message}" for message, n in over["errors"].items()]
    lines += [
        f"- Retry-After of the 503s: {', '.join(over['retry_after']) or 'none'} s.",
        f"- One {args.long_steps}-step request, then 8 ten-step ones: the long one ended with HTTP "
        f"{over['long_status']} after {over['long_s']:.1f} s{' (' + over['long_error'] + ')' if over['long_error'] else ''}; "
        f"the short ones: {over['short_statuses']}, the last after {over['short_max_s']:.1f} s.",
        "",
        "Bad requests:",
        "",
        "| request | body | HTTP status | error |",
        "|---|---|---:|---|",
    ]
    for b in bad:
        lines.append(f"| {b['request']} | `{b['body']}` | {b['status']} | {b['error']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    for name in ("requests", "concurrency", "steps", "max_batch_size", "fault_requests", "cluster_cpus", "burst",
                 "max_queued_requests", "long_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.cluster_cpus < 2:
        parser.error("--cluster-cpus must be >= 2: the phases run two replicas of 1 CPU")
    import ray
    from ray import serve

    import dcfx.serve as dcfx_serve

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    url = f"http://127.0.0.1:{args.port}/"
    ray.init(address="local", num_cpus=args.cluster_cpus, include_dashboard=False)  # a new cluster of its own
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        rows = []
        for replicas in (1, 2):
            deploy(serve, dcfx_serve, args, replicas)
            for i, setting in enumerate(("off", args.setting)):
                rows.append(measure(url, args, replicas, setting, seed=1000 * (2 * replicas + i)))
        faults = fault(url, ray, serve, args)
        bad = bad_requests(url, args)
        deploy(serve, dcfx_serve, args, 1, max_queued_requests=args.max_queued_requests,
               request_timeout_s=args.request_timeout_s)
        over = overload(url, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    table = report(args, rows, faults, over, bad, time.perf_counter() - started, (load_start, os.getloadavg()[0]))
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
