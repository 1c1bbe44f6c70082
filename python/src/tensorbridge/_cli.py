"""The ``tensorbridge`` command: ``serve``, ``models``, ``health``, ``--version``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import threading

import torch

from . import __version__
from ._client import Client
from ._config import ServerConfig, default_socket_path
from ._errors import TensorBridgeError
from ._logging import configure_logging
from ._models import ModelConfig

# Named exit codes (uvicorn style).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
#: ``health``/``models`` when the server does not answer, or (health) is not ready: the
#: exit status probes (systemd, Kubernetes exec probes, Supervisor scripts) read as "down".
EXIT_UNAVAILABLE = 1

# SIGTERM is what systemd/supervisor send; SIGINT is Ctrl-C. Both drain: stop accepting, answer
# the requests in flight (up to drain_timeout), then close connections, release regions and
# remove the socket file.
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _version_text() -> str:
    return (f"tensorbridge {__version__} (Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()})")


# Settings of `serve` that map one to one onto ServerConfig ([server] keys of the TOML file):
# (flag, TOML key, type, help). Each flag's environment twin is TENSORBRIDGE_<KEY upper-case>.
# A flag given on the command line wins over its environment twin, which wins over the file.
_SETTINGS: tuple[tuple[str, str, type, str], ...] = (
    ("--threads", "threads", int, "torch intra-op threads, 0 = torch default (default 0)"),
    ("--io-threads", "io_threads", int,
     "threads serving sockets; requests for idle models run on them (default 4, at least 2)"),
    ("--region-cap-mb", "region_cap_mb", float,
     "largest shared-memory region per connection in MiB (default 1024)"),
    ("--shm-cap-mb", "shm_cap_mb", float,
     "total shared memory of all regions in MiB; beyond it requests get OVERLOADED or "
     "PAYLOAD_TOO_LARGE (default 4096)"),
    ("--socket-owner", "socket_owner", str, "owner of the socket file, name or uid"),
    ("--socket-group", "socket_group", str,
     "group of the socket file, name or gid (e.g. www-data)"),
    ("--socket-mode", "socket_mode", str, "mode of the socket file, octal (default 660)"),
    ("--allow-uid", "allow_uid", int,
     "only this uid may connect (SO_PEERCRED); repeatable; env: comma-separated"),
    ("--allow-gid", "allow_gid", int,
     "only peers of this primary gid may connect (SO_PEERCRED), besides --allow-uid; "
     "repeatable; env: comma-separated"),
    ("--drain-timeout", "drain_timeout", float,
     "on SIGTERM, seconds in-flight requests may take to finish (default 10)"),
    ("--slow-ms", "slow_ms", float,
     "log requests slower than this many ms at WARNING, 0 = off (default 50)"),
    ("--metrics-port", "metrics_port", int,
     "serve Prometheus /metrics on this TCP port, 0 = off (default 0)"),
    ("--metrics-host", "metrics_host", str,
     "address for /metrics (default 127.0.0.1; 0.0.0.0 exposes it to the network)"),
    ("--log-format", "log_format", str, "text, or json: one JSON object per line (default text)"),
    ("--repository", "repository", str,
     "model repository: serve DIR/<model>/<version>/model.{pt,onnx,py}"),
    ("--poll-interval", "poll_interval", float,
     "seconds between looks at the repository for new or removed versions, 0 = off "
     "(default 0)"),
    ("--admin-uid", "admin_uid", int,
     "uid allowed to load/unload/reload models; repeatable; env: comma-separated "
     "(default: the server's uid and root)"),
)
_REPEATABLE = ("allow_uid", "allow_gid", "admin_uid")


def _env_name(key: str) -> str:
    return "TENSORBRIDGE_" + key.upper()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag has a ``TENSORBRIDGE_*`` environment twin."""
    parser = argparse.ArgumentParser(prog="tensorbridge",
                                     description="Serve PyTorch models to PHP over shared memory.")
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", required=True)
    sock_help = "Unix socket path (env TENSORBRIDGE_SOCKET; default %(default)s)"

    serve = sub.add_parser("serve", help="load models and serve them")
    serve.add_argument("--socket", default=None, help=sock_help.replace(
        "%(default)s", default_socket_path()))
    serve.add_argument("--config", default=os.environ.get("TENSORBRIDGE_CONFIG"),
                       help="tensorbridge.toml (env TENSORBRIDGE_CONFIG)")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE[@WEIGHTS]",
                       help="a TorchScript file, or package.module:factory with optional "
                            "@weights (.pth or .safetensors); repeatable")
    serve.add_argument("--device", default=os.environ.get("TENSORBRIDGE_DEVICE", "cpu"),
                       help="device for models given with --model: cpu, cuda, cuda:1 "
                            "(env TENSORBRIDGE_DEVICE; default %(default)s)")
    serve.add_argument("--warmup", type=int, default=None,
                       help="warm-up runs per model given with --model (default 2)")
    for flag, key, kind, text in _SETTINGS:
        extra: dict = {"choices": ["text", "json"]} if key == "log_format" else {}
        serve.add_argument(flag, dest=key, type=kind, default=None,
                           action="append" if key in _REPEATABLE else "store",
                           help=f"{text} (env {_env_name(key)})", **extra)
    serve.add_argument("--log-level", default=os.environ.get("TENSORBRIDGE_LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"],
                       help="(env TENSORBRIDGE_LOG_LEVEL; default %(default)s)")

    for name, text in (("models", "the models of a running server: their signatures, or "
                                  "list / load / unload / reload NAME (versions and states)"),
                       ("health", "exit 0 when a server answers and every model is ready, else 1")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--socket", default=None, help=sock_help.replace(
            "%(default)s", default_socket_path()))
        p.add_argument("--format", choices=["text", "json"], default="text")
        p.add_argument("--timeout", type=float, default=None,
                       help="seconds to wait for the answer (default 2; load and reload: 600)")
        if name == "models":
            p.add_argument("action", nargs="?", choices=ADMIN_ACTIONS,
                           help="without one: the signatures of the served models")
            p.add_argument("name", nargs="?", help="the model (required but for list)")
    return parser


def server_config(args: argparse.Namespace, environ: dict[str, str] | None = None
                  ) -> ServerConfig:
    """The ``serve`` settings: defaults < the TOML file < ``TENSORBRIDGE_*`` < flags."""
    environ = dict(os.environ if environ is None else environ)
    config = ServerConfig.from_toml(args.config) if args.config else ServerConfig()
    from_env = {key: environ[_env_name(key)] for _, key, _, _ in _SETTINGS
                if environ.get(_env_name(key), "") != ""}
    if "TENSORBRIDGE_SOCKET" in environ and not args.socket:
        from_env["socket"] = environ["TENSORBRIDGE_SOCKET"]
    try:
        config.apply(from_env)
    except ValueError as exc:
        raise ValueError(f"environment: {exc} (TENSORBRIDGE_* variables)") from None
    config.apply({key: getattr(args, key) for _, key, _, _ in _SETTINGS})
    if args.socket:
        config.socket = args.socket
    for text in args.model:
        model = ModelConfig.from_cli(text)
        if args.warmup is not None:
            model.warmup = args.warmup
        model.device = args.device
        config.models.append(model)
    return config


def _serve(args: argparse.Namespace) -> int:
    config = server_config(args)
    configure_logging(args.log_level, config.log_format)
    log = logging.getLogger("tensorbridge")
    if not config.models and not config.repository:
        print("tensorbridge serve: no models; give --model NAME=SOURCE, --repository DIR or "
              "--config FILE", file=sys.stderr)
        return EXIT_USAGE
    from .server import Server

    server = Server(config)
    if config.metrics_port:
        # Before loading, so that a busy port fails at once and load times show up live.
        try:
            server.metrics.start_http(config.metrics_host, config.metrics_port)
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve /metrics on {config.metrics_host}:{config.metrics_port}: "
                f"{exc.strerror or exc}; choose another --metrics-port") from None
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)
    server.load_models()
    for sig in HANDLED_SIGNALS:
        # Drain in a thread: the handler runs in the main thread, which serve_forever blocks.
        signal.signal(sig, lambda *_: threading.Thread(
            target=server.drain, args=(config.drain_timeout,), daemon=True).start())
    server.start()
    ready = f"tensorbridge {__version__} ready on {config.socket}"
    if config.log_format == "json":
        log.info(ready, extra={"event": "ready", "socket": config.socket})
    else:
        print(ready, file=sys.stderr, flush=True)
    server.serve_forever()
    log.info("stopped")
    return EXIT_OK


#: ``tensorbridge models ACTION``: the ADMIN commands of the protocol (spec §11).
ADMIN_ACTIONS = ("list", "load", "unload", "reload")
#: Loading a model can take minutes (large weights, warm-up); the CLI waits that long.
_LOAD_TIMEOUT = 600.0


def _admin(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        print(f"tensorbridge models {args.action}: give the model name", file=sys.stderr)
        return EXIT_USAGE
    timeout = args.timeout if args.timeout is not None else (
        _LOAD_TIMEOUT if args.action in ("load", "reload") else 2.0)
    try:
        with Client(args.socket, timeout=2.0) as client:
            result = client.admin(args.action, args.name, timeout=timeout)
    except TensorBridgeError as exc:
        print(f"tensorbridge models {args.action}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return EXIT_OK
    for m in result:
        routing = f", routing {m['routing']}" if m["routing"] else ""
        print(f"{m['name']} (policy {m['policy']}{routing})")
        for v in m["versions"] or [{"version": "-", "state": "not loaded"}]:
            extra = f" {v['backend']} {v['load_seconds']} s" if v.get("load_seconds") else ""
            reason = f": {v['reason']}" if v.get("reason") else ""
            print(f"  {v['version']}: {v['state']}{extra}{reason}")
    return EXIT_OK


def _query(args: argparse.Namespace) -> int:
    if getattr(args, "action", None):
        return _admin(args)
    try:
        with Client(args.socket, timeout=args.timeout or 2.0) as client:
            result = client.ping() if args.command == "health" else client.models()
    except TensorBridgeError as exc:
        print(f"tensorbridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.command == "health" and not result.get("ready", True):
        print(f"tensorbridge health: the server answers but is not ready: {result}",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.format == "json":
        print(json.dumps(result, indent=2))
    elif args.command == "health":
        print(f"ok: {result['server']} {result['version']} (protocol {result['protocol']})")
    else:
        for m in result:
            print(f"{m['name']}\n  inputs:  {_describe(m['inputs'])}\n"
                  f"  outputs: {_describe(m['outputs'])}")
    return EXIT_OK


def _describe(specs: list[dict] | None) -> str:
    if specs is None:
        return "any"
    return ", ".join(f"{t['name']}:{t['datatype']}{t['shape'] if t['shape'] is not None else ''}"
                     for t in specs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tensorbridge`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _query(args)
    except (ValueError, RuntimeError) as exc:
        print(f"tensorbridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
