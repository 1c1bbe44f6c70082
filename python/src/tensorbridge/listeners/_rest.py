"""The REST inference body: JSON (``data`` lists) and the binary tensor extension (a JSON
header of ``Inference-Header-Content-Length`` bytes, then each binary tensor's bytes in order,
its size in the tensor's ``binary_data_size`` parameter)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .._errors import InvalidInputError
from ._codec import datatype, from_list, from_raw, shape_of, to_list
from ._gateway import Answer, Tensor


@dataclass
class InferBody:
    """A decoded infer request."""

    inputs: list[Tensor]
    id: str | None = None
    timeout_us: int = 0
    #: Requested outputs by name -> binary or not (None = all outputs, ``binary_default``).
    outputs: dict[str, bool] | None = None
    binary_default: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def decode_infer(body: memoryview, header_length: str | None) -> InferBody:
    """Parse a request body; ``InvalidInputError`` says what is wrong."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInputError("Inference-Header-Content-Length is not a number") from None
        if not 0 <= n <= len(body):
            raise InvalidInputError(f"Inference-Header-Content-Length {n} is outside the "
                                    f"{len(body)}-byte body")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, body[:0]
    obj = json_object(head)
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError('"inputs" must be a non-empty list of tensors')
    params = _params(obj.get("parameters"), "request")
    timeout = params.get("timeout", 0)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidInputError('parameter "timeout" must be a non-negative integer (µs)')
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError('"id" must be a string')
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInputError('parameter "binary_data_output" must be true or false')
    inputs, cursor = [], 0
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInputError(f"inputs[{i}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"inputs[{i}]: \"name\" must be a non-empty string")
        where = f"input {name!r}"
        dtype = datatype(raw.get("datatype"), where)
        shape = shape_of(raw.get("shape"), where)
        size = _params(raw.get("parameters"), where).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInputError(f"{where}: binary_data_size must be a non-negative "
                                        "integer")
            if cursor + size > len(binary):
                raise InvalidInputError(
                    f"{where}: binary_data_size {size} runs past the binary part "
                    f"({len(binary)} bytes after the {len(head)}-byte JSON header)")
            inputs.append(from_raw(name, dtype, shape, binary[cursor:cursor + size]))
            cursor += size
        elif "data" in raw:
            data = raw["data"]
            if not isinstance(data, list):
                raise InvalidInputError(f"{where}: \"data\" must be a list")
            inputs.append(from_list(name, dtype, shape, data))
        else:
            raise InvalidInputError(f"{where}: give \"data\" or a binary_data_size parameter")
    if cursor != len(binary):
        raise InvalidInputError(f"{len(binary) - cursor} bytes of binary data follow the "
                                "inputs' binary_data_size")
    outputs = None
    raw_outputs = obj.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInputError('"outputs" must be a list')
        outputs = {}
        for i, out in enumerate(raw_outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidInputError(f"outputs[{i}] must be an object with a \"name\"")
            flag = _params(out.get("parameters"), f"output {out['name']!r}").get(
                "binary_data", binary_default)
            if not isinstance(flag, bool):
                raise InvalidInputError(f"output {out['name']!r}: binary_data must be true "
                                        "or false")
            outputs[out["name"]] = flag
    return InferBody(inputs, request_id, timeout, outputs, binary_default)


def encode_infer(answer: Answer, outputs: list[Tensor], request: InferBody
                 ) -> tuple[bytes, list[bytes | memoryview]]:
    """(JSON part, binary parts) of the reply; no binary parts = plain JSON."""
    chosen = outputs
    if request.outputs is not None:
        by_name = {t.name: t for t in outputs}
        missing = [n for n in request.outputs if n not in by_name]
        if missing:
            raise InvalidInputError(f"model {answer.model!r} has no output(s) {missing}; its "
                                    f"outputs: {sorted(by_name)}")
        chosen = [by_name[n] for n in request.outputs]
    described, binary = [], []
    for tensor in chosen:
        wants_binary = (request.outputs[tensor.name] if request.outputs is not None
                        else request.binary_default)
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.dtype.name,
                                 "shape": list(tensor.shape)}
        if wants_binary:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = to_list(tensor)
        described.append(entry)
    reply: dict[str, Any] = {"model_name": answer.model, "model_version": str(answer.version)}
    if request.id is not None:
        reply["id"] = request.id
    reply["outputs"] = described
    return json.dumps(reply, separators=(",", ":")).encode(), binary


def json_object(data: memoryview) -> dict[str, Any]:
    """A request's JSON object (an empty body is ``{}``); ``InvalidInputError`` otherwise."""
    if not len(data):
        return {}
    try:
        obj = json.loads(bytes(data))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInputError("request body must be a JSON object")
    return obj


def _params(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where}: \"parameters\" must be an object")
    return raw
