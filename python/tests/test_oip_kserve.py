"""The OIP listeners driven by KServe's Python clients (PyPI ``kserve``: InferenceRESTClient
with and without binary data, InferenceGRPCClient).

``kserve`` and ``tritonclient.grpc`` both register the ``inference`` proto package, so one
process cannot import both (the other test modules import tritonclient): the KServe calls run
in a child process (the driver below), which prints what it saw as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import OipServer

DRIVER = r'''
import asyncio, json, sys, urllib.request
import numpy as np
import grpc
import httpx
from kserve import (InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest,
                    RESTConfig)

http, grpc_url, metrics = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = f"http://{http}"
VALUES = {
    "BOOL": np.array([[True, False, True]]), "UINT8": np.array([[1, 2, 255]], np.uint8),
    "INT8": np.array([[-1, 2, 127]], np.int8), "INT16": np.array([[-300, 2, 7]], np.int16),
    "INT32": np.array([[-70000, 2, 7]], np.int32),
    "INT64": np.array([[-(2 ** 40), 2, 7]], np.int64),
    "FP16": np.array([[0.5, -2.0, 65504]], np.float16),
    "FP32": np.array([[0.25, -2.0, 1e30]], np.float32),
    "FP64": np.array([[0.1, -2.0, 1e300]], np.float64),
    "BYTES": np.array([[b"a", "\u00e9".encode(), b""]], np.object_)}


def tensor(name, x, datatype, binary):
    t = InferInput(name, list(x.shape), datatype)
    if binary is None:
        t.set_data_from_numpy(x)
    else:
        t.set_data_from_numpy(x, binary_data=binary)
    return t


def items(y):
    return [v if isinstance(v, bytes) else v.encode() if isinstance(v, str) else v
            for v in y.reshape(-1).tolist()]


def in_flight():
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
    return next(float(l.split()[1]) for l in text.splitlines()
                if l.startswith("tensorbridge_in_flight_requests "))


async def main():
    out = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    g = InferenceGRPCClient(grpc_url)
    out["ready"] = [await rest.is_server_live(base), await rest.is_server_ready(base),
                    await rest.is_model_ready(base, "head"), await g.is_server_live(),
                    await g.is_server_ready(), await g.is_model_ready("head")]
    for dt, x in VALUES.items():
        for mode in ("rest-binary", "rest-json", "grpc"):
            if dt == "FP16" and mode == "rest-json":
                continue  # the kserve client refuses FP16 as JSON itself
            t = tensor("x", x, dt, None if mode == "grpc" else mode == "rest-binary")
            request = InferRequest(model_name="echo", infer_inputs=[t])
            r = (await g.infer(request) if mode == "grpc"
                 else await rest.infer(base, request, model_name="echo"))
            y = r.outputs[0]
            out[f"{dt}/{mode}"] = [y.datatype, list(y.shape), items(y.as_numpy()) == items(x)]
    # A batch: two images in one request (head answers row by row).
    images = np.random.default_rng(2).random((2, 3, 224, 224), dtype=np.float32)
    for mode in ("rest-binary", "grpc"):
        t = tensor("input", images, "FP32", None if mode == "grpc" else True)
        request = InferRequest(model_name="head", infer_inputs=[t])
        r = (await g.infer(request) if mode == "grpc"
             else await rest.infer(base, request, model_name="head"))
        y = r.outputs[0].as_numpy()
        out[f"batch/{mode}"] = bool(np.allclose(y, images.reshape(2, -1)[:, :1000] + 1.0))
    # Errors: unknown model, wrong shape.
    bad = np.zeros((1, 3, 224, 223), np.float32)
    for model in ("no_such_model", "head"):
        try:
            await rest.infer(base, InferRequest(model_name=model, infer_inputs=[
                tensor("input", bad, "FP32", True)]), model_name=model)
            out[f"rest/{model}"] = "no error"
        except httpx.HTTPStatusError as exc:
            out[f"rest/{model}"] = [exc.response.status_code, exc.response.json()["error"]]
        try:
            await g.infer(InferRequest(model_name=model, infer_inputs=[
                tensor("input", bad, "FP32", None)]))
            out[f"grpc/{model}"] = "no error"
        except grpc.aio.AioRpcError as exc:
            out[f"grpc/{model}"] = [exc.code().name, exc.details()]
    # A deadline: while sleep computes 1.5 s, a request with a 50 ms budget (the protocol's
    # "timeout" parameter, µs) waits in its queue and is answered without being computed.
    long = asyncio.ensure_future(rest.infer(base, InferRequest(model_name="sleep", infer_inputs=[
        tensor("ms", np.array([1500], np.float32), "FP32", True)]), model_name="sleep"))
    for _ in range(2000):
        if in_flight() >= 1:
            break
        await asyncio.sleep(0.005)
    try:
        await rest.infer(base, InferRequest(model_name="sleep", infer_inputs=[
            tensor("ms", np.array([1], np.float32), "FP32", True)],
            parameters={"timeout": 50_000}), model_name="sleep")
        out["deadline"] = "no error"
    except httpx.HTTPStatusError as exc:
        out["deadline"] = [exc.response.status_code, exc.response.json()["error"]]
    await long
    await rest.close()
    await g.close()
    print(json.dumps(out))


asyncio.run(main())
'''


def test_kserve_clients(oip_server: OipServer) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, oip_server.http, oip_server.grpc,
                           str(oip_server.metrics_port)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen.pop("ready") == [True] * 6
    datatypes = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
                 "BYTES"]
    for dt in datatypes:
        for mode in ("rest-binary", "rest-json", "grpc"):
            if dt == "FP16" and mode == "rest-json":
                continue
            # A list of BYTES items comes out of a model flat: [3] (as on the socket).
            shape = [3] if dt == "BYTES" else [1, 3]
            assert seen.pop(f"{dt}/{mode}") == [dt, shape, True], (dt, mode)
    assert seen.pop("batch/rest-binary") is True and seen.pop("batch/grpc") is True
    status, message = seen.pop("rest/no_such_model")
    assert status == 404 and "no_such_model" in message
    status, message = seen.pop("rest/head")
    assert status == 400 and "[-1, 3, 224, 224]" in message
    code, message = seen.pop("grpc/no_such_model")
    assert code == "NOT_FOUND" and "no_such_model" in message
    code, message = seen.pop("grpc/head")
    assert code == "INVALID_ARGUMENT" and "[-1, 3, 224, 224]" in message
    status, message = seen.pop("deadline")
    assert status == 408 and "not computed" in message
    assert not seen
