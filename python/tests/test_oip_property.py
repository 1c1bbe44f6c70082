"""Property-based test of the REST listener, written from the protocol's published text
(docs/oip-rest.openapi.yaml summarises it): every valid request is answered 200 with its
tensors intact, every invalid one 4xx with ``{"error": "<message>"}``; never a 5xx.

Requests are built by hypothesis from the protocol's rules (inference request JSON, the
binary tensor extension's ``Inference-Header-Content-Length`` and ``binary_data_size``, the
metadata, health and repository endpoints); invalid ones are valid ones with one rule broken,
or arbitrary JSON and bytes. 1,100 cases against the shared OIP server.
"""

from __future__ import annotations

import http.client
import json
import math
from typing import Any

import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import ROOT, OipServer

INTS = {"UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
        "INT64": np.int64}
DATATYPES = ["BOOL", *INTS, "FP16", "FP32", "FP64", "BF16", "BYTES"]
CASES = settings(max_examples=550, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


def _items(datatype: str, count: int) -> st.SearchStrategy[list[Any]]:
    if datatype == "BOOL":
        item: st.SearchStrategy[Any] = st.booleans()
    elif datatype in INTS:
        info = np.iinfo(INTS[datatype])
        item = st.integers(int(info.min), int(info.max))
    elif datatype == "FP16":
        item = st.integers(-2048, 2048).map(float)  # exact in float16
    elif datatype == "BF16":
        item = st.integers(-256, 256).map(float)  # exact in bfloat16
    elif datatype == "FP32":
        item = st.floats(width=32, allow_nan=False, allow_infinity=False)
    elif datatype == "FP64":
        item = st.floats(allow_nan=False, allow_infinity=False)
    else:
        item = st.text(max_size=6)
    return st.lists(item, min_size=count, max_size=count)


def _raw(datatype: str, items: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in (s.encode() for s in items))
    if datatype == "BF16":
        return torch.tensor(items, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    dtype = {"BOOL": np.bool_, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
             **INTS}[datatype]
    return np.array(items, dtype=dtype).tobytes()


@st.composite
def tensors(draw: st.DrawFn, name: str) -> dict[str, Any]:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    items = draw(_items(datatype, math.prod(shape)))
    return {"name": name, "datatype": datatype, "shape": shape, "items": items,
            "binary": draw(st.booleans()), "binary_out": draw(st.booleans())}


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any], bytes]:
    names = draw(st.lists(st.sampled_from(["a", "b", "x", "input_1", "é"]), min_size=1,
                          max_size=3, unique=True))
    specs = [draw(tensors(n)) for n in names]
    inputs, binary = [], b""
    for spec in specs:
        entry = {"name": spec["name"], "datatype": spec["datatype"], "shape": spec["shape"]}
        if spec["binary"]:
            raw = _raw(spec["datatype"], spec["items"])
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary += raw
        else:
            entry["data"] = spec["items"]
        inputs.append(entry)
    body: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=8))
    if draw(st.booleans()):
        body["outputs"] = [{"name": s["name"], "parameters": {"binary_data": s["binary_out"]}}
                           for s in specs]
    else:
        for s in specs:
            s["binary_out"] = False
    return specs, body, binary


def _send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def _decoded(headers: dict[str, str], data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    n = int(headers.get("inference-header-content-length", len(data)))
    reply = json.loads(data[:n])
    parts, cursor = {}, n
    for out in reply["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            parts[out["name"]] = data[cursor:cursor + size]
            cursor += size
    assert cursor == len(data)
    return reply, parts


@given(case=infer_requests(), get=st.sampled_from([
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/head", "/v2/models/echo/ready",
    "/v2/models/head/versions/1", "/v2/models/digits/versions/1/ready", "/v2/models/sleep"]))
@CASES
def test_valid_requests_get_200_and_their_tensors(oip_server: OipServer, case: Any,
                                                  get: str) -> None:
    host, port = oip_server.http.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    status, _, data = _send(conn, "GET", get)
    assert status == 200, data
    assert isinstance(json.loads(data), dict)
    specs, body, binary = case
    header = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if binary or any(s["binary_out"] for s in specs):
        headers["Inference-Header-Content-Length"] = str(len(header))
    status, rh, data = _send(conn, "POST", "/v2/models/echo/infer", header + binary, headers)
    assert status == 200, data
    reply, parts = _decoded(rh, data)
    assert reply["model_name"] == "echo" and reply.get("id") == body.get("id")
    assert [o["name"] for o in reply["outputs"]] == [s["name"] for s in specs]
    for spec, out in zip(specs, reply["outputs"], strict=True):
        assert out["datatype"] == spec["datatype"]
        if spec["binary_out"]:
            assert parts[spec["name"]] == _raw(spec["datatype"], spec["items"])
        elif spec["datatype"] == "BYTES":
            assert out["data"] == spec["items"]
        else:
            assert out["data"] == spec["items"]  # exact: the values fit their datatype
        if spec["datatype"] != "BYTES":
            assert out["shape"] == spec["shape"]
    conn.close()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4), max_leaves=12)


@st.composite
def broken_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, body, headers) with one protocol rule broken."""
    kind = draw(st.sampled_from([
        "json", "bytes", "datatype", "shape", "count", "item", "binary_size", "header_len",
        "unknown_model", "version", "method", "path", "outputs", "trailing", "inputs"]))
    specs, body, binary = draw(infer_requests())
    path, method = "/v2/models/echo/infer", "POST"
    headers = {"Inference-Header-Content-Length": "0"}
    first = body["inputs"][0]
    if kind == "json":
        return method, path, json.dumps(draw(_json_values)).encode(), {}
    if kind == "bytes":
        return method, path, draw(st.binary(min_size=1, max_size=64)).replace(b"{", b"("), {}
    if kind == "datatype":
        first["datatype"] = draw(st.sampled_from(["FP8", "fp32", "FLOAT", "", "UINT16", 7]))
    elif kind == "shape":
        first["shape"] = draw(st.sampled_from([[-1], "2", [1.5], [None], [2**40], [True],
                                               list(range(9))]))
    elif kind == "count":
        first["shape"] = [*first["shape"], 2] if math.prod(first["shape"]) else [1]
    elif kind == "item":
        first.pop("parameters", None)
        first["data"] = [{"no": 1}] * math.prod(first["shape"]) or [[], {}]
        binary = b"".join(_raw(s["datatype"], s["items"]) for s in specs[1:] if s["binary"])
    elif kind == "binary_size":
        first["parameters"] = {"binary_data_size": len(binary) + 1 + draw(st.integers(0, 9))}
        first.pop("data", None)
    elif kind == "header_len":
        headers["Inference-Header-Content-Length"] = draw(st.sampled_from(["-1", "x", "99999"]))
    elif kind == "unknown_model":
        path = f"/v2/models/{draw(st.sampled_from(['nope', 'echo2', 'ECHO']))}/infer"
    elif kind == "version":
        path = f"/v2/models/echo/versions/{draw(st.sampled_from(['0', '7', 'x', '-1']))}/infer"
    elif kind == "method":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE"]))
    elif kind == "path":
        path = draw(st.sampled_from(["/v3/models/echo/infer", "/v2/models/echo/run",
                                     "/v2/health", "/v2/repository/models/echo/reload",
                                     "/v2/models/echo/versions"]))
    elif kind == "outputs":
        body["outputs"] = draw(st.sampled_from([[{"name": "zz"}], "x", [7], [{"name": 1}]]))
    elif kind == "trailing":
        binary += b"\0" * draw(st.integers(1, 8))
    elif kind == "inputs":
        body["inputs"] = draw(st.sampled_from([[], {}, None, [1], [{"name": ""}]]))
    header = json.dumps(body).encode()
    if headers["Inference-Header-Content-Length"] == "0":
        headers["Inference-Header-Content-Length"] = str(len(header))
    return method, path, header + binary, headers


@given(case=broken_requests())
@CASES
def test_invalid_requests_get_4xx_with_a_message(oip_server: OipServer, case: Any) -> None:
    method, path, body, headers = case
    host, port = oip_server.http.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    status, rh, data = _send(conn, method, path, body, headers)
    assert 400 <= status < 500, (status, data)
    error = json.loads(data)["error"]
    assert isinstance(error, str) and error
    assert rh["content-type"] == "application/json"
    conn.close()


# -- schemathesis: the same listener against docs/oip-rest.openapi.yaml ------------------

@pytest.fixture
def oip_schema(oip_server: OipServer) -> Any:
    schema = schemathesis.openapi.from_path(ROOT / "docs" / "oip-rest.openapi.yaml")
    schema.config.update(base_url=f"http://{oip_server.http}")
    return schema


openapi = schemathesis.pytest.from_fixture("oip_schema")


@openapi.parametrize()
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_openapi_document(case: Any) -> None:
    """Every operation of the document, schemathesis' own cases (5 each): never a 5xx, only
    documented statuses and content types, bodies that match the document's schemas. (Its
    "schema-valid data is accepted" check does not apply: no schema can say that ``data``
    must hold prod(shape) items, so such requests are rightly 400.)"""
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                   content_type_conformance, response_schema_conformance])
