"""What both listeners answer besides inference: health, server and model metadata, and the
model repository extension (index, load, unload) on top of the registry's lifecycle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import __version__
from .._backends import backend_name
from .._errors import ModelNotFoundError, TensorBridgeError, UnauthorizedError
from .._registry import FAILED, LOADING, READY, UNLOADING
from .._spec import ErrorCode
from ._gateway import Gateway

if TYPE_CHECKING:
    from ..server import Server

#: Extensions advertised by ``GET /v2`` and ServerMetadata.
EXTENSIONS = ["binary_tensor_data", "model_repository", "schedule_policy"]
#: Triton's platform names, by TensorBridge backend.
_PLATFORM = {"torchscript": "pytorch_libtorch", "eager": "pytorch", "onnx": "onnxruntime_onnx"}
#: Repository index states (Triton's words) by registry state.
_STATE = {READY: "READY", LOADING: "LOADING", UNLOADING: "UNLOADING", FAILED: "UNAVAILABLE"}

#: HTTP status of each error code (spec §7 -> the REST protocol).
HTTP_STATUS = {ErrorCode.MODEL_NOT_FOUND: 404, ErrorCode.INVALID_INPUT: 400,
               ErrorCode.PAYLOAD_TOO_LARGE: 413, ErrorCode.DEADLINE_EXCEEDED: 408,
               ErrorCode.OVERLOADED: 503, ErrorCode.MODEL_ERROR: 500,
               ErrorCode.PROTOCOL_ERROR: 400, ErrorCode.UNAUTHORIZED: 403,
               ErrorCode.INTERNAL: 500}


class Service:
    """The non-inference answers of one server, for both listeners."""

    def __init__(self, server: Server, token: str | None) -> None:
        self.server = server
        self.gateway = Gateway(server)
        #: Set when ``http_token_file`` is: repository changes need it (checked by the
        #: listener); without one they are refused, as the socket refuses ADMIN to strangers.
        self.token = token

    def live(self) -> bool:
        """Serving (not stopped)."""
        return not self.server.stopped

    def ready(self) -> bool:
        """Every model has a healthy instance and the server is not draining."""
        return self.server.ready()

    def server_metadata(self) -> dict[str, Any]:
        """``GET /v2``."""
        return {"name": "tensorbridge", "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: int | None) -> bool:
        """Whether the model (version) takes requests; ``ModelNotFoundError`` when unknown."""
        try:
            served = self.server.registry.resolve(name, version)
        except ModelNotFoundError:
            if not self.server.registry.describe(name):
                raise
            return False
        served.release()
        queue = served.queue
        return queue is not None and queue.healthy_instances() > 0

    def check_model(self, name: str, version: int | None) -> None:
        """``ModelNotFoundError`` unless the model (version) is served: a request for an unknown
        model is answered 404 even when its body is wrong too."""
        self.server.registry.resolve(name, version).release()

    def model_metadata(self, name: str, version: int | None) -> dict[str, Any]:
        """``GET /v2/models/{name}[/versions/{version}]``."""
        registry = self.server.registry
        served = registry.resolve(name, version)
        try:
            model = served.model
            assert model is not None
            signature = model.signature
            versions = [str(v["version"]) for d in registry.describe(name)
                        for v in d["versions"] if v["state"] == READY]
            return {"name": name, "versions": versions,
                    "platform": _PLATFORM.get(backend_name(served.config.source), "pytorch"),
                    "inputs": [_spec(s.as_dict()) for s in signature.inputs or ()],
                    "outputs": [_spec(s.as_dict()) for s in signature.outputs]}
        finally:
            served.release()

    def repository_index(self, ready_only: bool) -> list[dict[str, Any]]:
        """``POST /v2/repository/index``: every model and version the server knows."""
        registry = self.server.registry
        out: list[dict[str, Any]] = []
        described = registry.describe()
        for entry in described:
            versions = entry["versions"]
            if not versions and not ready_only:
                out.append({"name": entry["name"], "version": "", "state": "UNAVAILABLE",
                            "reason": "unloaded"})
            for v in versions:
                state = _STATE.get(v["state"], "UNKNOWN")
                if ready_only and state != "READY":
                    continue
                out.append({"name": entry["name"], "version": str(v["version"]),
                            "state": state, "reason": v["reason"] or ""})
        if registry.repository is not None and not ready_only:
            known = {d["name"] for d in described}
            out += [{"name": n, "version": "", "state": "UNAVAILABLE", "reason": "not loaded"}
                    for n in registry.repository.names() if n not in known]
        return sorted(out, key=lambda m: (m["name"], m["version"]))

    def load(self, name: str, authorized: bool) -> None:
        """Load (or reload what changed of) a model: the ADMIN ``load`` command."""
        self._check_admin(authorized)
        self.server.registry.admin("load", name)

    def unload(self, name: str, authorized: bool) -> None:
        """Stop routing to a model; its versions are freed once drained."""
        self._check_admin(authorized)
        self.server.registry.admin("unload", name)

    def _check_admin(self, authorized: bool) -> None:
        if self.token is None:
            raise UnauthorizedError(
                "loading and unloading models over the Open Inference Protocol needs a bearer "
                "token: set http_token_file (the socket's `tensorbridge models load` works "
                "for admin_uid)")
        if not authorized:
            raise UnauthorizedError("a valid bearer token is required")


def _spec(raw: dict[str, Any]) -> dict[str, Any]:
    # An open spec (echo's "any tensor") has no protocol datatype/shape: shown as ANY / [-1].
    return {"name": raw["name"], "datatype": raw["datatype"],
            "shape": [-1] if raw["shape"] is None else raw["shape"]}


def error_status(exc: TensorBridgeError) -> int:
    """The HTTP status answering ``exc``."""
    return HTTP_STATUS.get(ErrorCode(exc.code), 500)
