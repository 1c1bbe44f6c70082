"""The ``inference.GRPCInferenceService`` wire API: method paths, message classes, a client
stub and the server-side registration, without a generated ``*_pb2_grpc`` module.

The messages (``oip_pb2``) live in the proto package ``tensorbridge.oip`` so that they import
beside ``tritonclient.grpc`` or ``kserve`` (which both register ``inference.*``); the service
path below is the protocol's own, so any OIP client or server talks to them unchanged::

    import grpc
    from tensorbridge.listeners.grpc_api import GRPCInferenceStub, pb

    stub = GRPCInferenceStub(grpc.insecure_channel("127.0.0.1:8001"))
    reply = stub.ModelInfer(pb.ModelInferRequest(model_name="echo", ...), timeout=1.0)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import grpc

#: The generated messages (``oip_pb2``; protoc's classes are made at import, hence ``Any``).
pb: Any = importlib.import_module(".oip_pb2", __package__)

__all__ = ["METHODS", "SERVICE", "GRPCInferenceStub", "handler", "pb"]

#: The service's full name on the wire (paths are ``/SERVICE/Method``).
SERVICE = "inference.GRPCInferenceService"

#: Every method served: name -> (request class, response class).
METHODS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest,
                              pb.RepositoryModelUnloadResponse),
}


class GRPCInferenceStub:
    """Client side: one callable attribute per method, e.g. ``stub.ModelInfer(request,
    timeout=1.0, metadata=[("authorization", "Bearer ...")])``."""

    def __init__(self, channel: grpc.Channel) -> None:
        for name, (request, response) in METHODS.items():
            setattr(self, name, channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=request.SerializeToString,
                response_deserializer=response.FromString))

    def __getattr__(self, name: str) -> Callable[..., Any]:  # typed access for mypy
        raise AttributeError(name)


def handler(behaviours: Mapping[str, Callable[[Any, grpc.ServicerContext], Any]]
            ) -> grpc.GenericRpcHandler:
    """Server side: the service's handler, from ``{method name: fn(request, context)}``."""
    unknown = set(behaviours) - set(METHODS)
    if unknown:
        raise ValueError(f"not methods of {SERVICE}: {sorted(unknown)}")
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=METHODS[name][0].FromString,
            response_serializer=METHODS[name][1].SerializeToString)
        for name, fn in behaviours.items()})
