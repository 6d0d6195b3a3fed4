"""`dcfx serve`: a Ray Serve deployment of the digits model (or --model) with DeepCache, over HTTP.

Starts a local Ray cluster and prints its address (other jobs, such as the fidelity study's
`--ray ADDRESS`, may join it while it serves), or joins one with --address; deploys
`dcfx.serve.app` with the given replicas, CPUs or GPUs per replica, batch size and batch wait,
prints the URL and serves until Ctrl-C, which stops the application (and the local cluster).
POST JSON such as {"label": 3, "seed": 0, "steps": 50, "dcfx": "3:0"}; GET describes the accepted fields.
Each request waits at most --request-timeout-s (then HTTP 504), and at most
--max-queued-requests wait for a replica (more get HTTP 503 with Retry-After).
--build-package PATH writes the AOT package a deployment with these options loads with
--package PATH, then exits.

Needs Ray Serve: pip install "dcfx[serve]".
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import os
import signal
import sys
import typing
from pathlib import Path

from ..serve.options import OFF, ServeOptions, field_help

APP_NAME = "dcfx"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # One flag per ServeOptions field, its help the field's line of the docstring.
    helps, kinds = field_help(), typing.get_type_hints(ServeOptions)
    for f in dataclasses.fields(ServeOptions):
        optional = type(None) in typing.get_args(kinds[f.name])
        base = next(t for t in typing.get_args(kinds[f.name]) if t is not type(None)) if optional else kinds[f.name]
        flag = "--" + f.name.replace("_", "-")
        shown = "none" if f.default is None else " ".join(f.default) if isinstance(f.default, tuple) else f.default
        text = f"{helps[f.name]} (default: {shown})"
        if base is bool:
            p.add_argument(flag, action="store_true", help=helps[f.name])
        elif typing.get_origin(base) is tuple:
            p.add_argument(flag, nargs="+", default=f.default, metavar="SETTING", help=text)
        else:
            metavar = "PATH" if base is str else f.name.upper()
            p.add_argument(flag, type=_reader(base, optional), default=f.default, metavar=metavar, help=text)
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, or HEAD:6379) instead of starting a local one; "
                                     "if Serve runs there already, its HTTP host and port stay")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: Ray's count of this machine's)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--route-prefix", default="/", help="HTTP route of the application (default: %(default)s)")
    p.add_argument("--build-package", type=Path, metavar="PATH",
                   help="write the AOT package for --model, the first of --settings and --max-batch-size, then exit")
    p.add_argument("--force", action="store_true", help="with --build-package: replace a file that is no dcfx package")


def _reader(kind: type, optional: bool):
    """A flag's value as `kind`; "none" as None where the field may be None."""

    def read(text: str):
        if optional and text.lower() == "none":
            return None
        return kind(text)

    read.__name__ = kind.__name__  # argparse names the type in its error message
    return read


def options(args: argparse.Namespace) -> ServeOptions:
    """The `ServeOptions` that the flags give."""
    return ServeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)})


def run(args: argparse.Namespace) -> None:
    """Builds a package, or serves until interrupted."""
    opts = options(args)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ValueError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise SystemExit('dcfx serve: error: Ray Serve is not installed; pip install "dcfx[serve]"') from None
    from .. import serve

    if args.build_package is not None:
        _build_package(serve, args, opts)
        return
    application = serve.app(opts)
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
        _check_resources(ray, args, opts)
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        deployed = True
        try:
            # Access logs off: one line per request would drown the driver's terminal.
            ray_serve.run(application, name=APP_NAME, route_prefix=args.route_prefix,
                          logging_config={"enable_access_log": False})
        except RuntimeError as e:  # a replica failed to start: Serve's message has its error
            raise SystemExit(f"dcfx serve: error: the deployment did not start: {e}") from None
        url = f"http://{args.host}:{args.port}{args.route_prefix}"
        queue = "unbounded" if opts.max_queued_requests is None else f"{opts.max_queued_requests} more queued"
        deadline = "none" if opts.request_timeout_s is None else f"{opts.request_timeout_s:g} s"
        print(
            f"dcfx serve: {url} ({opts.replicas} replica(s), batches of up to {opts.max_batch_size} images, "
            f"dcfx settings {', '.join(dict.fromkeys(opts.settings + (OFF,)))}; {queue}, deadline {deadline}); "
            f"Ctrl-C stops it",
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


def _check_resources(ray, args: argparse.Namespace, opts: ServeOptions) -> None:
    """Replicas that cannot all be placed would keep `serve.run` waiting forever."""
    available = ray.cluster_resources()
    for kind, per_replica in (("CPU", opts.cpus_per_replica), ("GPU", opts.gpus_per_replica)):
        need = per_replica * opts.replicas
        if need > available.get(kind, 0):
            raise ValueError(
                f"{opts.replicas} replica(s) x {per_replica:g} {kind}s need {need:g} {kind}s and the cluster has "
                f"{available.get(kind, 0):g}: use fewer --replicas, fewer --{kind.lower()}s-per-replica"
                + (", or a larger --num-cpus" if kind == "CPU" and args.address is None else "")
            )


def _build_package(serve, args: argparse.Namespace, opts: ServeOptions) -> None:
    path = args.build_package
    written = serve.build_package(path, opts, overwrite=args.force)
    print(
        f"dcfx serve: wrote {written.resolve()}; serve it with: dcfx serve --package {path} "
        f"--settings {' '.join(opts.settings)} --max-batch-size {opts.max_batch_size}"
    )
