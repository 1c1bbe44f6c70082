"""The OIP listeners driven by NVIDIA's Python clients (PyPI ``tritonclient``): REST with and
without the binary tensor extension, and gRPC. Metadata, every datatype, a batch, an unknown
model, a wrong shape, a deadline, and the listener label in the metrics."""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from repo_fixtures import metrics_text
from tritonclient.utils import InferenceServerException

from conftest import OipServer, wait_until

# (datatype, numpy dtype) of every datatype; BYTES and BF16 are made separately.
NUMERIC = [("BOOL", np.bool_), ("UINT8", np.uint8), ("INT8", np.int8), ("INT16", np.int16),
           ("INT32", np.int32), ("INT64", np.int64), ("FP16", np.float16),
           ("FP32", np.float32), ("FP64", np.float64)]
ALL = [d for d, _ in NUMERIC] + ["BF16", "BYTES"]
# (module, binary_data) of every client variant.
CLIENTS = [("http", True), ("http", False), ("grpc", True)]


def _client(oip: OipServer, kind: str) -> Any:
    if kind == "http":
        return thttp.InferenceServerClient(oip.http)
    return tgrpc.InferenceServerClient(oip.grpc)


def _value(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([b"tensor", "bridg\u00e9".encode(), b""], dtype=np.object_).reshape(1, 3)
    if datatype == "BF16":  # values exact in bfloat16 (tritonclient's BF16 is ml_dtypes')
        return np.array([[1.0, -2.5, 0.0], [3.0, 0.15625, -1.0e3]], dtype=ml_dtypes.bfloat16)
    dtype = dict(NUMERIC)[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    return (np.arange(6).reshape(2, 3) * (-1 if datatype[0] in "IF" else 1) + 7).astype(dtype)


def _infer(oip: OipServer, kind: str, binary: bool, model: str, inputs: dict[str, np.ndarray],
           datatypes: dict[str, str] | None = None, names: list[str] | None = None,
           **kwargs: Any) -> Any:
    mod = thttp if kind == "http" else tgrpc
    client = _client(oip, kind)
    made = []
    for name, value in inputs.items():
        datatype = (datatypes or {}).get(name) or _triton_type(value)
        tensor = mod.InferInput(name, list(value.shape), datatype)
        if kind == "http":
            tensor.set_data_from_numpy(value, binary_data=binary)
        else:
            tensor.set_data_from_numpy(value)
        made.append(tensor)
    outputs = None
    if kind == "http" and not binary:
        outputs = [thttp.InferRequestedOutput(n, binary_data=False) for n in names or inputs]
    return client.infer(model, made, outputs=outputs, **kwargs)


def _triton_type(value: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(value.dtype))


def test_server_metadata_and_health(oip_server: OipServer) -> None:
    for kind in ("http", "grpc"):
        client = _client(oip_server, kind)
        assert client.is_server_live() and client.is_server_ready()
        meta = client.get_server_metadata()
        if kind == "grpc":
            meta = {"name": meta.name, "extensions": list(meta.extensions)}
        assert meta["name"] == "tensorbridge"
        assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
        assert client.is_model_ready("head") and client.is_model_ready("head", "1")
        assert not client.is_model_ready("no_such_model")


def test_model_metadata(oip_server: OipServer) -> None:
    http = _client(oip_server, "http").get_model_metadata("head")
    assert http["name"] == "head" and http["versions"] == ["1"]
    assert http["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert http["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 1000]}]
    grpc = _client(oip_server, "grpc").get_model_metadata("head", "1")
    assert grpc.name == "head" and list(grpc.inputs[0].shape) == [-1, 3, 224, 224]
    assert grpc.outputs[0].datatype == "FP32"
    with pytest.raises(InferenceServerException) as info:
        _client(oip_server, "http").get_model_metadata("no_such_model")
    assert info.value.status() == "404" and "no_such_model" in info.value.message()


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize(("kind", "binary"), CLIENTS, ids=["http-binary", "http-json", "grpc"])
def test_every_datatype_round_trips(oip_server: OipServer, kind: str, binary: bool,
                                    datatype: str) -> None:
    if datatype == "BF16" and kind == "http" and not binary:
        pytest.skip("tritonclient refuses BF16 as JSON (test_bf16_as_json_numbers covers it)")
    value = _value(datatype)
    result = _infer(oip_server, kind, binary, "echo", {"x": value}, {"x": datatype})
    out = result.as_numpy("x")
    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else v.encode() for v in out.reshape(-1)]
        assert items == list(value.reshape(-1))
    else:
        assert out.shape == value.shape
        np.testing.assert_array_equal(out.astype(value.dtype), value)
    response = result.get_response()
    if kind == "grpc":
        assert response.model_name == "echo" and response.outputs[0].datatype == datatype
    else:
        assert response["model_name"] == "echo" and response["outputs"][0]["datatype"] == datatype
        assert ("data" in response["outputs"][0]) is not binary


def test_bf16_as_json_numbers(oip_server: OipServer) -> None:
    """BF16 in JSON: numbers in, the nearest bfloat16 computed, exact widened numbers out."""
    body = {"inputs": [{"name": "x", "shape": [3], "datatype": "BF16",
                        "data": [1.0, 0.1, -300.0]}]}
    reply = _post(oip_server, "/v2/models/echo/infer", body)
    assert reply["outputs"][0]["datatype"] == "BF16"
    assert reply["outputs"][0]["data"] == [1.0, 0.10009765625, -300.0]


def _post(oip: OipServer, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"http://{oip.http}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize(("kind", "binary"), CLIENTS, ids=["http-binary", "http-json", "grpc"])
def test_batches(oip_server: OipServer, kind: str, binary: bool) -> None:
    """A request of several rows, and concurrent requests on a batching model, each answered
    with its own rows."""
    images = np.random.default_rng(1).random((2, 3, 224, 224), dtype=np.float32)
    out = _infer(oip_server, kind, binary, "head", {"input": images},
                 names=["output"]).as_numpy("output")
    np.testing.assert_allclose(out, images.reshape(2, -1)[:, :1000] + 1.0, rtol=1e-6)
    results: dict[int, Any] = {}

    def call(i: int) -> None:
        x = np.full((i % 3 + 1, 4), float(i), dtype=np.float32)
        results[i] = (x, _infer(oip_server, kind, binary, "rows", {"x": x},
                                   names=["y", "rows"]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(6))
    for x, result in results.values():
        np.testing.assert_array_equal(result.as_numpy("y"), x * 2 + 1)
        assert (result.as_numpy("rows") >= len(x)).all()  # the batch held at least its rows


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_unknown_model_and_wrong_shape(oip_server: OipServer, kind: str) -> None:
    x = np.zeros((1, 3, 224, 223), dtype=np.float32)
    with pytest.raises(InferenceServerException) as info:
        _infer(oip_server, kind, True, "no_such_model", {"input": x})
    assert info.value.status() == ("404" if kind == "http" else "StatusCode.NOT_FOUND")
    assert "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        _infer(oip_server, kind, True, "head", {"input": x})
    assert info.value.status() == ("400" if kind == "http" else "StatusCode.INVALID_ARGUMENT")
    assert "[-1, 3, 224, 224]" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        _infer(oip_server, kind, True, "head", {"input": x.astype(np.float64)})
    assert "must be FP32, got FP64" in info.value.message()


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_deadline_of_a_queued_request(oip_server: OipServer, kind: str) -> None:
    """While ``sleep`` computes a long request, one with a 50 ms budget waits in its queue and
    is answered DEADLINE_EXCEEDED without being computed."""
    long = threading.Thread(target=_infer, args=(oip_server, kind, True, "sleep",
                                                 {"ms": np.array([1500], np.float32)}))
    long.start()
    try:
        wait_until(lambda: _gauge(oip_server, "tensorbridge_in_flight_requests") >= 1,
                   "the long request is in flight")
        with pytest.raises(InferenceServerException) as info:
            # tritonclient's ``timeout`` is the protocol's request parameter (µs); gRPC also
            # gets a deadline (client_timeout, seconds) that the server sees.
            extra = {"client_timeout": 20.0} if kind == "grpc" else {}
            _infer(oip_server, kind, True, "sleep", {"ms": np.array([1], np.float32)},
                   timeout=50_000, **extra)
        expected = "408" if kind == "http" else "StatusCode.DEADLINE_EXCEEDED"
        assert info.value.status() == expected
        assert "deadline" in info.value.message() and "not computed" in info.value.message()
    finally:
        long.join(30)


def _gauge(oip: OipServer, name: str) -> float:
    for line in metrics_text(oip.metrics_port).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_metrics_say_which_front_door(oip_server: OipServer) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    for kind in ("http", "grpc"):
        _infer(oip_server, kind, True, "echo", {"x": x})
    with pytest.raises(InferenceServerException):
        _infer(oip_server, "http", True, "head", {"input": x})
    text = metrics_text(oip_server.metrics_port)
    for kind in ("http", "grpc"):
        assert f'tensorbridge_listener_requests_total{{listener="{kind}",model="echo",' \
               'status="ok"}' in text
    assert 'tensorbridge_listener_requests_total{listener="http",model="head",' \
           'status="invalid_input"}' in text
    # ... and in the server's own request metrics, like socket requests.
    assert 'tensorbridge_requests_total{model="echo",status="ok"}' in text


def test_grpc_typed_contents_with_our_stub(oip_server: OipServer) -> None:
    """ModelInfer with typed ``contents`` instead of raw bytes (tritonclient always sends raw),
    through TensorBridge's own stub, imported beside tritonclient.grpc."""
    import grpc

    from tensorbridge.listeners.grpc_api import GRPCInferenceStub, pb

    stub = GRPCInferenceStub(grpc.insecure_channel(oip_server.grpc))
    tensor = pb.ModelInferRequest.InferInputTensor
    cases = {"BOOL": ("bool_contents", [True, False], np.bool_),
             "UINT8": ("uint_contents", [0, 255], np.uint8),
             "INT8": ("int_contents", [-128, 127], np.int8),
             "INT16": ("int_contents", [-300, 300], np.int16),
             "INT32": ("int_contents", [-(2**31), 2**31 - 1], np.int32),
             "INT64": ("int64_contents", [-(2**63), 2**63 - 1], np.int64),
             "FP32": ("fp32_contents", [0.5, -1.25], np.float32),
             "FP64": ("fp64_contents", [1e-300, -2.5], np.float64),
             "BYTES": ("bytes_contents", [b"", b"\xff\x00"], None)}
    for datatype, (field, values, dtype) in cases.items():
        contents = pb.InferTensorContents(**{field: values})
        reply = stub.ModelInfer(pb.ModelInferRequest(
            model_name="echo", id="typed", inputs=[tensor(name="t", datatype=datatype, shape=[2],
                                                         contents=contents)]), timeout=30)
        assert reply.id == "typed" and reply.outputs[0].datatype == datatype
        raw = reply.raw_output_contents[0]
        if dtype is None:
            assert raw == b"".join(len(v).to_bytes(4, "little") + v for v in values)
        else:
            assert np.frombuffer(raw, dtype=dtype).tolist() == values
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(pb.ModelInferRequest(model_name="echo", inputs=[tensor(
            name="t", datatype="FP16", shape=[1], contents=pb.InferTensorContents(
                fp32_contents=[1.0]))]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # 300 does not fit INT8
        stub.ModelInfer(pb.ModelInferRequest(model_name="echo", inputs=[tensor(
            name="t", datatype="INT8", shape=[1], contents=pb.InferTensorContents(
                int_contents=[300]))]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
