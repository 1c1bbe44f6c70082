"""A minimal FastCGI client, enough to make GET requests to a php-fpm pool in tests."""

from __future__ import annotations

import socket
import struct

_BEGIN, _END, _PARAMS, _STDIN, _STDOUT, _STDERR = 1, 3, 4, 5, 6, 7


def _record(rtype: int, content: bytes, rid: int = 1) -> bytes:
    return struct.pack(">BBHHBx", 1, rtype, rid, len(content), 0) + content


def _pair(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()

    def size(b: bytes) -> bytes:
        return bytes([len(b)]) if len(b) < 128 else struct.pack(">I", len(b) | 0x80000000)

    return size(n) + size(v) + n + v


def get(fpm_socket: str, script: str, query: str = "", timeout: float = 30) -> str:
    """GET ``script`` through php-fpm; return the response body (headers stripped)."""
    params = {"SCRIPT_FILENAME": script, "REQUEST_METHOD": "GET", "QUERY_STRING": query,
              "SERVER_PROTOCOL": "HTTP/1.1", "GATEWAY_INTERFACE": "CGI/1.1",
              "REQUEST_URI": "/" + query, "SCRIPT_NAME": "/page.php"}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(fpm_socket)
    s.sendall(_record(_BEGIN, struct.pack(">HB5x", 1, 0))
              + _record(_PARAMS, b"".join(_pair(k, v) for k, v in params.items()))
              + _record(_PARAMS, b"") + _record(_STDIN, b""))
    out, err, buf = b"", b"", b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 8:
            _, rtype, _, clen, plen = struct.unpack(">BBHHB", buf[:7])
            if len(buf) < 8 + clen + plen:
                break
            content, buf = buf[8:8 + clen], buf[8 + clen + plen:]
            if rtype == _STDOUT:
                out += content
            elif rtype == _STDERR:
                err += content
            elif rtype == _END:
                s.close()
                body = out.split(b"\r\n\r\n", 1)[-1]
                if err:
                    raise RuntimeError(err.decode(errors="replace"))
                return body.decode()
    s.close()
    raise RuntimeError("php-fpm closed the connection without END_REQUEST")
