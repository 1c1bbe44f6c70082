"""Server settings (``ServerConfig``) and how they are read: the TOML file, the
``TENSORBRIDGE_*`` environment and the flags, all checked against the schema (``_settings``),
plus the checks of the models a config names (files, factories, devices) before anything binds.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._models import ModelConfig
from ._remote import is_remote
from ._settings import MIB, MODE, ConfigError, apply, schema, setting, unknown_key
from ._settings import parse_mode as parse_mode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

__all__ = ["ConfigError", "ServerConfig", "check_models", "default_socket_path", "parse_mode"]


def default_socket_path() -> str:
    """``/run/tensorbridge/tensorbridge.sock`` if writable, else ``$XDG_RUNTIME_DIR``, else /tmp."""
    env = os.environ.get("TENSORBRIDGE_SOCKET")
    if env:
        return env
    if os.access("/run/tensorbridge", os.W_OK):
        return "/run/tensorbridge/tensorbridge.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return os.path.join(runtime, "tensorbridge.sock")
    return "/tmp/tensorbridge.sock"


@dataclass
class ServerConfig:
    """Everything ``tensorbridge serve`` needs. Each ``setting()`` field is a ``[server]`` key
    of the TOML file with a CLI flag and a ``TENSORBRIDGE_*`` twin (docs/operations.md)."""

    socket: str = setting(default_factory=default_socket_path, help="Unix socket path",
                          doc_default="`/run/tensorbridge/tensorbridge.sock`¹")
    #: Models to load (``[models.NAME]`` tables and ``--model``).
    models: list[ModelConfig] = field(default_factory=list)
    threads: int = setting(0, minimum=0, maximum=1024,
                           help="torch intra-op threads; 0 = torch's default")
    io_threads: int = setting(
        4, minimum=2, maximum=256,
        help="threads serving sockets (the compiled loop's, at most one per CPU, or the Python "
             "pool's); one stays free for I/O, the others also compute requests for idle, "
             "quick models")
    loop: str = setting(
        "c", choices=("c", "python"),
        help="who serves the established connections: the compiled loop (c: frames, "
             "bounds checks and replies in C, the GIL taken once per wake-up) or the Python "
             "one; c falls back to python where the extension is not built")
    region_initial: int = setting(1 << 20, kind=MIB, key="region_initial_mb", minimum=0.0625,
                                  maximum=1 << 20, help="first size of a connection's region")
    region_cap: int = setting(1 << 30, kind=MIB, key="region_cap_mb", minimum=1,
                              maximum=1 << 20, help="largest region of one connection")
    shm_cap: int = setting(
        4 << 30, kind=MIB, key="shm_cap_mb", minimum=1, maximum=1 << 24,
        help="shared memory of all regions together; beyond it `OVERLOADED` / "
             "`PAYLOAD_TOO_LARGE`")
    allow_uid: list[int] = setting(
        [], minimum=0, doc_default="anyone",
        help="peers allowed by uid (`SO_PEERCRED`); flag repeatable, environment `33,34`")
    allow_gid: list[int] = setting([], minimum=0, doc_default="anyone",
                                   help="peers allowed by primary gid, besides `allow_uid`")
    socket_mode: int = setting(0o660, kind=MODE,
                               help="mode of the socket file, octal (`\"660\"` or `0o660`)")
    socket_owner: str | None = setting(None, doc_default="the server's user",
                                       help="owner of the socket file (name or uid)")
    socket_group: str | None = setting(None, doc_default="the server's group",
                                       help="group of the socket file (name or gid)")
    slow_ms: float = setting(50.0, minimum=0,
                             help="requests slower than this (ms) are logged at WARNING; 0 = off")
    drain_timeout: float = setting(10.0, minimum=0, maximum=3600,
                                   help="on SIGTERM, seconds in-flight requests get to finish")
    metrics_port: int = setting(0, minimum=0, maximum=65535,
                                help="Prometheus `/metrics` TCP port; 0 = off")
    metrics_host: str = setting("127.0.0.1",
                                help="address of `/metrics` (`0.0.0.0` exposes it)")
    http_port: int = setting(0, minimum=0, maximum=65535,
                             help="Open Inference Protocol (KServe v2) REST listener's TCP port; "
                                  "0 = off")
    http_host: str = setting("127.0.0.1", help="address of the REST listener; beyond loopback "
                                               "it needs `http_token_file` or TLS")
    grpc_port: int = setting(0, minimum=0, maximum=65535,
                             help="Open Inference Protocol gRPC listener's TCP port "
                                  "(`inference.GRPCInferenceService`); 0 = off")
    grpc_host: str = setting("127.0.0.1", help="address of the gRPC listener; beyond loopback "
                                               "it needs `http_token_file` or TLS")
    http_token_file: str | None = setting(
        None, help="file holding the bearer token both listeners require (`Authorization: "
                   "Bearer ...`; health probes excepted); also enables model load/unload there")
    tls_cert_file: str | None = setting(None, help="PEM certificate (chain) of both listeners: "
                                                   "HTTPS and gRPC over TLS")
    tls_key_file: str | None = setting(None, help="PEM private key of `tls_cert_file`")
    log_format: str = setting("text", choices=("text", "json"),
                              help="log lines on stderr; `json`: one object per line")
    log_buffer: int = setting(
        10_000, minimum=10, maximum=10_000_000,
        help="log lines waiting for a slow sink; beyond it lines are dropped and counted, "
             "never blocking serving")
    log_level: str = setting("info", choices=("debug", "info", "warning", "error"),
                             help="least severe level logged")
    max_connections: int = setting(
        4096, minimum=1, maximum=1 << 20,
        help="open connections in all; beyond it a new one gets `ERROR OVERLOADED` and is "
             "closed (PHP: `OverloadedException`)")
    max_connections_per_uid: int = setting(
        2048, minimum=1, maximum=1 << 20,
        help="open connections of one peer uid; beyond it that uid's new ones are refused")
    silent_timeout: float = setting(
        10.0, minimum=0, maximum=86400,
        help="seconds a new connection may stay silent before its first byte (clients send "
             "ATTACH or PING at once); then it is closed; 0 = never")
    idle_timeout: float = setting(
        0.0, minimum=0, maximum=86400,
        help="seconds a connection with nothing in flight may stay silent before it is closed; "
             "0 = never (the PHP client sends again on a new connection when it finds its "
             "connection closed before a byte went out)")
    repository: str | None = setting(
        None, help="model repository: serve `DIR/<model>/<version>/model.{pt,onnx,py}` "
                   "(relative to the config file)")
    poll_interval: float = setting(0.0, minimum=0, maximum=86400,
                                   help="seconds between looks at the repository for new or "
                                        "removed versions; 0 = off")
    admin_uid: list[int] = setting([], minimum=0, doc_default="the server's uid and root",
                                   help="uids allowed to load / unload / reload models")
    #: The TOML file the settings came from, if any (named in error messages).
    path: str | None = field(default=None, repr=False, compare=False)

    def apply(self, values: Mapping[str, Any], where: str = "[server]",
              textual: bool = False) -> None:
        """Check and set ``[server]`` keys (``shm_cap_mb = 512``, ``socket_mode = "660"``);
        ``textual`` when the values are strings from flags or the environment."""
        apply(self, SERVER_SETTINGS, {k: v for k, v in values.items() if v is not None}, where,
              textual, elsewhere=_MODEL_KEYS)
        if self.region_initial > self.region_cap:
            raise ConfigError(f"{where} region_initial_mb ({self.region_initial >> 20}) is "
                              f"larger than region_cap_mb ({self.region_cap >> 20}); allowed: "
                              "region_initial_mb <= region_cap_mb")

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerConfig:
        """Read and check a ``tensorbridge.toml`` (keys: docs/operations.md,
        ``deploy/tensorbridge.toml``); anything wrong raises ``ConfigError`` naming the file,
        the table, the key, the value and what is allowed."""
        path = str(path)
        raw = _read_toml(path)
        config = cls(path=path)
        for key in raw:
            if key not in ("server", "models"):
                raise unknown_key(key, f"{path}:", ("server", "models"), elsewhere={
                    k: "[server]" for k in _SERVER_KEYS} | {
                    k: "[models.NAME]" for k in _MODEL_KEYS})
        server = _table(raw, "server", path)
        config.apply(server, f"{path}: [server]")
        base = Path(path).parent
        if config.repository and not Path(config.repository).is_absolute():
            config.repository = str(base / config.repository)
        models = _table(raw, "models", path)
        for name, table in models.items():
            where = f"{path}: [models.{name}]"
            if not isinstance(table, Mapping):
                raise ConfigError(f"{where} must be a table with at least `source = ...`, not "
                                  f"{table!r}")
            config.models.append(_model_from_table(name, dict(table), where, base))
        return config


#: The ``[server]`` settings and the ``[models.NAME]`` ones, in declaration order.
SERVER_SETTINGS = schema(ServerConfig)
MODEL_SETTINGS = schema(ModelConfig)
_SERVER_KEYS = {s.key for s in SERVER_SETTINGS}
_MODEL_KEYS = {s.key: "[models.NAME], or a flag for models given with --model"
               for s in MODEL_SETTINGS}


def _read_toml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}"
                          ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}; see deploy/tensorbridge.toml"
                          ) from None
    # TOML reads `socket_mode = 440` as decimal 440 (= 0o670, wider than meant); a mode
    # written as bare digits means chmod's octal, so pass those digits on as a string.
    server = raw.get("server")
    bare = re.search(r"^\s*socket_mode\s*=\s*([0-7]{3,4})\s*(?:#.*)?$", text, re.M)
    if bare and isinstance(server, dict) and isinstance(server.get("socket_mode"), int):
        server["socket_mode"] = bare.group(1)
    return dict(raw)


def _table(raw: Mapping[str, Any], name: str, path: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: {name} = {value!r} must be a table ([{name}])")
    return dict(value)


def _model_from_table(name: str, table: dict[str, Any], where: str, base: Path) -> ModelConfig:
    table.pop("name", None)
    for key in ("source", "weights"):  # a file beside the config
        value = table.get(key)
        if isinstance(value, str) and value and ":" not in value and not Path(value).is_absolute():
            table[key] = str(base / value)
    post = table.get("postprocess")
    labels = post.get("labels") if isinstance(post, Mapping) else None
    if isinstance(labels, str) and ":" not in labels and not Path(labels).is_absolute():
        table["postprocess"] = {**post, "labels": str(base / labels)}  # type: ignore[dict-item]
    model = ModelConfig(name=name, source="", origin=where)
    apply(model, MODEL_SETTINGS, table, where, elsewhere={k: "[server]" for k in _SERVER_KEYS})
    if model.remote:  # the remote backend: its URL is the source
        if model.source:
            raise ConfigError(f"{where} has both source and remote; allowed: one of them")
        model.source = model.remote
    return model


def model_where(model: ModelConfig) -> str:
    """How messages name a model's settings: its TOML table, or the ``--model`` flag."""
    return model.origin or f"--model {model.name}:"


def check_models(config: ServerConfig) -> None:
    """What the server would find out only while loading: each model's source file or
    factory, weights file, device and tables. ``ConfigError`` names the key and value."""
    _check_socket_ids(config)
    repository = Path(config.repository) if config.repository else None
    if repository is not None and not repository.is_dir():
        where = f"{config.path}: [server]" if config.path else "repository:"
        raise ConfigError(f"{where} repository = {config.repository!r}: "
                          "no such directory; allowed: a folder of model folders")
    if not config.models and repository is None:
        raise ConfigError("no models; give --model NAME=SOURCE, --repository DIR or --config "
                          "FILE with [models.NAME] tables")
    names = [m.name for m in config.models]
    for model in config.models:
        where = model_where(model)
        if names.count(model.name) > 1:
            raise ConfigError(f"{where} model name {model.name!r} is used twice; allowed: "
                              "unique names")
        weights = model.weights
        for key, value, problem, allowed in (
                ("source", model.source, _source_problem(model.source, model.name, repository),
                 "a TorchScript, .onnx or model.py file, or package.module:factory"),
                ("weights", weights, None if weights is None or Path(weights).is_file()
                 else "no such file", "a .pth/.pt (torch.save) or .safetensors file"),
                ("device", model.device, _device_available(model.device),
                 "cpu, or a device this machine has")):
            if problem:
                raise ConfigError(f"{where} {key} = {value!r}: {problem}; allowed: {allowed}")
        _check_tables(model, where)


def _check_socket_ids(config: ServerConfig) -> None:
    """``socket_owner`` / ``socket_group`` name a user and group of this host."""
    import grp
    import pwd

    where = f"{config.path}: [server]" if config.path else "settings:"
    for key, value, lookup in (("socket_owner", config.socket_owner, pwd.getpwnam),
                               ("socket_group", config.socket_group, grp.getgrnam)):
        if value is None or value.isdigit():
            continue
        try:
            lookup(value)
        except KeyError:
            raise ConfigError(f"{where} {key} = {value!r}: no such {key[7:]} on this host; "
                              f"allowed: a {key[7:]} name or a numeric id") from None


def _source_problem(source: str, name: str, repository: Path | None) -> str | None:
    if is_remote(source):  # reachable or not, the remote is asked when the model loads
        return None
    if not source:  # the repository's folder of that name gives it
        if repository is None or not (repository / name).is_dir():
            return f"none, and no repository folder {name!r} exists to take it from"
        return None
    if ":" in source and not Path(source).exists():
        module_name, _, factory = source.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            return f"no module named {exc.name!r} (is it installed, or on PYTHONPATH?)"
        except Exception as exc:  # the module's own import failed: say how
            return f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        if not callable(getattr(module, factory, None)):
            return f"module {module_name!r} has no factory {factory!r}"
        return None
    if not Path(source).is_file():
        return "no such file"
    return None


def _device_available(device: str) -> str | None:
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"CUDA is not available here (torch {torch.__version__})"
        if index and int(index) >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if kind == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available here"
    return None


def _check_tables(model: ModelConfig, where: str) -> None:
    """The tensor specs and pipeline tables, as far as they can be read without the model."""
    from ._pipeline import Classify, ImagePreprocess
    from ._signature import Signature
    from ._text import CLASSIFY_KEYS, TEXT_ONLY_KEYS, Pool, TextPreprocess, check_text_keys, is_text

    try:
        Signature.parse(model.inputs, model.outputs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{where} inputs/outputs: {exc}; allowed: a list of "
                          "{name, datatype, shape} tables") from None
    parsers: tuple[tuple[str, Callable[[Any], object]], ...] = (
        ("preprocess", ImagePreprocess.parse), ("postprocess", Classify.parse))
    if model.preprocess and TEXT_ONLY_KEYS & set(model.preprocess):  # the text pipeline's
        parsers = (("preprocess", TextPreprocess.parse if is_text(model.preprocess)
                    else check_text_keys),  # else the factory names the tokenizer
                   ("postprocess", lambda raw: (Classify.parse(raw) if CLASSIFY_KEYS & set(raw)
                                                else Pool.parse(raw))))
    for key, parse in parsers:
        table = getattr(model, key)
        try:
            if table:
                parse(table)
        except (TypeError, ValueError) as exc:
            table_where = (f"{where.removesuffix(']')}.{key}]" if model.origin
                           else f"{where} {key}:")
            raise ConfigError(f"{table_where} {exc}") from None
