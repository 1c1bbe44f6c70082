"""Server settings: defaults, environment twins (``TENSORBRIDGE_*``) and the TOML file."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._models import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
    """Everything ``tensorbridge serve`` needs; each field has a CLI flag and a TOML key."""

    #: Path of the Unix socket (TENSORBRIDGE_SOCKET).
    socket: str = field(default_factory=default_socket_path)
    #: Models to load.
    models: list[ModelConfig] = field(default_factory=list)
    #: torch intra-op threads (TENSORBRIDGE_THREADS); 0 keeps torch's default.
    threads: int = 0
    #: Initial region size per connection, bytes.
    region_initial: int = 1 << 20
    #: Largest region a connection may grow to, bytes (TENSORBRIDGE_REGION_CAP_MB).
    region_cap: int = 1 << 30
    #: Only these uids may connect (SO_PEERCRED); empty = anyone who can open the socket.
    allow_uid: list[int] = field(default_factory=list)
    #: Mode of the socket file.
    socket_mode: int = 0o660
    #: Requests slower than this are logged at WARNING, in milliseconds (0 = off).
    slow_ms: float = 50.0
    #: Threads that wait on the sockets and compute requests for idle models at once; one of
    #: them always stays free for I/O, so up to io_threads - 1 such requests (to different
    #: models) run at the same time, besides the models' own queue workers.
    io_threads: int = 4
    #: Total bytes of shared memory all connections' regions may map together; a request that
    #: would grow past it gets OVERLOADED / PAYLOAD_TOO_LARGE instead (TENSORBRIDGE_SHM_CAP_MB).
    shm_cap: int = 4 << 30
    #: Owner and group (names or numeric ids) given to the socket file; None = the server's.
    socket_owner: str | None = None
    socket_group: str | None = None
    #: Only peers with one of these gids (primary group, SO_PEERCRED) may connect, besides
    #: ``allow_uid``; both empty = anyone who can open the socket.
    allow_gid: list[int] = field(default_factory=list)
    #: On SIGTERM: stop accepting, let in-flight requests finish for up to this many seconds.
    drain_timeout: float = 10.0
    #: Serve Prometheus ``/metrics`` on this TCP port (0 = off) and host.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    #: ``text`` or ``json`` (one JSON object per line) log lines on stderr.
    log_format: str = "text"

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerConfig:
        """Read a ``tensorbridge.toml`` (its keys are shown in the README)."""
        raw = tomllib.loads(Path(path).read_text())
        server: dict[str, Any] = dict(raw.get("server", {}))
        unknown = set(server) - {"socket", "threads", "region_initial_mb", "region_cap_mb",
                                 "allow_uid", "socket_mode", "slow_ms", "io_threads"}
        if unknown:
            raise ValueError(f"{path}: unknown [server] keys {sorted(unknown)}")
        config = cls()
        if "socket" in server:
            config.socket = str(server["socket"])
        config.threads = int(server.get("threads", config.threads))
        if "region_initial_mb" in server:
            config.region_initial = int(float(server["region_initial_mb"]) * (1 << 20))
        if "region_cap_mb" in server:
            config.region_cap = int(float(server["region_cap_mb"]) * (1 << 20))
        config.allow_uid = [int(u) for u in server.get("allow_uid", [])]
        config.socket_mode = int(str(server.get("socket_mode", "660")), 8)
        config.slow_ms = float(server.get("slow_ms", config.slow_ms))
        config.io_threads = max(2, int(server.get("io_threads", config.io_threads)))
        base = Path(path).parent
        for name, table in raw.get("models", {}).items():
            table = dict(table)
            unknown = set(table) - set(ModelConfig.__dataclass_fields__) - {"name"}
            if unknown:
                raise ValueError(f"{path}: unknown keys {sorted(unknown)} in [models.{name}]")
            for key in ("source", "weights"):
                value = table.get(key)
                if value and ":" not in value and not Path(value).is_absolute():
                    table[key] = str(base / value)
            table.pop("name", None)
            config.models.append(ModelConfig(name=name, **table))
        return config
