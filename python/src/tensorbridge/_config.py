"""Server settings: defaults, environment twins (``TENSORBRIDGE_*``) and the TOML file."""

from __future__ import annotations

import os
import re
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
    #: Model repository: serve every ``DIR/<model>/<version>/`` (docs/operations.md).
    repository: str | None = None
    #: Seconds between looks at the repository for new or removed versions (0 = off).
    poll_interval: float = 0.0
    #: uids allowed to send ADMIN commands (load, unload, reload); empty = the server's own
    #: uid and root.
    admin_uid: list[int] = field(default_factory=list)

    def apply(self, settings: dict[str, Any]) -> None:
        """Set fields from ``[server]``-style keys (``shm_cap_mb = 512``, ``socket_mode =
        "660"``, ...); shared by the TOML file, the CLI flags and their environment twins."""
        for key, value in settings.items():
            if value is None:
                continue
            if key in _MB_KEYS:
                setattr(self, _MB_KEYS[key], _megabytes(key, value))
            elif key == "socket_mode":
                self.socket_mode = parse_mode(value)
            elif key in ("allow_uid", "allow_gid", "admin_uid"):
                setattr(self, key, _id_list(key, value))
            elif key in ("socket_owner", "socket_group"):
                setattr(self, key, str(value) if str(value) else None)
            elif key == "log_format":
                if value not in ("text", "json"):
                    raise ValueError(f"log_format must be \"text\" or \"json\", not {value!r}")
                self.log_format = value
            elif key == "io_threads":
                # One thread always stays free for I/O, so fewer than 2 would serve nothing.
                self.io_threads = max(2, _number(key, value, int))
            elif key == "metrics_port":
                port = _number(key, value, int)
                if not 0 <= port <= 65535:
                    raise ValueError(f"metrics_port must be 0 (off) or a TCP port, not {port}")
                self.metrics_port = port
            elif key == "threads":
                self.threads = _number(key, value, int)
            elif key in ("slow_ms", "drain_timeout", "poll_interval"):
                number = _number(key, value, float)
                if number < 0:
                    raise ValueError(f"{key} must be >= 0, not {number}")
                setattr(self, key, number)
            elif key in ("socket", "metrics_host"):
                setattr(self, key, str(value))
            elif key == "repository":
                self.repository = str(value) if str(value) else None
            else:
                raise ValueError(f"unknown setting {key!r}")

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerConfig:
        """Read a ``tensorbridge.toml`` (its keys are shown in the README and
        ``deploy/tensorbridge.toml``); a wrong key or value raises ``ValueError`` naming it."""
        text = Path(path).read_text()
        raw = tomllib.loads(text)
        server: dict[str, Any] = dict(raw.get("server", {}))
        # TOML reads `socket_mode = 440` as decimal 440 (= 0o670, wider than meant); a mode
        # written as bare digits means chmod's octal, so pass those digits on as a string.
        bare = re.search(r"^\s*socket_mode\s*=\s*([0-7]{3,4})\s*(?:#.*)?$", text, re.M)
        if bare and isinstance(server.get("socket_mode"), int):
            server["socket_mode"] = bare.group(1)
        unknown = set(server) - _SERVER_KEYS
        if unknown:
            raise ValueError(f"{path}: unknown [server] keys {sorted(unknown)}; known keys: "
                             f"{sorted(_SERVER_KEYS)}")
        config = cls()
        try:
            config.apply(server)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: [server] {exc}") from None
        base = Path(path).parent
        if config.repository and not Path(config.repository).is_absolute():
            config.repository = str(base / config.repository)
        for name, table in raw.get("models", {}).items():
            table = dict(table)
            unknown = set(table) - set(ModelConfig.__dataclass_fields__) - {"name"}
            if unknown:
                raise ValueError(f"{path}: unknown keys {sorted(unknown)} in [models.{name}]")
            for key in ("source", "weights"):
                value = table.get(key)
                if value and ":" not in value and not Path(value).is_absolute():
                    table[key] = str(base / value)
            labels = (table.get("postprocess") or {}).get("labels")  # a file beside the config
            if isinstance(labels, str) and ":" not in labels and not Path(labels).is_absolute():
                table["postprocess"] = {**table["postprocess"], "labels": str(base / labels)}
            table.pop("name", None)
            # Without a source the table overrides the repository's config of that model.
            table.setdefault("source", "")
            config.models.append(ModelConfig(name=name, **table))
        return config


# [server] keys of tensorbridge.toml; each has a CLI flag and a TENSORBRIDGE_* twin (_cli.py).
_MB_KEYS = {"region_initial_mb": "region_initial", "region_cap_mb": "region_cap",
            "shm_cap_mb": "shm_cap"}
_SERVER_KEYS = frozenset({"socket", "threads", "allow_uid", "allow_gid", "socket_mode",
                          "socket_owner", "socket_group", "slow_ms", "io_threads",
                          "drain_timeout", "metrics_port", "metrics_host", "log_format",
                          "repository", "poll_interval", "admin_uid", *_MB_KEYS})


def parse_mode(value: Any) -> int:
    """A file mode written the ``chmod`` way: ``"660"``, ``"0660"`` or ``0o660``."""
    if isinstance(value, int) and not isinstance(value, bool):
        # TOML 0o660 arrives as 432, a bare 660 as 660: read the latter's digits as octal.
        # (from_toml hands a bare decimal like 440 over as the string "440", so it is read
        # the chmod way too, not as decimal 440 = 0o670.)
        mode = int(str(value), 8) if value > 0o777 and set(str(value)) <= set("01234567") \
            else value
    else:
        try:
            mode = int(str(value), 8)
        except ValueError:
            raise ValueError(f"socket_mode must be octal digits like \"660\", not {value!r}"
                             ) from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"socket_mode {value!r} is not a permission mode (000..777)")
    return mode


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, not {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, not {value!r}") from None


def _megabytes(key: str, value: Any) -> int:
    mb = _number(key, value, float)
    if mb <= 0:
        raise ValueError(f"{key} must be > 0 MiB, not {value!r}")
    return int(mb * (1 << 20))


def _id_list(key: str, value: Any) -> list[int]:
    """uids/gids from a list (TOML), or a comma-separated string (environment)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{key} must be a list of numeric ids, not {value!r}")
    return [_number(key, i, int) for i in items if str(i).strip()]
