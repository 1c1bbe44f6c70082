"""The ``tensorbridge`` command: ``serve``, ``check-config``, ``health``, ``models``,
``settings``, ``--version``. Every setting flag comes from the schema (``_settings``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import threading
from pathlib import Path

import torch

from . import __version__
from ._client import Client
from ._config import (
    MODEL_SETTINGS,
    SERVER_SETTINGS,
    ConfigError,
    ServerConfig,
    check_models,
    default_socket_path,
)
from ._errors import ConnectionError, TensorBridgeError, TimeoutError
from ._exitcode import ExitCode
from ._logging import configure_logging, say
from ._models import ModelConfig
from ._pipeline import PipelineConfigError
from ._settings import Setting, apply, markdown_table

# SIGTERM is what systemd/supervisor send; SIGINT is Ctrl-C. Both drain: stop accepting, answer
# the requests in flight (up to drain_timeout), then close connections, release regions and
# remove the socket file.
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Per-model settings given as flags apply to the models given with --model.
_MODEL_FLAGS = tuple(s for s in MODEL_SETTINGS if s.cli)
_SERVER_FLAGS = tuple(s for s in SERVER_SETTINGS if s.cli)


def _version_text() -> str:
    return (f"tensorbridge {__version__} (Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()})")


def _add_setting_flag(parser: argparse.ArgumentParser, spec: Setting, note: str = "") -> None:
    default = default_socket_path() if spec.key == "socket" else spec.shown_default()
    text = (f"{spec.help}{note} (default {default.replace('`', '')}; env {spec.env})"
            ).replace("%", "%%")
    if spec.kind == "bool":
        parser.add_argument(spec.flag, dest=spec.key, default=None,
                            action=argparse.BooleanOptionalAction, help=text)
    else:
        parser.add_argument(spec.flag, dest=spec.key, default=None, metavar=spec.key.upper(),
                            action="append" if spec.repeatable else "store", help=text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every setting flag has a ``TENSORBRIDGE_*`` environment twin."""
    parser = argparse.ArgumentParser(prog="tensorbridge",
                                     description="Serve PyTorch models to PHP over shared memory.",
                                     epilog="exit codes: " + ", ".join(
                                         f"{c.value} {c.name.lower()}" for c in ExitCode))
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="load models and serve them")
    serve.add_argument("--config", default=os.environ.get("TENSORBRIDGE_CONFIG"),
                       help="tensorbridge.toml (env TENSORBRIDGE_CONFIG)")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE[@WEIGHTS]",
                       help="a TorchScript file, or package.module:factory with optional "
                            "@weights (.pth or .safetensors); repeatable")
    for spec in _SERVER_FLAGS:
        _add_setting_flag(serve, spec)
    for spec in _MODEL_FLAGS:
        _add_setting_flag(serve, spec, "; for models given with --model")

    check = sub.add_parser("check-config", help="check a tensorbridge.toml (and the "
                           "TENSORBRIDGE_* environment) without starting: exit 0 or 2")
    check.add_argument("file", help="the TOML file")

    settings = sub.add_parser("settings", help="list every setting (the docs table)")
    settings.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    settings.add_argument("--update", metavar="FILE", help="rewrite the table between the "
                          "<!-- settings:begin/end --> marks of FILE (docs/operations.md)")

    watchdog = sub.add_parser("watchdog", help="Supervisor event listener (events=TICK_5): "
                              "SIGKILL a server that stops answering, so that it is restarted")
    watchdog.add_argument("--socket", default=None, help="the server's socket (default: "
                          "TENSORBRIDGE_SOCKET, else the default path)")
    watchdog.add_argument("--failures", type=int, default=3,
                          help="ticks in a row without an answer before the kill (default 3)")
    watchdog.add_argument("--timeout", type=float, default=3.0,
                          help="seconds a PING may take (default 3)")

    sock_help = f"Unix socket path (env TENSORBRIDGE_SOCKET; default {default_socket_path()})"
    for name, text in (("models", "the models of a running server: their signatures, or "
                                  "list / load / unload / reload NAME (versions and states)"),
                       ("health", "send a real request: exit 0 ready, 1 not ready, "
                                  "3 unreachable")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--socket", default=None, help=sock_help)
        p.add_argument("--format", choices=["text", "json"], default="text")
        p.add_argument("--timeout", type=float, default=None,
                       help="seconds to wait for the answer (default 2; load and reload: 600)")
        if name == "health":
            p.add_argument("--model", action="append", default=None, metavar="NAME",
                           help="models to send a test INFER (default: every model whose "
                                "inputs can be made up); repeatable")
        else:
            p.add_argument("action", nargs="?", choices=ADMIN_ACTIONS,
                           help="without one: the signatures of the served models")
            p.add_argument("name", nargs="?", help="the model (required but for list)")
    return parser


def server_config(args: argparse.Namespace, environ: dict[str, str] | None = None
                  ) -> ServerConfig:
    """The ``serve`` settings, checked: defaults < the TOML file < ``TENSORBRIDGE_*`` < flags."""
    environ = dict(os.environ if environ is None else environ)
    config = ServerConfig.from_toml(args.config) if args.config else ServerConfig()
    for spec in _SERVER_FLAGS:
        value = environ.get(spec.env, "")
        if value != "":
            config.apply({spec.key: value}, f"environment: {spec.env}:", textual=True)
    for spec in _SERVER_FLAGS:
        flag = getattr(args, spec.key, None)
        if flag is not None:
            config.apply({spec.key: flag}, f"command line: {spec.flag}:",
                         textual=spec.kind != "bool")
    for text in getattr(args, "model", None) or ():
        model = ModelConfig.from_cli(text)
        for spec in _MODEL_FLAGS:
            if environ.get(spec.env, "") != "":
                apply(model, (spec,), {spec.key: environ[spec.env]},
                      f"environment: {spec.env}:", textual=True)
            flag = getattr(args, spec.key, None)
            if flag is not None:
                apply(model, (spec,), {spec.key: flag}, f"command line: {spec.flag}:",
                      textual=spec.kind != "bool")
        config.models.append(model)
    return config


def _serve(args: argparse.Namespace) -> int:
    config = server_config(args)
    check_models(config)
    from .listeners import check_config

    check_config(config)  # a listener beyond loopback without token or TLS: exit 2 now
    configure_logging(config.log_level, config.log_format, capacity=config.log_buffer)
    log = logging.getLogger("tensorbridge")
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
    try:
        server.load_models()
    except PipelineConfigError as exc:
        raise ConfigError(str(exc)) from None
    for sig in HANDLED_SIGNALS:
        # Drain in a thread: the handler runs in the main thread, which serve_forever blocks.
        signal.signal(sig, lambda *_: threading.Thread(
            target=server.drain, args=(config.drain_timeout,), daemon=True).start())
    server.start()
    server.notifier.notify(f"READY=1\nSTATUS=serving {len(server.models)} model(s) on "
                           f"{config.socket}\nMAINPID={os.getpid()}")
    ready = f"tensorbridge {__version__} ready on {config.socket}"
    if config.log_format == "json":
        log.info(ready, extra={"event": "ready", "socket": config.socket})
    else:
        say(ready)
    server.serve_forever()
    log.info("stopped")
    return ExitCode.OK


def _check_config(args: argparse.Namespace) -> int:
    args.config, args.model = args.file, []
    config = server_config(args)
    check_models(config)
    from .listeners import check_config

    check_config(config)
    repository = f", repository {config.repository}" if config.repository else ""
    print(f"ok: {args.file}: {len(config.models)} model(s) "
          f"({', '.join(m.name for m in config.models)}){repository}, socket {config.socket}")
    return ExitCode.OK


def _settings(args: argparse.Namespace) -> int:
    groups = (("server", SERVER_SETTINGS), ("model", MODEL_SETTINGS))
    if args.update:
        update_doc_table(Path(args.update))
        print(f"updated the settings table in {args.update}")
    elif args.format == "markdown":
        print(markdown_table(*groups), end="")
    elif args.format == "json":
        print(json.dumps([{"scope": scope, "key": s.key, "flag": s.flag if s.cli else None,
                           "env": s.env if s.cli else None, "kind": s.kind,
                           "default": s.shown_default(), "allowed": s.allowed(), "help": s.help}
                          for scope, specs in groups for s in specs], indent=2))
    else:
        for scope, specs in groups:
            for s in specs:
                print(f"[{scope}] {s.key} = {s.shown_default()}  ({s.allowed()})\n    {s.help}")
    return ExitCode.OK


DOC_BEGIN, DOC_END = "<!-- settings:begin -->\n", "<!-- settings:end -->"


def update_doc_table(path: Path) -> str:
    """Rewrite the generated settings table of ``path``; return the new text."""
    text = path.read_text()
    head, begin, rest = text.partition(DOC_BEGIN)
    _, end, tail = rest.partition(DOC_END)
    if not begin or not end:
        raise ConfigError(f"{path}: no {DOC_BEGIN.strip()} ... {DOC_END} marks")
    new = head + begin + markdown_table(("server", SERVER_SETTINGS),
                                        ("model", MODEL_SETTINGS)) + end + tail
    path.write_text(new)
    return new


#: ``tensorbridge models ACTION``: the ADMIN commands of the protocol (spec §11).
ADMIN_ACTIONS = ("list", "load", "unload", "reload")
#: Loading a model can take minutes (large weights, warm-up); the CLI waits that long.
_LOAD_TIMEOUT = 600.0


def _admin(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        print(f"tensorbridge models {args.action}: give the model name", file=sys.stderr)
        return ExitCode.CONFIG
    timeout = args.timeout if args.timeout is not None else (
        _LOAD_TIMEOUT if args.action in ("load", "reload") else 2.0)
    try:
        with Client(args.socket, timeout=2.0) as client:
            result = client.admin(args.action, args.name, timeout=timeout)
    except (ConnectionError, TimeoutError) as exc:
        print(f"tensorbridge models {args.action}: no answer: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except TensorBridgeError as exc:
        print(f"tensorbridge models {args.action}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return ExitCode.OK
    for m in result:
        routing = f", routing {m['routing']}" if m["routing"] else ""
        print(f"{m['name']} (policy {m['policy']}{routing})")
        for v in m["versions"] or [{"version": "-", "state": "not loaded"}]:
            extra = f" {v['backend']} {v['load_seconds']} s" if v.get("load_seconds") else ""
            reason = f": {v['reason']}" if v.get("reason") else ""
            print(f"  {v['version']}: {v['state']}{extra}{reason}")
    return ExitCode.OK


def _query(args: argparse.Namespace) -> int:
    from ._health import check_health, describe_models

    if getattr(args, "action", None):
        return _admin(args)
    try:
        with Client(args.socket, timeout=args.timeout or 2.0) as client:
            if args.command == "health":
                return check_health(client, args.model, args.format)
            result = client.models()
    except (ConnectionError, TimeoutError) as exc:
        print(f"tensorbridge {args.command}: no answer: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except TensorBridgeError as exc:
        print(f"tensorbridge {args.command}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(describe_models(result))
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tensorbridge`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "settings":
            return _settings(args)
        if args.command == "watchdog":
            from ._watchdog import run

            run(args.socket or default_socket_path(), max(1, args.failures), args.timeout)
            return ExitCode.OK
        return _query(args)
    except ValueError as exc:  # ConfigError, and what loading a model finds wrong
        print(f"tensorbridge {args.command}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except (RuntimeError, OSError) as exc:
        print(f"tensorbridge {args.command}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
