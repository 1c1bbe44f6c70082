"""ONNX Runtime backend: the digits model exported to ONNX answers as torch does (1e-5),
with the same signature, and is served with batching, instances, postprocessing and metrics."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from tensorbridge import Client
from tensorbridge._models import ModelConfig, load_model
from tensorbridge.models.digits import create

from conftest import php

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export's exporter


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The bundled digits model and its ONNX export (dynamic batch dimension)."""
    model = create().eval()
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notes
        torch.onnx.export(model, (torch.rand(2, 64) * 16,), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_shapes={"input": {0: batch}},
                          dynamo=True, external_data=False, verbose=False)
    return path, model


def test_onnx_digits_matches_torch(digits_onnx) -> None:
    path, torch_model = digits_onnx
    loaded = load_model(ModelConfig(name="digits", source=str(path)))
    reference = load_model(ModelConfig(name="digits", source="tensorbridge.models.digits:create"))
    assert loaded.signature.as_dict() == reference.signature.as_dict()
    x = torch.rand(37, 64) * 16
    got = loaded.predict({"input": x})["logits"]
    with torch.inference_mode():
        want = torch_model(x)
    assert got.dtype == torch.float32 and got.shape == (37, 10)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_onnx_served_like_torch(make_server, digits_onnx, tmp_path: Path) -> None:
    path, torch_model = digits_onnx
    repo = tmp_path / "repo"
    (repo / "digits_onnx" / "1").mkdir(parents=True)
    (repo / "digits_onnx" / "1" / "model.onnx").write_bytes(path.read_bytes())
    (repo / "digits_onnx" / "config.toml").write_text(
        "instances = 2\nmax_batch_size = 8\nmax_queue_delay_us = 2000\n"
        "[postprocess]\nsoftmax = true\ntop_k = 3\n")
    srv = make_server(["digits=tensorbridge.models.digits:create"],
                      ["--repository", str(repo)])
    x = torch.rand(4, 64) * 16
    with torch.inference_mode():
        want = torch.softmax(torch_model(x), dim=1).topk(3)
    with Client(srv.socket, timeout=10) as client:
        (meta,) = [m for m in client.models() if m["name"] == "digits_onnx"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        out = client.infer("digits_onnx", {"input": x})
        assert client.last_version == 1
        (listed,) = client.admin("list", "digits_onnx")
    assert torch.equal(out["indices"], want.indices.to(out["indices"].dtype))
    assert torch.allclose(out["scores"], want.values, atol=1e-5, rtol=0)
    assert listed["versions"][0]["backend"] == "onnx"
    # PHP gets the same answer, through the same region and reply as for torch models.
    (result,) = php({"socket": srv.socket, "calls": [{
        "op": "infer", "model": "digits_onnx",
        "inputs": {"input": {"dtype": "FP32", "values": x.tolist()}}}]})
    assert result["outputs"]["indices"]["values"] == want.indices.tolist()


def test_onnx_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="cannot be loaded by ONNX Runtime"):
        load_model(ModelConfig(name="m", source=str(bad)))
