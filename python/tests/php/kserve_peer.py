"""A KServe ModelServer (PyPI `kserve`, written elsewhere) serving test models over OIP REST v2,
for python/tests/test_php_http.py: the PHP HttpTransport's peer that is not TensorBridge.

Run as `python kserve_peer.py PORT [TOKEN]`. Models: `echo` (returns its inputs), `digits` (the
bundled digits CNN, FP32 [-1, 64] -> logits FP32 [-1, 10]), `sleep` (FP32 [1] milliseconds) and
`fail` (always raises). With TOKEN every request needs `Authorization: Bearer TOKEN`. Each TCP
connection a request arrives on is counted (GET /test/connections) so tests can see keep-alive.

Kept out of the pytest process: importing kserve there would clash with tritonclient's protobuf
descriptors (notes/ENV.md).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput
from kserve.model_server import app

CONNECTIONS: set[tuple[str, int]] = set()


def _response(model: str, request: InferRequest, outputs: list[InferOutput]) -> InferResponse:
    return InferResponse(response_id=request.id or "", model_name=model, infer_outputs=outputs,
                         use_binary_outputs=request.use_binary_outputs)


class Echo(Model):
    """Returns every input as an output of the same name, dtype and shape."""

    def __init__(self, name: str = "echo") -> None:
        super().__init__(name)
        self.ready = True

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        outputs = []
        for inp in payload.inputs:
            out = InferOutput(name=inp.name, shape=list(inp.shape), datatype=inp.datatype)
            out.set_data_from_numpy(inp.as_numpy(), binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return _response(self.name, payload, outputs)


class Fail(Echo):
    """Always raises, as tensorbridge.models.testing:fail does."""

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        raise ValueError("this model always fails (kserve peer)")


class Sleep(Echo):
    """Sleeps the milliseconds its FP32 [1] input `ms` says, then returns it."""

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        await asyncio.sleep(float(payload.inputs[0].as_numpy().reshape(-1)[0]) / 1000.0)
        return await super().predict(payload, headers, response_headers)


class Digits(Model):
    """The bundled digits CNN: input FP32 [-1, 64], output logits FP32 [-1, 10]."""

    def __init__(self) -> None:
        super().__init__("digits")
        from tensorbridge.models.digits import create

        self.net = create().eval()
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        import torch

        inp = payload.inputs[0]
        if inp.name != "input" or inp.datatype != "FP32" or len(inp.shape) != 2 or inp.shape[1] != 64:
            raise InvalidInput(f"digits takes input FP32 [-1, 64], got {inp.name} {inp.datatype} {inp.shape}")
        with torch.no_grad():
            logits = self.net(torch.from_numpy(inp.as_numpy().astype(np.float32))).numpy()
        out = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
        out.set_data_from_numpy(logits, binary_data=payload.use_binary_outputs)
        return _response(self.name, payload, [out])


def main() -> None:
    port = int(sys.argv[1])
    token = sys.argv[2] if len(sys.argv) > 2 else None

    @app.middleware("http")
    async def check(request: Request, call_next: Any) -> Response:
        if request.client is not None and not request.url.path.startswith("/test/"):
            CONNECTIONS.add((request.client.host, request.client.port))
        if token is not None and request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse(status_code=401, content={"error": "missing or wrong bearer token"})
        response: Response = await call_next(request)
        return response

    async def connections() -> dict[str, int]:
        return {"connections": len(CONNECTIONS)}

    app.add_api_route("/test/connections", connections, methods=["GET"])
    ModelServer(http_port=port, enable_grpc=False, workers=1).start(
        [Echo(), Fail("fail"), Sleep("sleep"), Digits()])


if __name__ == "__main__":
    main()
