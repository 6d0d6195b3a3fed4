"""`dcfx serve`: a Ray Serve deployment of the digits model (or --model) with DeepCache, over HTTP.

Starts a local Ray cluster and prints its address (other jobs, such as the fidelity study's
`--ray ADDRESS`, may join it while it serves), or joins one with --address; deploys
`dcfx.serve.app` with the given replicas, CPUs or GPUs per replica, batch size and batch wait,
prints the URL and serves until Ctrl-C, which stops the application (and the local cluster).
POST JSON such as {"label": 3, "seed": 0, "steps": 50, "dcfx": "3:0"}; GET describes the accepted fields.
--build-package PATH writes the AOT package (and its record) a deployment with these
options loads with --package PATH, then exits.

Needs Ray Serve: pip install "dcfx[serve]".
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from pathlib import Path

APP_NAME = "dcfx"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a local digits model folder or diffusers text-to-image pipeline folder (default: the embedded digits model)")
    p.add_argument("--settings", nargs="+", default=["3:0"], metavar="N:B[:SCHEDULE]",
                   help="dcfx settings offered besides 'off'; requests default to the first (default: %(default)s)")
    p.add_argument("--package", type=Path, help="an AOT package from --build-package: replicas start without exporting or compiling")
    p.add_argument("--compile", action="store_true", help="torch.compile the dcfx graphs (at each replica's warm-up)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the deployment (default: %(default)s)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default: %(default)s)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves; with one it runs on CUDA (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: its CPUs)")
    p.add_argument("--max-batch-size", type=int, default=4, help="most images per batch, and per request (default: %(default)s)")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="how long a batch waits for more images (default: %(default)s)")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, or HEAD:6379) instead of starting a local one; "
                                     "if Serve runs there already, its HTTP host and port stay")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: Ray's count of this machine's)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--route-prefix", default="/", help="HTTP route of the application (default: %(default)s)")
    p.add_argument("--build-package", type=Path, metavar="PATH",
                   help="write the AOT package for --model, the first of --settings and --max-batch-size, then exit")
    p.add_argument("--force", action="store_true", help="with --build-package: replace a file that dcfx serve did not write")


def run(args: argparse.Namespace) -> None:
    """Builds a package, or serves until interrupted."""
    for name in ("replicas", "max_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ValueError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise SystemExit('dcfx serve: error: Ray Serve is not installed; pip install "dcfx[serve]"') from None
    from .. import serve

    if args.build_package is not None:
        _build_package(serve, args)
        return
    application = serve.app(
        args.model,
        settings=args.settings,
        package=args.package,
        compile=args.compile,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_s,
        num_replicas=args.replicas,
        num_cpus=args.cpus_per_replica,
        num_gpus=args.gpus_per_replica,
        threads=args.threads,
    )
    # Ctrl-C and SIGTERM both end the wait below and run the clean-up, also where this process
    # was started with SIGINT ignored (a parent's disposition is inherited: Python then installs
    # no handler of its own). SIGUSR1 dumps every thread's stack to stderr, for a stop that hangs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.address is None:
        # "local": a new cluster, never one that `ray start` or RAY_ADDRESS points to (Ctrl-C
        # shuts the whole of it down). Its processes start with SIGINT ignored (they inherit
        # it): a terminal's Ctrl-C reaches the whole process group, and a raylet or GCS killed
        # by it leaves this driver's shutdown waiting on them for minutes. This process alone
        # handles Ctrl-C and then stops the cluster.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cluster = ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # Other jobs may share it while it serves (the fidelity study's `--ray ADDRESS`). Ray
        # turns token authentication on for a new cluster unless RAY_AUTH_MODE says otherwise,
        # and a job that joins by address uses its token only when told to.
        address = cluster.address_info["gcs_address"]
        token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        print(f"dcfx serve: local Ray cluster at {address}; jobs join it with "
              f"{'RAY_AUTH_MODE=token in their environment and ' if token else ''}ray.init(address={address!r})",
              flush=True)
    else:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ray.init(address=args.address)
    deployed = False
    try:
        _check_resources(ray, args)
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        deployed = True
        try:
            # Access logs off: one line per request would drown the driver's terminal.
            ray_serve.run(application, name=APP_NAME, route_prefix=args.route_prefix,
                          logging_config={"enable_access_log": False})
        except RuntimeError as e:  # a replica failed to start: Serve's message has its error
            raise SystemExit(f"dcfx serve: error: the deployment did not start: {e}") from None
        url = f"http://{args.host}:{args.port}{args.route_prefix}"
        offered = dict.fromkeys([serve.parse_setting(s)[0] for s in args.settings] + [serve.OFF])
        print(
            f"dcfx serve: {url} ({args.replicas} replica(s), batches of up to {args.max_batch_size} images, "
            f"dcfx settings {', '.join(offered)}); Ctrl-C stops it",
            flush=True,
        )
        print(f"  curl -s {url}    # the fields, settings and limits it accepts", flush=True)
        if args.model is None:
            print(f"  curl -s {url} -d '{{\"label\": 3, \"seed\": 0, \"steps\": 50}}'", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("dcfx serve: stopping", file=sys.stderr, flush=True)
    finally:
        if args.address is not None and deployed:
            ray_serve.delete(APP_NAME)  # other applications on the cluster keep running
        # A local cluster ends with its processes: ray.shutdown() stops them all (Serve's
        # graceful drain adds seconds and nothing a stopped cluster keeps).
        ray.shutdown()


def _check_resources(ray, args: argparse.Namespace) -> None:
    """Replicas that cannot all be placed would keep `serve.run` waiting forever."""
    available = ray.cluster_resources()
    for kind, per_replica in (("CPU", args.cpus_per_replica), ("GPU", args.gpus_per_replica)):
        need = per_replica * args.replicas
        if need > available.get(kind, 0):
            raise ValueError(
                f"{args.replicas} replica(s) x {per_replica:g} {kind}s need {need:g} {kind}s and the cluster has "
                f"{available.get(kind, 0):g}: use fewer --replicas, fewer --{kind.lower()}s-per-replica"
                + (", or a larger --num-cpus" if kind == "CPU" and args.address is None else "")
            )


def _build_package(serve, args: argparse.Namespace) -> None:
    path = args.build_package
    written = serve.build_package(
        path, args.model, setting=args.settings[0], max_batch_size=args.max_batch_size, overwrite=args.force
    )
    print(
        f"dcfx serve: wrote {written.resolve()} and its record {written.name}.json; serve it with: "
        f"dcfx serve --package {path} --settings {' '.join(args.settings)} --max-batch-size {args.max_batch_size}"
    )
