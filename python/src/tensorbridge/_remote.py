"""The remote backend: a model served by an Open Inference Protocol gRPC server elsewhere.

``[models.X] remote = "grpc://host:port"`` makes the node-local server forward each INFER to
``inference.GRPCInferenceService/ModelInfer`` of that server (Triton, KServe, MLServer or
another TensorBridge's ``--grpc-port``); PHP keeps its shared-memory hop to the local socket.

* The signature (inputs/outputs) is the remote's ``ModelMetadata``, read when the model loads;
  a model whose table declares ``inputs`` and ``outputs`` also loads while the remote is down
  (breaker open).
* The call's gRPC deadline is the smaller of the request's remaining deadline (less a
  reserve for the reply) and ``remote_timeout``; a passed deadline answers
  ``DEADLINE_EXCEEDED``.
* A breaker: a call that finds the remote down (gRPC ``UNAVAILABLE``), or a ``ModelReady``
  poll that fails or says not ready, opens it. While open, calls fail at once with
  ``OVERLOADED`` (no connection attempt, no waiting), the model counts no healthy instance
  (PING's ``ready`` is false, ``tensorbridge_instances_alive`` is 0, ``tensorbridge health``
  fails) and ``ModelReady`` is polled every ``remote_poll_interval`` until it answers ready.
"""

from __future__ import annotations

import importlib
import logging
import struct
import threading
import time
import weakref
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from ._errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelError,
    ModelNotFoundError,
    OverloadedError,
    TensorBridgeError,
)
from ._request import call_deadline
from ._signature import Signature
from ._spec import BY_NAME, BY_TORCH

if TYPE_CHECKING:
    from ._models import ModelConfig

log = logging.getLogger("tensorbridge")

__all__ = ["RemoteModule", "is_remote", "load_remote", "url_problem"]

_SCHEMES = ("grpc", "grpcs")
#: Typed ``contents`` fields of a response that came without raw bytes, by datatype.
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "INT8": "int_contents",
             "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
#: Most of the request's remaining deadline kept back from the remote call (s), so that a
#: remote that does not answer in time is reported to the caller before it gives up.
_REPLY_RESERVE = 0.1
#: Larger than gRPC's 4 MiB default: a batch of images is more.
_MAX_MESSAGE = 1 << 30


def is_remote(source: str) -> bool:
    """Whether ``source`` names a remote OIP server (``grpc://`` or ``grpcs://``)."""
    return source.split("://", 1)[0] in _SCHEMES and "://" in source


def url_problem(url: str) -> str | None:
    """Why ``url`` is no ``grpc://HOST:PORT`` / ``grpcs://HOST:PORT``, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a URL"
    if parts.scheme not in _SCHEMES or not parts.hostname or not port:
        return "not grpc://HOST:PORT or grpcs://HOST:PORT"
    return None


def _api() -> Any:
    """The OIP gRPC module (``listeners.grpc_api``: messages ``pb``, ``GRPCInferenceStub``,
    and ``grpc`` itself), imported late: only servers with a remote model need grpcio."""
    try:
        return importlib.import_module("tensorbridge.listeners.grpc_api")
    except ImportError as exc:
        raise ValueError(f"remote models need grpcio ({exc}); pip install "
                         "'tensorbridge[oip]'") from None


class _Breaker:
    """Whether the remote is believed up; flips on call outcomes and ``ModelReady`` polls."""

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self.up = True
        self.reason = ""
        self.since = time.monotonic()
        self._on_change = on_change
        self._lock = threading.Lock()

    def set(self, up: bool, reason: str = "") -> None:
        with self._lock:
            if up == self.up:
                return
            self.up, self.reason, self.since = up, reason, time.monotonic()
        self._on_change(up)


class RemoteModule:
    """A remote OIP model called like a torch module: tensors in signature order in, a tuple
    of output tensors out. Thread-safe: the model's instances share its channels."""

    def __init__(self, config: ModelConfig) -> None:
        api = _api()
        grpc = api.grpc
        self._grpc = grpc
        self._pb = api.pb
        self.name = config.name
        self.url = config.remote or config.source
        problem = url_problem(self.url)
        if problem:
            raise ValueError(f"model {self.name!r}: remote = {self.url!r}: {problem}")
        parts = urlsplit(self.url)
        self.target = f"{parts.hostname}:{parts.port}"
        self.remote_model = config.remote_model or config.name
        self.remote_version = config.remote_version or ""
        self.timeout = config.remote_timeout
        self.poll_interval = config.remote_poll_interval
        self._metadata: list[tuple[str, str]] = []
        if config.remote_token_file:
            token = Path(config.remote_token_file).read_text().strip()
            self._metadata.append(("authorization", f"Bearer {token}"))
        options = [("grpc.max_send_message_length", _MAX_MESSAGE),
                   ("grpc.max_receive_message_length", _MAX_MESSAGE),
                   # Channels of one process are otherwise shared as one subchannel: a pool
                   # of N must be N connections.
                   ("grpc.use_local_subchannel_pool", 1),
                   # Reconnect soon after the remote comes back (default backoff reaches 120 s).
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        if parts.scheme == "grpcs":
            ca = Path(config.remote_ca_file).read_bytes() if config.remote_ca_file else None
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self._channels = [grpc.secure_channel(self.target, creds, options)
                              for _ in range(config.remote_pool)]
        else:
            self._channels = [grpc.insecure_channel(self.target, options)
                              for _ in range(config.remote_pool)]
        self._next = count()
        self._stubs = [api.GRPCInferenceStub(c) for c in self._channels]
        self._watchers: list[weakref.WeakMethod[Callable[[], None]]] = []
        self.breaker = _Breaker(self._changed)
        try:
            self.declared = self._read_metadata()
        except ValueError as exc:
            if config.inputs is None or config.outputs is None:
                raise ValueError(f"{exc}; to start while the remote is down, declare the "
                                 "model's inputs and outputs in its table") from None
            # Declared: serve it with the breaker open until ModelReady answers.
            log.warning("%s; starting with its declared signature, breaker open", exc)
            self.declared = Signature.parse(config.inputs, config.outputs).as_dict()
            self.breaker.set(False, "ModelMetadata failed when the model loaded")
        self._stop = threading.Event()
        self._poller = threading.Thread(target=_poll, args=(weakref.ref(self), self._stop),
                                        name=f"tb-remote-{self.name}", daemon=True)
        self._poller.start()

    # -- what the model side sees ----------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the breaker is open: the model then counts no healthy instance."""
        return self.breaker.up

    def watch_availability(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (a bound method, held weakly) whenever ``available`` flips."""
        self._watchers.append(weakref.WeakMethod(callback))

    def signature(self) -> dict[str, Any]:
        """``{inputs, outputs}`` specs from the remote's ModelMetadata."""
        return self.declared

    def eval(self) -> RemoteModule:
        """Nothing to switch (kept for the torch module protocol)."""
        return self

    def close(self) -> None:
        """Stop polling and close the channels."""
        self._stop.set()
        for channel in self._channels:
            channel.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the channels may be gone already
            pass

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        if not self.breaker.up:
            raise OverloadedError(
                f"model {self.name!r}: its remote {self.url} is unavailable "
                f"({self.breaker.reason}) for {time.monotonic() - self.breaker.since:.1f} s; "
                f"the breaker is open and ModelReady is polled every {self.poll_interval:g} s. "
                "Retry later")
        timeout = self.timeout
        deadline = call_deadline.get()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(f"model {self.name!r}: the request's deadline "
                                            "passed before it was sent to the remote")
            # Keep part of the budget for the reply: the caller's clock started first.
            timeout = min(timeout, left - min(_REPLY_RESERVE, left * 0.1))
        request = self._request(inputs)
        stub = self._stubs[next(self._next) % len(self._stubs)]
        try:
            response = stub.ModelInfer(request, timeout=timeout, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            raise self._error(exc, timeout) from None
        return self._outputs(response)

    # -- internals -------------------------------------------------------------------------

    def _changed(self, up: bool) -> None:
        if up:
            log.info("model %r: remote %s is ready again; breaker closed", self.name, self.url)
        else:
            log.warning("model %r: remote %s is unavailable (%s); breaker open, polling "
                        "ModelReady every %g s", self.name, self.url, self.breaker.reason,
                        self.poll_interval)
        for ref in list(self._watchers):
            callback = ref()
            if callback is not None:
                callback()

    def _read_metadata(self) -> dict[str, Any]:
        request = self._pb.ModelMetadataRequest(name=self.remote_model,
                                                version=self.remote_version)
        try:
            meta = self._stubs[0].ModelMetadata(request, timeout=self.timeout,
                                                metadata=self._metadata)
        except self._grpc.RpcError as exc:
            raise ValueError(f"model {self.name!r}: ModelMetadata of {self.remote_model!r} "
                             f"from {self.url} failed: {exc.code().name}: {exc.details()}"
                             ) from None

        def specs(tensors: Any, side: str) -> list[dict[str, Any]]:
            out = []
            for t in tensors:
                if t.datatype not in BY_NAME:
                    raise ValueError(f"model {self.name!r}: remote {side} {t.name!r} is "
                                     f"{t.datatype}, which the socket protocol cannot carry")
                out.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape)})
            return out

        return {"inputs": specs(meta.inputs, "input"), "outputs": specs(meta.outputs, "output")}

    def _request(self, inputs: tuple[Any, ...]) -> Any:
        request = self._pb.ModelInferRequest(model_name=self.remote_model,
                                             model_version=self.remote_version)
        for spec, value in zip(self.declared["inputs"], inputs, strict=True):
            if isinstance(value, torch.Tensor):
                shape, raw = list(value.shape), _tensor_bytes(value)
                datatype = BY_TORCH[value.dtype].name
            else:  # BYTES: a list of bytes/str items, each sent length-prefixed
                items = [v.encode() if isinstance(v, str) else bytes(v) for v in value]
                shape, datatype = [len(items)], "BYTES"
                raw = b"".join(struct.pack("<I", len(v)) + v for v in items)
            request.inputs.add(name=spec["name"], datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
        return request

    def _outputs(self, response: Any) -> tuple[Any, ...]:
        raws = response.raw_output_contents
        by_name = {}
        for i, out in enumerate(response.outputs):
            shape = list(out.shape)
            if i < len(raws):
                by_name[out.name] = _from_bytes(out.datatype, shape, raws[i])
            else:
                by_name[out.name] = _from_contents(out.datatype, shape, out.contents)
        wanted = [s["name"] for s in self.declared["outputs"]]
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ModelError(f"model {self.name!r}: the remote's answer lacks outputs "
                             f"{missing} of its metadata")
        return tuple(by_name[n] for n in wanted)

    def _error(self, exc: Any, timeout: float) -> TensorBridgeError:
        code, details = exc.code(), exc.details()
        text = f"model {self.name!r} at remote {self.url}: {code.name}: {details}"
        status = self._grpc.StatusCode
        if code == status.UNAVAILABLE:
            self.breaker.set(False, f"{code.name}: {details}")
            return OverloadedError(f"{text}; retry later")
        if code == status.DEADLINE_EXCEEDED:
            return DeadlineExceededError(f"{text} (gRPC deadline {timeout * 1000:.0f} ms: the "
                                         "request's remaining deadline or remote_timeout)")
        if code == status.RESOURCE_EXHAUSTED:
            return OverloadedError(text)
        if code == status.INVALID_ARGUMENT:
            return InvalidInputError(text)
        if code == status.NOT_FOUND:
            return ModelNotFoundError(text)
        return ModelError(text)

    def poll_once(self) -> None:
        """Ask ModelReady once and set the breaker from the answer."""
        request = self._pb.ModelReadyRequest(name=self.remote_model, version=self.remote_version)
        ready, reason = True, ""
        # Every channel is asked: one left in reconnect backoff would fail the first calls
        # after the breaker closes, and open it again.
        for stub in self._stubs:
            try:
                if not stub.ModelReady(request, timeout=max(1.0, self.poll_interval),
                            metadata=self._metadata).ready:
                    ready, reason = False, "ModelReady: not ready"
            except self._grpc.RpcError as exc:
                ready, reason = False, f"ModelReady: {exc.code().name}: {exc.details()}"
        self.breaker.set(ready, reason)


def _poll(ref: weakref.ref[RemoteModule], stop: threading.Event) -> None:
    """The breaker's poller; holds the module weakly so a freed model version ends it."""
    while True:
        module = ref()
        if module is None:
            return
        interval = module.poll_interval
        module.poll_once()
        del module
        if stop.wait(interval):
            return


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: its raw bits travel
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def _from_bytes(datatype: str, shape: list[int], raw: bytes) -> Any:
    if datatype == "BYTES":
        items, at = [], 0
        while at < len(raw):
            (n,) = struct.unpack_from("<I", raw, at)
            items.append(raw[at + 4:at + 4 + n])
            at += 4 + n
        return items
    dtype = BY_NAME[datatype].torch
    assert dtype is not None
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if raw else \
        torch.empty(shape, dtype=dtype)


def _from_contents(datatype: str, shape: list[int], contents: Any) -> Any:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise ModelError(f"a remote {datatype} output must come as raw_output_contents")
    values = list(getattr(contents, field))
    if datatype == "BYTES":
        return values
    dtype = BY_NAME[datatype].torch
    return torch.tensor(values, dtype=dtype).reshape(shape)


def load_remote(config: ModelConfig) -> tuple[RemoteModule, dict[str, Any]]:
    """(module, declared signature) of a remote model; ``ValueError`` says what is wrong."""
    module = RemoteModule(config)
    return module, module.signature()
