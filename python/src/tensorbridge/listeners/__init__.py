"""Open Inference Protocol (KServe v2) listeners inside ``tensorbridge serve``.

- ``http``: REST v2 with the binary tensor and model repository extensions (``--http-port``).
- ``grpc_server``: ``inference.GRPCInferenceService`` on grpcio (``--grpc-port``).
- ``grpc_api`` / ``oip_pb2``: the gRPC messages and a client stub (usable on their own).
- ``_gateway``: where an OIP request becomes the socket path's typed ``Request``.

Translation only: both listeners run requests on the server's models, queues, batching,
deadlines and metrics. A listener bound beyond loopback needs a bearer token file or TLS.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._settings import ConfigError

if TYPE_CHECKING:
    from .._config import ServerConfig
    from ..server import Server

__all__ = ["Listeners", "check_config"]
log = logging.getLogger("tensorbridge")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(config: ServerConfig) -> str | None:
    """The bearer token of ``http_token_file`` (None when unset); ``ConfigError`` if unusable."""
    if not config.http_token_file:
        return None
    try:
        token = Path(config.http_token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"http_token_file = {config.http_token_file!r}: cannot read it: "
                          f"{exc.strerror or exc}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"http_token_file = {config.http_token_file!r}: the token must be "
                          "one line of at least 16 characters without spaces")
    return token


def check_config(config: ServerConfig) -> None:
    """Refuse (``ConfigError``: exit 2) a listener beyond loopback with neither a bearer token
    nor TLS, a half TLS setting, or both listeners on one port."""
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ConfigError("tls_cert_file and tls_key_file go together: give both, or neither")
    for kind, host, port in (("http", config.http_host, config.http_port),
                             ("grpc", config.grpc_host, config.grpc_port)):
        if port and not _loopback(host) and not (config.http_token_file
                                                 or config.tls_cert_file):
            raise ConfigError(
                f"{kind}_host = {host!r} is not a loopback address: a {kind} listener "
                "reachable from other hosts needs a bearer token (http_token_file) or TLS "
                f"(tls_cert_file and tls_key_file); or bind {kind}_host = \"127.0.0.1\"")
    if config.grpc_port and importlib.util.find_spec("grpc") is None:
        raise ConfigError("grpc_port needs grpcio, which is not installed: pip install "
                          "'tensorbridge[oip]' (grpcio and protobuf)")
    if config.http_port and config.http_port == config.grpc_port:
        raise ConfigError(f"http_port and grpc_port are both {config.http_port}; give each "
                          "listener a port of its own")
    read_token(config)


class Listeners:
    """The server's OIP listeners (none, one or both), started and stopped together."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http: Any = None
        self.grpc: Any = None
        self.service: Any = None

    def start(self) -> None:
        """Bind and start what the config asks for; ``OSError`` when a port is taken."""
        config = self.server.config
        if not (config.http_port or config.grpc_port):
            return
        check_config(config)
        from ._service import Service

        token = read_token(config)
        self.service = Service(self.server, token)
        max_body = config.region_cap
        if config.http_port:
            from .http import HttpListener

            tls = None
            if config.tls_cert_file and config.tls_key_file:
                tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                tls.load_cert_chain(config.tls_cert_file, config.tls_key_file)
            self.http = HttpListener(self.service, config.http_host, config.http_port, token,
                                     tls, max_body, config.max_connections)
            self.http.start()
            log.info("OIP REST listener on %s://%s:%d/v2", "https" if tls else "http",
                     config.http_host, self.http.port)
        if config.grpc_port:
            from .grpc_server import GrpcListener

            credentials = None
            if config.tls_cert_file and config.tls_key_file:
                import grpc

                credentials = grpc.ssl_server_credentials([(
                    Path(config.tls_key_file).read_bytes(),
                    Path(config.tls_cert_file).read_bytes())])
            self.grpc = GrpcListener(self.service, config.grpc_host, config.grpc_port, token,
                                     credentials, max_body, max(4, config.io_threads))
            self.grpc.start()
            log.info("OIP gRPC listener on %s:%d%s", config.grpc_host, self.grpc.port,
                     " (TLS)" if credentials else "")

    def pending(self) -> int:
        """Listener requests received and not answered yet (REST: until the reply is sent)."""
        if self.service is None:
            return 0
        sending = self.http.answering if self.http is not None else 0
        return max(int(self.service.gateway.pending), int(sending))

    def close(self) -> None:
        """Stop accepting (drain: in-flight requests still get their answers)."""
        for listener in (self.http, self.grpc):
            if listener is not None:
                listener.stop()
        self.http = self.grpc = None
