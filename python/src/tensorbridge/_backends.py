"""Model backends behind one interface: a callable module plus the signature it declares.

Every backend turns a ``ModelConfig.source`` into ``(module, declared)``: ``module`` is called
with the inputs in signature order and returns tensors (or a tuple/dict of them), ``declared``
holds the ``inputs``/``outputs`` specs the backend knows. ``LoadedModel`` then adds the same
pipelines, batching, instances and metrics whatever the backend is.

* ``torchscript``: a ``torch.jit.save`` file (``.pt``/``.ts``).
* ``eager``: ``package.module:factory`` or a ``model.py`` file exporting ``create()``, with
  optional weights (``.pth``/``.safetensors``).
* ``onnx``: a ``.onnx`` file run by ONNX Runtime (``pip install 'tensorbridge[onnx]'``).
* ``remote``: ``grpc://host:port``, an Open Inference Protocol server elsewhere (``_remote``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._remote import is_remote, load_remote
from ._spec import BY_TORCH

if TYPE_CHECKING:
    from ._models import ModelConfig

#: ONNX tensor element types (onnx.TensorProto codes, as ``tensor(float)`` names) -> torch.
_ONNX_TYPES = {
    "tensor(bool)": torch.bool, "tensor(uint8)": torch.uint8, "tensor(int8)": torch.int8,
    "tensor(int16)": torch.int16, "tensor(int32)": torch.int32, "tensor(int64)": torch.int64,
    "tensor(float16)": torch.float16, "tensor(float)": torch.float32,
    "tensor(double)": torch.float64, "tensor(bfloat16)": torch.bfloat16,
}


def backend_name(source: str) -> str:
    """Which backend serves ``source``: ``remote``, ``onnx``, ``eager`` or ``torchscript``."""
    if is_remote(source):
        return "remote"
    if source.endswith(".onnx"):
        return "onnx"
    if source.endswith(".py") or (":" in source and not Path(source).exists()):
        return "eager"
    return "torchscript"


def load_backend(config: ModelConfig) -> tuple[Any, dict[str, Any]]:
    """(module, declared signature) for ``config.source``; ``ValueError`` says what is wrong."""
    kind = backend_name(config.source)
    if kind == "remote":
        return load_remote(config)
    if kind == "onnx":
        return _load_onnx(config)
    if kind == "eager":
        return _load_eager(config)
    return _load_torchscript(config)


def _load_eager(config: ModelConfig) -> tuple[Any, dict[str, Any]]:
    source = config.source
    if source.endswith(".py"):
        factory = _factory_from_file(config.name, Path(source))
    else:
        module_name, _, factory_name = source.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model {config.name!r}: cannot import {source!r}: {exc}") from exc
    module = factory(**config.options)
    if config.weights:
        module.load_state_dict(load_state_dict(config.weights))
    declared = dict(getattr(module, "tensorbridge_signature", {}) or {})
    return module, declared


def _factory_from_file(name: str, path: Path) -> Any:
    """``create`` of a ``model.py`` file, imported under a name of its own (two versions of
    one model never share a module object)."""
    if not path.is_file():
        raise ValueError(f"model {name!r}: {path} does not exist")
    module_name = f"tensorbridge_repo_{abs(hash(str(path.resolve())))}_{path.stat().st_mtime_ns}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # a model.py may import files beside it
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ValueError(f"model {name!r}: {path} failed to import: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
    factory = getattr(module, "create", None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {path} must define create() returning the model")
    return factory


def _load_torchscript(config: ModelConfig) -> tuple[Any, dict[str, Any]]:
    path = Path(config.source)
    if not path.is_file():
        raise ValueError(f"model {config.name!r}: {config.source!r} is neither a file nor "
                         "package.module:factory")
    try:
        return torch.jit.load(str(path), map_location=config.device), {}  # type: ignore[no-untyped-call]
    except RuntimeError as exc:
        raise ValueError(f"model {config.name!r}: {path} is not a TorchScript file "
                         f"(torch.jit.save); eager models need module:factory: {exc}") from exc


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a ``torch.save`` file (tensors only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def forward_inputs(module: Any) -> list[str] | None:
    """Input names from ``forward``: the TorchScript schema or the Python signature.

    Datatype and shape stay open (ANY); give them in the config to have them checked.
    """
    forward = getattr(module, "forward", None)
    schema = getattr(forward, "schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments[1:]]
    try:
        params = inspect.signature(forward or module).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return [p.name for p in params]


class OnnxModule:
    """An ONNX Runtime session called like a torch module: tensors in, tensors out.

    One session serves every instance of the model: ``InferenceSession.run`` is thread-safe.
    Inputs are handed over as NumPy views of the tensors (no copy); outputs come back as
    tensors sharing ONNX Runtime's arrays.
    """

    def __init__(self, path: Path, threads: int, spin: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f"{path} is an ONNX model, but onnxruntime is not installed; "
                             "pip install 'tensorbridge[onnx]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        if not spin:  # idle pool threads sleep: spinning ones take the CPU from the clients
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(f"{path} cannot be loaded by ONNX Runtime: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def signature(self) -> dict[str, Any]:
        """The graph's inputs and outputs as signature specs (symbolic dims become -1)."""
        def specs(args: list[Any]) -> list[dict[str, Any]]:
            out = []
            for a in args:
                dtype = _ONNX_TYPES.get(a.type)
                if dtype is None:
                    raise ValueError(f"ONNX {a.name!r} has type {a.type}, which the protocol "
                                     "cannot carry")
                shape = [d if isinstance(d, int) and d >= 0 else -1 for d in a.shape]
                out.append({"name": a.name, "datatype": BY_TORCH[dtype].name, "shape": shape})
            return out
        return {"inputs": specs(self.session.get_inputs()),
                "outputs": specs(self.session.get_outputs())}

    def eval(self) -> OnnxModule:
        """Nothing to switch: a session always infers (kept for the torch module protocol)."""
        return self

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {name: _numpy(t) for name, t in zip(self.input_names, inputs, strict=True)}
        results = self.session.run(self.output_names, feed)
        return tuple(torch.from_numpy(np.ascontiguousarray(r)) for r in results)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: hand over the raw bits
        raise ValueError("BF16 inputs cannot be passed to ONNX Runtime from NumPy; "
                         "export the model with FP32 or FP16 inputs")
    return tensor.detach().numpy()


def _load_onnx(config: ModelConfig) -> tuple[Any, dict[str, Any]]:
    path = Path(config.source)
    if not path.is_file():
        raise ValueError(f"model {config.name!r}: {path} does not exist")
    if config.device != "cpu":
        raise ValueError(f"model {config.name!r}: ONNX models run on the CPU here; set "
                         "device = \"cpu\"")
    threads = torch.get_num_threads() if torch.get_num_threads() > 0 else os.cpu_count() or 1
    try:
        module = OnnxModule(path, threads)
        return module, module.signature()
    except ValueError as exc:
        raise ValueError(f"model {config.name!r}: {exc}") from None
