"""A remote Open Inference Protocol server written elsewhere: KServe's ``ModelServer`` (PyPI
``kserve``) with gRPC, serving two small models for the remote-backend tests.

    python kserve_peer.py GRPC_PORT HTTP_PORT

* ``double``: ``x`` FP32 [-1, 4] -> ``y`` = 2x + 1, FP32 [-1, 4]
* ``head``: ``input`` FP32 [-1, 3, 224, 224] -> ``output`` = its first 1000 values + 1
* ``slow``: ``ms`` FP32 [1] -> sleeps that many milliseconds, answers ``ms``

Run in a process of its own: ``kserve`` registers the ``inference.*`` protobuf package, as
``tritonclient.grpc`` does.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class Double(Model):
    """y = 2x + 1."""

    def __init__(self) -> None:
        super().__init__("double")
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]

    def predict(self, payload: InferRequest, headers: Any = None, **_: Any) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32)
        out = InferOutput("y", list(x.shape), "FP32")
        out.set_data_from_numpy(x * 2 + 1, binary_data=True)
        return InferResponse(payload.id or "", self.name, [out], use_binary_outputs=True)


class Head(Model):
    """The first 1000 input values of each row, plus one."""

    def __init__(self) -> None:
        super().__init__("head")
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "output", "datatype": "FP32", "shape": [-1, 1000]}]

    def predict(self, payload: InferRequest, headers: Any = None, **_: Any) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32)
        y = x.reshape(x.shape[0], -1)[:, :1000] + 1
        out = InferOutput("output", list(y.shape), "FP32")
        out.set_data_from_numpy(y, binary_data=True)
        return InferResponse(payload.id or "", self.name, [out], use_binary_outputs=True)


class Slow(Model):
    """Sleeps ``ms`` milliseconds (a remote slower than the caller's deadline)."""

    def __init__(self) -> None:
        super().__init__("slow")
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "ms", "datatype": "FP32", "shape": [1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "ms", "datatype": "FP32", "shape": [1]}]

    async def predict(self, payload: InferRequest, headers: Any = None, **_: Any
                      ) -> InferResponse:
        ms = payload.inputs[0].as_numpy().astype(np.float32)
        await asyncio.sleep(float(ms[0]) / 1000)  # the server's loop answers others meanwhile
        out = InferOutput("ms", [1], "FP32")
        out.set_data_from_numpy(ms, binary_data=True)
        return InferResponse(payload.id or "", self.name, [out], use_binary_outputs=True)


if __name__ == "__main__":
    grpc_port, http_port = int(sys.argv[1]), int(sys.argv[2])
    ModelServer(grpc_port=grpc_port, http_port=http_port, workers=1,
                enable_docs_url=False).start([Double(), Head(), Slow()])
