"""The REST listener: Open Inference Protocol v2 over HTTP/1.1, with the binary tensor
extension (``Inference-Header-Content-Length``) and the model repository extension.

A small hand-written HTTP/1.1 server, a thread per keep-alive connection: the thread parses a
request, computes it (inline when its model is idle, ``_gateway``) and writes the reply with
one ``sendmsg`` of the header, the JSON and the tensors' own buffers. Measured against the
FastAPI/uvicorn binary peer of the benchmarks (docs/operations.md "OIP listeners"): the event
loop and the framework cost more per request than a thread switch here.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import ssl
import threading
from typing import Any
from urllib.parse import unquote

from .._errors import InvalidInputError, ModelNotFoundError, TensorBridgeError
from ._gateway import Answer, Tensor
from ._rest import decode_infer, encode_infer, json_object
from ._service import Service, error_status

log = logging.getLogger("tensorbridge")
_MAX_HEAD = 64 << 10
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}


class HttpError(Exception):
    """Answer with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class _Reply:
    def __init__(self, status: int, parts: list[Any], headers: dict[str, str]) -> None:
        self.status, self.parts, self.headers = status, parts, headers


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, [json.dumps(obj, separators=(",", ":")).encode()],
                  {"Content-Type": "application/json", **(headers or {})})


class HttpListener:
    """Serves the REST API on ``host:port`` until ``stop()``."""

    def __init__(self, service: Service, host: str, port: int, token: str | None,
                 tls: ssl.SSLContext | None, max_body: int, max_connections: int) -> None:
        self.service = service
        self.max_connections = max_connections
        self.token = token
        self.tls = tls
        self.max_body = max_body
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        #: Requests read and not yet answered on the wire (the server's drain waits for them).
        self.answering = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="tb-http-accept", daemon=True)

    def start(self) -> None:
        """Accept connections from a thread of its own."""
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection (their threads then leave)."""
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:  # a thread each: past max_connections a client is told, not served
                self._refuse(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="tb-http",
                             daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(1.0)
            self._send(conn, _json(503, {"error": f"the REST listener has {self.max_connections} "
                                              "connections open (max_connections); retry later"},
                                   {"Retry-After": "1"}), False)
        except OSError:
            pass
        conn.close()

    # -- one connection ------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        sock: socket.socket = conn
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(conn, server_side=True)
            buf = bytearray()
            while not self._stopped:
                keep = self._one(sock, buf)
                if not keep:
                    break
        except (OSError, ssl.SSLError) as exc:
            log.debug("http connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                sock.close()
            except OSError:
                pass

    def _one(self, sock: socket.socket, buf: bytearray) -> bool:
        """Read, serve and answer one request; False when the connection is to close."""
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > _MAX_HEAD:
                self._send(sock, _json(431, {"error": "request head over 64 KiB"}), False)
                return False
            data = sock.recv(65536)
            if not data:
                return False
            buf += data
            end = buf.find(b"\r\n\r\n")
        head = bytes(buf[:end]).decode("latin-1")
        del buf[:end + 4]
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            self._send(sock, _json(400, {"error": f"bad request line {lines[0]!r}"}), False)
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._send(sock, _json(400, {"error": f"bad header line {line!r}"}), False)
                return False
            headers[name.strip().lower()] = value.strip()
        keep = (headers.get("connection", "").lower() != "close"
                if version == "HTTP/1.1" else
                headers.get("connection", "").lower() == "keep-alive")
        try:
            body = self._body(sock, buf, headers)
        except HttpError as exc:
            self._send(sock, _json(exc.status, {"error": str(exc)}), False)
            return False
        if body is None:
            return False
        # Counted until the reply is sent: the gateway's count drops when the answer is
        # computed, and a drain that stopped there would cut the connection before the send.
        with self._lock:
            self.answering += 1
        try:
            return self._answer(sock, method, target, headers, body, keep)
        finally:
            with self._lock:
                self.answering -= 1

    def _answer(self, sock: socket.socket, method: str, target: str, headers: dict[str, str],
                body: memoryview, keep: bool) -> bool:
        try:
            reply = self._route(method, target, headers, body)
        except HttpError as exc:
            reply = _json(exc.status, {"error": str(exc)}, exc.headers)
        except TensorBridgeError as exc:
            extra = {"Retry-After": "1"} if error_status(exc) == 503 else {}
            reply = _json(error_status(exc), {"error": str(exc)}, extra)
        except Exception as exc:  # a bug must still be answered
            log.exception("internal error serving %s %s", method, target)
            reply = _json(500, {"error": f"internal server error: {exc!r}"})
        self._send(sock, reply, keep)
        return keep

    def _body(self, sock: socket.socket, buf: bytearray, headers: dict[str, str]
              ) -> memoryview | None:
        """The request body, read whole; tensors that follow a JSON header are aligned."""
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            return self._chunked(sock, buf)
        if headers.get("content-encoding", "identity").lower() != "identity":
            raise HttpError(415, "compressed request bodies are not accepted; send it plain")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if length < 0:
            raise HttpError(400, "Content-Length is negative")
        if length > self.max_body:
            raise HttpError(413, f"request body of {length} bytes is over the {self.max_body}"
                                 "-byte limit (region_cap_mb)")
        if headers.get("expect", "").lower() == "100-continue" and len(buf) < length:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            json_len = int(headers.get("inference-header-content-length", "0"))
        except ValueError:
            json_len = 0
        # Put the binary part on a 64-byte boundary, so that tensors are viewed, not copied.
        pad = -json_len % 64 if 0 < json_len <= length else 0
        body = bytearray(pad + length)
        view = memoryview(body)
        have = min(len(buf), length)
        view[pad:pad + have] = buf[:have]
        del buf[:have]
        got = pad + have
        while got < pad + length:
            n = sock.recv_into(view[got:])
            if not n:
                return None
            got += n
        return view[pad:]

    def _chunked(self, sock: socket.socket, buf: bytearray) -> memoryview | None:
        body = bytearray()
        while True:
            while b"\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return None
                buf += data
            line, _, _ = bytes(buf[:buf.index(b"\r\n")]).partition(b";")
            del buf[:buf.index(b"\r\n") + 2]
            try:
                size = int(line, 16)
            except ValueError:
                raise HttpError(400, "bad chunk size") from None
            if len(body) + size > self.max_body:
                raise HttpError(413, f"request body over the {self.max_body}-byte limit")
            while len(buf) < size + 2:
                data = sock.recv(65536)
                if not data:
                    return None
                buf += data
            body += buf[:size]
            del buf[:size + 2]
            if size == 0:
                return memoryview(body)

    def _send(self, sock: socket.socket, reply: _Reply, keep: bool) -> None:
        length = sum(len(p) for p in reply.parts)
        head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Error')}",
                f"Content-Length: {length}", "Connection: " + ("keep-alive" if keep else "close")]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        parts = [("\r\n".join(head) + "\r\n\r\n").encode(), *reply.parts]
        if self.tls is not None or len(parts) > 64:
            sock.sendall(b"".join(parts))
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    # -- routing -------------------------------------------------------------------------

    def _route(self, method: str, target: str, headers: dict[str, str], body: memoryview
               ) -> _Reply:
        path = target.split("?", 1)[0]
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if not parts or parts[0] != "v2":
            raise HttpError(404, f"no such endpoint {path!r}; the API lives under /v2")
        rest = parts[1:]
        health = rest[:1] == ["health"]
        authorized = self.token is None or _bearer_ok(headers, self.token)
        if not authorized and not health:
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                            {"WWW-Authenticate": 'Bearer realm="tensorbridge"'})
        service = self.service
        if not rest:
            _method(method, "GET")
            return _json(200, service.server_metadata())
        if health and len(rest) == 2 and rest[1] in ("live", "ready"):
            _method(method, "GET")
            ok = service.live() if rest[1] == "live" else service.ready()
            return _json(200 if ok else 503, {rest[1]: ok})
        if rest[0] == "models" and len(rest) >= 2:
            return self._model(method, rest[1:], headers, body)
        if rest[0] == "repository":
            return self._repository(method, rest[1:], body)
        raise HttpError(404, f"no such endpoint {path!r}")

    def _model(self, method: str, rest: list[str], headers: dict[str, str],
               body: memoryview) -> _Reply:
        name, rest = rest[0], rest[1:]
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise HttpError(404, "a version number must follow /versions/")
            version = _version(name, rest[1])
            rest = rest[2:]
        service = self.service
        if not rest:
            _method(method, "GET")
            return _json(200, service.model_metadata(name, version))
        if rest == ["ready"]:
            _method(method, "GET")
            if not service.model_ready(name, version):
                raise HttpError(400, f"model {name!r} is not ready")
            return _json(200, {"name": name, "ready": True})
        if rest == ["infer"]:
            _method(method, "POST")
            return self._infer(name, version, headers, body)
        raise HttpError(404, f"no such endpoint under /v2/models/{name}")

    def _infer(self, name: str, version: int | None, headers: dict[str, str],
               body: memoryview) -> _Reply:
        gateway = self.service.gateway
        try:
            request = decode_infer(body, headers.get("inference-header-content-length"))
        except TensorBridgeError as exc:
            gateway.count_error("http", exc, name)
            self.service.check_model(name, version)
            raise
        answer: Answer = gateway.infer("http", name, version, request.inputs,
                                       request.timeout_us)
        outputs: list[Tensor] = answer.outputs
        json_part, binary = encode_infer(answer, outputs, request)
        if not binary:
            return _Reply(200, [json_part], {"Content-Type": "application/json"})
        return _Reply(200, [json_part, *binary],
                      {"Content-Type": "application/octet-stream",
                       "Inference-Header-Content-Length": str(len(json_part))})

    def _repository(self, method: str, rest: list[str], body: memoryview) -> _Reply:
        _method(method, "POST")
        request = json_object(body)
        service = self.service
        if rest == ["index"]:
            ready = request.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInputError('"ready" must be true or false')
            return _json(200, service.repository_index(ready))
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            params = request.get("parameters", {})
            if not isinstance(params, dict):
                raise InvalidInputError('"parameters" must be an object')
            if rest[2] == "load":
                if "config" in params or any(k.startswith("file:") for k in params):
                    raise InvalidInputError(
                        "load parameters config and file: are not supported: the model's "
                        "repository folder (or [models] table) is its configuration")
                service.load(rest[1], True)
            else:
                service.unload(rest[1], True)
            return _json(200, {})
        raise HttpError(404, f"no such repository endpoint /v2/repository/{'/'.join(rest)}")


def _method(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(405, f"method {method} is not allowed here; use {allowed}",
                        {"Allow": allowed})


def _version(name: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1 or len(text) > 18:
        raise ModelNotFoundError(f"model {name!r} has no version {text!r} (versions are "
                                 "positive integers)")
    return int(text)


def _bearer_ok(headers: dict[str, str], token: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


__all__ = ["HttpListener"]
