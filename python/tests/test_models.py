"""Model loading: TorchScript files, eager factories with .pth/.safetensors weights, the TOML
config, signatures (declared, inferred, enforced) and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tensorbridge as tb

from conftest import run_cli


class Affine(torch.nn.Module):
    """y = x @ W + b, for weight-loading tests."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(n, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.lin(features)


def affine(n: int = 4) -> Affine:
    return Affine(n)


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in Affine().state_dict().items()}


def test_torchscript_file_with_inferred_signature(tmp_path: Path) -> None:
    path = tmp_path / "affine.pt"
    torch.jit.script(Affine()).save(str(path))
    model = tb.load_model(tb.ModelConfig("affine", str(path), inputs=[
        {"name": "features", "datatype": "FP32", "shape": [-1, 4]}]))
    # Output datatype and shape were learnt from the warm-up run, batch dim left dynamic.
    assert model.metadata()["outputs"] == [{"name": "output", "datatype": "FP32",
                                            "shape": [-1, 2]}]
    out = model.predict({"features": torch.ones(3, 4)})
    assert out["output"].shape == (3, 2)


def test_torchscript_input_names_come_from_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "affine.pt"
    torch.jit.script(Affine()).save(str(path))
    model = tb.load_model(tb.ModelConfig("affine", str(path)))
    assert [s["name"] for s in model.metadata()["inputs"]] == ["features"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_eager_factory_with_weights(tmp_path: Path, suffix: str) -> None:
    weights = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(_weights(), weights)
    else:
        save_file(_weights(), str(weights))
    model = tb.load_model(tb.ModelConfig.from_cli(f"a={__name__}:affine@{weights}"))
    reference = Affine()
    reference.load_state_dict(_weights())
    x = torch.rand(2, 4)
    out = model.predict({"features": x})
    assert torch.allclose(out["output"], reference(x))


def test_toml_config(tmp_path: Path) -> None:
    save_file(_weights(), str(tmp_path / "w.safetensors"))
    (tmp_path / "tb.toml").write_text(f"""
[server]
socket = "{tmp_path}/x.sock"
threads = 1
region_cap_mb = 8
allow_uid = [0]

[models.affine]
source = "{__name__}:affine"
weights = "w.safetensors"
warmup = 1
max_queue = 3
inputs = [{{name = "features", datatype = "float32", shape = [-1, 4]}}]
outputs = [{{name = "score", datatype = "FP32", shape = [-1, 2]}}]
""")
    config = tb.ServerConfig.from_toml(tmp_path / "tb.toml")
    assert config.region_cap == 8 << 20 and config.allow_uid == [0]
    (mc,) = config.models
    assert mc.weights == str(tmp_path / "w.safetensors") and mc.max_queue == 3
    model = tb.load_model(mc)
    assert model.metadata()["inputs"][0]["datatype"] == "FP32"
    assert model.predict({"features": torch.ones(1, 4)})["score"].shape == (1, 2)


def test_toml_config_rejects_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "tb.toml").write_text("[models.a]\nsource = 'x:y'\nwarm_up = 3\n")
    with pytest.raises(ValueError, match="warm_up"):
        tb.ServerConfig.from_toml(tmp_path / "tb.toml")


def test_bad_sources_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot import"):
        tb.load_model(tb.ModelConfig("m", "no_such_module:factory"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        tb.load_model(tb.ModelConfig("m", str(junk)))
    with pytest.raises(ValueError, match="NAME=PATH"):
        tb.ModelConfig.from_cli("just-a-path.pt")


def test_unavailable_device_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        tb.load_model(tb.ModelConfig("m", "tensorbridge.models.testing:echo", device="cuda"))


def test_signature_checks() -> None:
    sig = tb.Signature.parse([{"name": "x", "datatype": "FP32", "shape": [-1, 3]}], None)
    from tensorbridge._spec import BY_NAME

    fp32, i64 = BY_NAME["FP32"], BY_NAME["INT64"]
    assert sig.check_inputs({"x": (fp32, (5, 3))}) is None
    assert "must be FP32" in sig.check_inputs({"x": (i64, (5, 3))})
    assert "shape" in sig.check_inputs({"x": (fp32, (5, 4))})
    assert "shape" in sig.check_inputs({"x": (fp32, (15,))})
    assert "unexpected ['y']" in sig.check_inputs({"x": (fp32, (1, 3)), "y": (fp32, (1,))})


def test_unauthorized_uid_is_refused(tmp_path: Path) -> None:
    config = tb.ServerConfig(socket=str(tmp_path / "s.sock"), allow_uid=[4242])
    server = tb.Server(config, [tb.load_model(tb.ModelConfig(
        "echo", "tensorbridge.models.testing:echo"))])
    server.start()
    try:
        with tb.Client(config.socket) as c, pytest.raises(tb.UnauthorizedError, match="4242"):
            c.ping()
    finally:
        server.stop()


def test_cli_version_models_and_health(tmp_path: Path, make_server) -> None:
    version = subprocess.run([sys.executable, "-m", "tensorbridge", "--version"],
                             capture_output=True, text=True, check=True).stdout
    assert "torch" in version and tb.__version__ in version
    down = run_cli("health", "--socket", str(tmp_path / "none.sock"))
    assert down.returncode == 3 and "running?" in down.stderr  # ExitCode.UNREACHABLE
    server = make_server(["digits=tensorbridge.models.digits:create"])
    listed = run_cli("models", "--socket", server.socket)
    assert listed.returncode == 0, listed.stderr
    models = listed.stdout
    assert "input:FP32[-1, 64]" in models and "logits:FP32[-1, 10]" in models
    assert any("warm-up 'digits'" in line for line in server.log)  # progress is shown


def test_serve_without_models_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "tensorbridge", "serve", "--socket",
                           "/tmp/unused.sock"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--model" in proc.stderr


def test_digits_held_out_accuracy() -> None:
    # The shipped weights on the split `python -m tensorbridge.models.digits` held out.
    from tensorbridge.models import digits

    x, y = digits.load_data()
    train_idx, test_idx = digits.split()
    assert len(test_idx) == 360 and not set(train_idx.tolist()) & set(test_idx.tolist())
    model = tb.load_model(tb.ModelConfig.from_cli("d=tensorbridge.models.digits:create"))
    out = model.predict({"input": x[test_idx]})["logits"]
    accuracy = (out.argmax(1) == y[test_idx]).float().mean().item()
    print(f"digits held-out accuracy (tensor input): {accuracy:.4f} ({len(test_idx)} images)")
    assert accuracy >= 0.97


def test_digits_training_script_reaches_the_accuracy(tmp_path: Path) -> None:
    # What `python -m tensorbridge.models.digits` does (a few seconds), written elsewhere.
    from safetensors.torch import load_file

    from tensorbridge.models import digits

    accuracy = digits.train(weights_out=tmp_path / "d.safetensors")
    assert accuracy >= 0.97
    model = digits.DigitsCNN()
    model.load_state_dict(load_file(str(tmp_path / "d.safetensors")))
    x, y = digits.load_data()
    _, test_idx = digits.split()
    assert digits.accuracy(model, x[test_idx], y[test_idx]) == accuracy


def test_forward_honours_hooks_added_after_load() -> None:
    """``forward`` calls a plain module's ``forward`` directly only while nothing (a hook, a
    global hook) would make ``module(...)`` do more; hooks added later still run."""
    module = torch.nn.Identity()
    model = tb.LoadedModel(tb.ModelConfig(name="id", source="x"), module,
                           tb.Signature.parse([{"name": "x", "datatype": "FP32", "shape": [-1]}],
                                              ["y"]))
    x = torch.ones(2)
    assert torch.equal(model.forward({"x": x})["y"], x)
    handle = module.register_forward_hook(lambda _m, _args, out: out * 3)
    assert torch.equal(model.forward({"x": x})["y"], x * 3)
    handle.remove()
    glob = torch.nn.modules.module.register_module_forward_hook(lambda _m, _a, out: out + 1)
    try:
        assert torch.equal(model.forward({"x": x})["y"], x + 1)
    finally:
        glob.remove()
    assert torch.equal(model.forward({"x": x})["y"], x)
