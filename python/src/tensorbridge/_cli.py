"""The ``tensorbridge`` command: ``serve``, ``models``, ``health``, ``--version``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys

import torch

from . import __version__
from ._client import Client
from ._config import ServerConfig, default_socket_path
from ._errors import TensorBridgeError
from ._models import ModelConfig

# Named exit codes (uvicorn style).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

# SIGTERM is what systemd/supervisor send; SIGINT is Ctrl-C. Both stop cleanly: connections
# close, regions are released, the socket file is removed.
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _version_text() -> str:
    return (f"tensorbridge {__version__} (Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()})")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


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
    serve.add_argument("--threads", type=int, default=_env_int("TENSORBRIDGE_THREADS", 0),
                       help="torch intra-op threads, 0 = torch default (env TENSORBRIDGE_THREADS)")
    serve.add_argument("--device", default=os.environ.get("TENSORBRIDGE_DEVICE", "cpu"),
                       help="device for models given with --model: cpu, cuda, cuda:1 "
                            "(env TENSORBRIDGE_DEVICE; default %(default)s)")
    serve.add_argument("--warmup", type=int, default=None,
                       help="warm-up runs per model given with --model (default 2)")
    serve.add_argument("--region-cap-mb", type=float,
                       default=float(os.environ.get("TENSORBRIDGE_REGION_CAP_MB", 1024)),
                       help="largest shared-memory region per connection in MiB "
                            "(env TENSORBRIDGE_REGION_CAP_MB; default %(default)s)")
    serve.add_argument("--allow-uid", type=int, action="append", default=[],
                       help="only this uid may connect (SO_PEERCRED); repeatable")
    serve.add_argument("--log-level", default=os.environ.get("TENSORBRIDGE_LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"])

    for name, text in (("models", "list the models a running server has loaded"),
                       ("health", "check that a server answers (exit 3 if not)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--socket", default=None, help=sock_help.replace(
            "%(default)s", default_socket_path()))
        p.add_argument("--format", choices=["text", "json"], default="text")
        p.add_argument("--timeout", type=float, default=2.0)
    return parser


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s tensorbridge %(levelname)s %(message)s")
    config = ServerConfig.from_toml(args.config) if args.config else ServerConfig()
    if args.socket:
        config.socket = args.socket
    for text in args.model:
        model = ModelConfig.from_cli(text)
        if args.warmup is not None:
            model.warmup = args.warmup
        model.device = args.device
        config.models.append(model)
    if args.threads:
        config.threads = args.threads
    config.region_cap = int(args.region_cap_mb * (1 << 20))
    config.allow_uid = args.allow_uid or config.allow_uid
    if not config.models:
        print("tensorbridge serve: no models; give --model NAME=SOURCE or --config FILE",
              file=sys.stderr)
        return EXIT_USAGE
    from ._server import Server

    server = Server(config)
    server.load_models()
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, lambda *_: server.stop())
    server.start()
    print(f"tensorbridge {__version__} ready on {config.socket}", file=sys.stderr, flush=True)
    server.serve_forever()
    logging.getLogger("tensorbridge").info("stopped")
    return EXIT_OK


def _query(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            result = client.ping() if args.command == "health" else client.models()
    except TensorBridgeError as exc:
        print(f"tensorbridge {args.command}: {exc}", file=sys.stderr)
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
