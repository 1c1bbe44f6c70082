"""The gRPC listener: ``inference.GRPCInferenceService`` on grpcio, a thread pool serving
unary calls; ModelInfer takes ``raw_input_contents`` or typed ``contents`` and answers with
``raw_output_contents`` (what tritonclient and KServe's client read first)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from .._errors import InvalidInputError, TensorBridgeError
from .._spec import ErrorCode
from ._codec import CONTENTS, datatype, from_list, from_raw, shape_of
from ._gateway import Tensor
from ._service import Service
from .grpc_api import handler, pb

log = logging.getLogger("tensorbridge")

_CODES = {ErrorCode.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
          ErrorCode.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
          ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
          ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
          ErrorCode.OVERLOADED: grpc.StatusCode.UNAVAILABLE,
          ErrorCode.MODEL_ERROR: grpc.StatusCode.INTERNAL,
          ErrorCode.PROTOCOL_ERROR: grpc.StatusCode.INVALID_ARGUMENT,
          ErrorCode.UNAUTHORIZED: grpc.StatusCode.PERMISSION_DENIED,
          ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL}
#: Seconds of remaining time above which a call counts as having no deadline.
_NO_DEADLINE = 86400.0 * 365
#: Answered without a token: probes need no secret.
_OPEN = ("ServerLive", "ServerReady")


def grpc_status(exc: TensorBridgeError) -> grpc.StatusCode:
    """The gRPC status code answering ``exc``."""
    return _CODES.get(ErrorCode(exc.code), grpc.StatusCode.INTERNAL)


class GrpcListener:
    """Serves ``inference.GRPCInferenceService`` on ``host:port`` until ``stop()``."""

    def __init__(self, service: Service, host: str, port: int, token: str | None,
                 credentials: grpc.ServerCredentials | None, max_body: int,
                 workers: int) -> None:
        self.service = service
        self.token = token
        limit = min(max_body, (1 << 31) - 1)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tb-grpc"),
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        methods = {"ServerLive": self.server_live, "ServerReady": self.server_ready,
                   "ModelReady": self.model_ready, "ServerMetadata": self.server_metadata,
                   "ModelMetadata": self.model_metadata, "ModelInfer": self.model_infer,
                   "RepositoryIndex": self.repository_index,
                   "RepositoryModelLoad": self.repository_load,
                   "RepositoryModelUnload": self.repository_unload}
        self.server.add_generic_rpc_handlers(
            (handler({name: self._guard(name, fn) for name, fn in methods.items()}),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        if not self.port:
            raise OSError(f"cannot bind the gRPC listener to {address}")

    def start(self) -> None:
        """Start serving (grpcio's own threads)."""
        self.server.start()

    def stop(self) -> None:
        """Stop; the server's drain has waited for the calls in flight to be computed, and
        the short grace lets their replies leave before the connections close."""
        self.server.stop(grace=1.0).wait(5)

    def _guard(self, name: str, fn: Callable[[Any, grpc.ServicerContext], Any]
               ) -> Callable[[Any, grpc.ServicerContext], Any]:
        token = self.token

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if token is not None and name not in _OPEN and not _bearer_ok(context, token):
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "missing or wrong bearer token (metadata authorization: "
                              "Bearer ...)")
            try:
                return fn(request, context)
            except TensorBridgeError as exc:
                context.abort(grpc_status(exc), str(exc))
            except Exception as exc:
                if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                    raise
                log.exception("internal error in gRPC %s", name)
                context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {exc!r}")

        return call

    # -- the methods ---------------------------------------------------------------------

    def server_live(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.service.live())

    def server_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.ready())

    def server_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    def model_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            ready = self.service.model_ready(request.name, _version(request.version))
        except TensorBridgeError:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    def model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        meta = self.service.model_metadata(request.name, _version(request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    def model_infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        gateway = self.service.gateway
        name = request.model_name
        try:
            inputs = _inputs(request)
            timeout_us = _param(request.parameters, "timeout")
            remaining = context.time_remaining()
            # No deadline reads as a huge remainder (grpcio): only a real one becomes a budget.
            if remaining is not None and remaining < _NO_DEADLINE:
                budget = max(1, int(remaining * 1e6))
                timeout_us = min(timeout_us, budget) if timeout_us else budget
            wanted = [o.name for o in request.outputs]
        except TensorBridgeError as exc:
            gateway.count_error("grpc", exc, name)
            self.service.check_model(name, _version(request.model_version))
            raise
        answer = gateway.infer("grpc", name, _version(request.model_version), inputs,
                               timeout_us)
        outputs = answer.outputs
        if wanted:
            by_name = {t.name: t for t in outputs}
            missing = [n for n in wanted if n not in by_name]
            if missing:
                raise InvalidInputError(f"model {answer.model!r} has no output(s) {missing}; "
                                        f"its outputs: {sorted(by_name)}")
            outputs = [by_name[n] for n in wanted]
        out = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=answer.model, model_version=str(answer.version), id=request.id,
            outputs=[out(name=t.name, datatype=t.dtype.name, shape=list(t.shape))
                     for t in outputs],
            raw_output_contents=[bytes(t.raw()) for t in outputs])

    def repository_index(self, request: Any, context: grpc.ServicerContext) -> Any:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(**m) for m in self.service.repository_index(request.ready)])

    def repository_load(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = request.model_name or request.repository_name
        if "config" in request.parameters or any(k.startswith("file:")
                                                 for k in request.parameters):
            raise InvalidInputError("load parameters config and file: are not supported: the "
                                    "model's repository folder (or [models] table) is its "
                                    "configuration")
        self.service.load(name, True)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True)

    def repository_unload(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = request.model_name or request.repository_name
        self.service.unload(name, True)
        return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)


def _inputs(request: Any) -> list[Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} "
                                "inputs; give one per input, in order")
    if not request.inputs:
        raise InvalidInputError("a ModelInfer request needs at least one input")
    out = []
    for i, t in enumerate(request.inputs):
        where = f"input {t.name!r}"
        dtype = datatype(t.datatype, where)
        shape = shape_of(list(t.shape), where)
        if raw:
            out.append(from_raw(t.name, dtype, shape, raw[i]))
            continue
        field = CONTENTS.get(dtype.name)
        if field is None:
            raise InvalidInputError(f"{where}: {dtype.name} has no typed contents; send it in "
                                    "raw_input_contents")
        out.append(from_list(t.name, dtype, shape, getattr(t.contents, field)))
    return out


def _param(params: Any, key: str) -> int:
    if key not in params:
        return 0
    value = params[key]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or getattr(value, kind) < 0:
        raise InvalidInputError(f'parameter "{key}" must be a non-negative integer')
    return int(getattr(value, kind))


def _version(text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise InvalidInputError(f"model version {text!r} is not a positive integer")
    return int(text)


def _bearer_ok(context: grpc.ServicerContext, token: str) -> bool:
    for key, value in context.invocation_metadata():
        if key == "authorization":
            scheme, _, given = str(value).partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), token.encode())
    return False
