"""Loading models (any backend of ``_backends``), warming them up and running them."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.modules.module as _nn_module

from ._backends import backend_name, forward_inputs, load_backend
from ._errors import ModelError, TensorBridgeError
from ._pipeline import Pipeline, PipelineConfigError
from ._remote import url_problem
from ._settings import setting
from ._signature import ANY, Signature
from ._spec import BY_NAME, BY_TORCH
from ._text import TextPipeline

_InferenceMode = torch._C._InferenceMode
_tracing = torch._C._get_tracing_state
_MODULE_CALL = torch.nn.Module.__call__
_GLOBAL_HOOKS = (_nn_module._global_backward_pre_hooks, _nn_module._global_backward_hooks,
                 _nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks)


def _call_of(module: Any) -> Any:
    """What ``module(...)`` ends up calling: ``module.forward`` itself when ``nn.Module``'s
    ``__call__`` would call just that (no hooks, not compiled, not tracing), which saves its
    two Python frames (~0.6 µs a call); else the module."""
    if (type(module).__call__ is not _MODULE_CALL or module._forward_hooks
            or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks or module._compiled_call_impl is not None
            or any(_GLOBAL_HOOKS) or _tracing()):
        return module
    return module.forward

log = logging.getLogger("tensorbridge")


@dataclass
class ModelConfig:
    """How to load and serve one model (one ``[models.NAME]`` table of the config file).

    Each ``setting()`` field is a key of that table; those with a flag and a
    ``TENSORBRIDGE_*`` twin apply them to models given with ``--model`` (docs/operations.md).
    """

    name: str
    source: str = setting(help="TorchScript file (`.pt`/`.ts`), `.onnx` file, `model.py` or "
                               "`package.module:factory`", cli=False,
                          doc_default="(required without a repository folder of the model)")
    weights: str | None = setting(None, cli=False, help="state_dict of an eager model: "
                                  "`.pth`/`.pt` (torch.save) or `.safetensors`")
    inputs: list[Any] | None = setting(
        None, help="input specs `[{name, datatype, shape}]`; none = from the model or factory")
    outputs: list[Any] | None = setting(
        None, help="output specs; none = from the model, or learnt by the first warm-up run")
    warmup: int = setting(2, minimum=0, maximum=1000,
                          help="warm-up runs at start (needs input shapes; -1 dims become 1)")
    max_concurrency: int = setting(1, minimum=1, maximum=256,
                                   help="older name of `instances` (the larger one counts)")
    max_queue: int = setting(256, minimum=0, maximum=1 << 20,
                             help="requests allowed to wait; beyond it `OVERLOADED` at once")
    device: str = setting("cpu", check=lambda d: None if re.fullmatch(
        r"cpu|cuda(:\d+)?|mps", d) else "unknown device", accepts="cpu, cuda, cuda:N or mps",
        help="where the model runs")
    max_batch_size: int = setting(
        1, minimum=1, maximum=4096,
        help="dynamic batching: most rows per forward (1 = off; needs a dynamic first dim)")
    max_queue_delay_us: int = setting(0, minimum=0, maximum=10_000_000,
                                      help="how long a batch's first request may wait for others")
    preferred_batch_sizes: list[int] = setting(
        [], minimum=1, help="batch sizes to prefer when more requests wait than fit")
    batch_policy: str = setting(
        "delay", choices=("delay", "queue_depth"),
        help="`delay` (max_batch_size / max_queue_delay_us / preferred sizes) or `queue_depth` "
             "(above 50 queued take min(32, depth/2), at least 4)")
    instances: int = setting(1, minimum=1, maximum=256,
                             help="copies of the model serving its queue at once (threads)")
    watchdog_timeout: float = setting(
        0.0, minimum=0, help="a call running longer (s) marks its instance unhealthy, fails its "
                             "waiters and starts a new one; 0 = off")
    options: dict[str, Any] = setting({}, help="extra keyword arguments for the factory")
    preprocess: dict[str, Any] | None = setting(
        None, help="server-side image preprocessing (`[models.NAME.preprocess]`, "
                   "docs/models.md); overrides the factory's keys")
    postprocess: dict[str, Any] | None = setting(
        None, help="server-side postprocessing (`[models.NAME.postprocess]`): softmax, "
                   "top_k, labels")
    warmup_inputs: dict[str, Any] | None = setting(
        None, help="warm-up inputs `{name = nested list}` (dtype from the signature); none = "
                   "zeros of the signature's shapes")
    version_policy: Any = setting(
        "latest", check=lambda p: _version_policy_problem(p),
        accepts='"latest", "all", {latest = N} or a list of version numbers',
        help="repository models: which versions to serve")
    routing: dict[str, Any] | None = setting(
        None, help="A/B routing (`[models.NAME.routing]`): `{split = {\"1\" = 90, \"2\" = 10}}`")
    remote: str | None = setting(
        None, cli=False, check=url_problem, accepts="grpc://HOST:PORT or grpcs://HOST:PORT",
        help="`grpc://HOST:PORT` (or `grpcs://`) of an Open Inference Protocol "
                              "gRPC server that runs the model (the remote backend, instead of "
                              "`source`)")
    remote_model: str | None = setting(None, cli=False,
                                       help="the model's name on the remote; none = NAME")
    remote_version: str | None = setting(None, cli=False, help="the version asked of the "
                                         "remote; none = the remote's default")
    remote_timeout: float = setting(30.0, minimum=0.001, help="gRPC deadline (s) of a remote "
                                    "call when the request's own remaining deadline is longer "
                                    "or absent")
    remote_pool: int = setting(1, minimum=1, maximum=64, help="gRPC channels (TCP connections) "
                               "to the remote; calls in flight at once are `instances`")
    remote_poll_interval: float = setting(1.0, minimum=0.05, maximum=3600, help="seconds between "
                                          "ModelReady polls of the remote (the breaker)")
    remote_token_file: str | None = setting(None, help="file holding a bearer token sent to "
                                            "the remote as `authorization: Bearer ...`")
    remote_ca_file: str | None = setting(None, help="PEM CA certificates of a `grpcs://` "
                                         "remote; none = the system's")
    #: Where the settings came from (``file: [models.NAME]``), for messages.
    origin: str = field(default="", repr=False, compare=False)

    @property
    def instance_count(self) -> int:
        """Instances to run: ``instances``, or the older ``max_concurrency`` if larger."""
        return max(1, self.instances, self.max_concurrency)

    @classmethod
    def from_cli(cls, text: str) -> ModelConfig:
        """Parse ``NAME=SOURCE`` or ``NAME=SOURCE@WEIGHTS`` from ``--model``."""
        name, sep, source = text.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--model expects NAME=PATH or NAME=module:factory[@weights], "
                             f"got {text!r}")
        source, _, weights = source.partition("@")
        return cls(name=name, source=source, weights=weights or None)


def _version_policy_problem(policy: Any) -> str | None:
    from ._repository import select_versions  # it builds ModelConfigs: imported late

    try:
        select_versions(policy, [])
    except ValueError:
        return "unknown version policy"
    return None


class LoadedModel:
    """A model kept in memory with its signature; the server queues requests for it."""

    def __init__(self, config: ModelConfig, module: Any, signature: Signature,
                 pipeline: Pipeline | TextPipeline | None = None, version: int = 1) -> None:
        self.config = config
        self.name = config.name
        #: The version number this copy serves (1 for a model given without a repository).
        self.version = version
        self.module = module
        #: An ``nn.Module`` (its hooks are looked at per call: ``_call_of``).
        self._plain = isinstance(module, torch.nn.Module)
        self.pipeline: Pipeline | TextPipeline = pipeline or Pipeline()
        self.device = torch.device(config.device)
        self._on_cpu = self.device.type == "cpu"  # read on every call (torch's .type is slow)
        self._forward_signature = signature
        self._input_names, self._output_names = _names(signature)
        #: What clients send and get (checked on every request, reported by MODELS).
        self.signature = self.pipeline.client_signature(signature)

    def metadata(self) -> dict[str, Any]:
        """Spec §4.1 entry for MODELS_OK."""
        return {"name": self.name, **self.signature.as_dict()}

    @property
    def forward_signature(self) -> Signature:
        """The module's own signature (what ``forward`` takes); batching looks at its dims."""
        return self._forward_signature

    @forward_signature.setter
    def forward_signature(self, signature: Signature) -> None:
        self._forward_signature = signature
        self._input_names, self._output_names = _names(signature)
        self.signature = self.pipeline.client_signature(signature)

    def preprocess(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Client inputs -> module inputs (identity without configured preprocessing).

        An image input (BYTES, one encoded file per item) becomes one stacked tensor; a bad
        image raises ``InvalidInputError`` naming the item.
        """
        if self.pipeline.preprocess is None:
            return inputs
        return self.pipeline.pre(inputs)

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """Module outputs -> client outputs (identity without configured postprocessing).

        Row by row, so it takes any number of rows (a batch's slice or a whole batch).
        """
        if self.pipeline.postprocess is None:
            return outputs
        return self.pipeline.post(outputs)

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``postprocess(forward(preprocess(inputs)))``: one full request."""
        return self.postprocess(self.forward(self.preprocess(inputs)))

    def forward(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run the model once on named inputs in inference mode; return named CPU outputs.

        Raises ``ModelError`` (with the model's exception type and text) when the model fails.
        """
        if not self._on_cpu:
            inputs = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor)
                      else v for k, v in inputs.items()}
        names = self._input_names
        try:
            with _InferenceMode(True):  # what torch.inference_mode() enters, without its wrapper
                call = _call_of(self.module) if self._plain else self.module
                result = (call(dict(inputs)) if names is None
                          else call(*[inputs[n] for n in names]))
        except TensorBridgeError:  # a backend's typed error (the remote's): kept as it is
            raise
        except Exception as exc:  # the model's own failure, reported to the caller
            raise ModelError(f"model {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        outputs = self._name_outputs(result)
        for name in self.pipeline.passthrough:  # e.g. a text batch's attention mask
            if name in inputs:
                outputs[name] = inputs[name]
        return outputs

    def _name_outputs(self, result: Any) -> dict[str, Any]:
        names = self._output_names
        if isinstance(result, torch.Tensor):  # the common case, before the slower ABC check
            out = {names[0]: result}
        elif type(result) is dict or isinstance(result, Mapping):
            out = dict(result)
        elif isinstance(result, (tuple, list)) and not _is_bytes_list(result):
            if len(result) != len(names):
                raise ModelError(f"model {self.name!r} returned {len(result)} outputs but its "
                                 f"signature names {len(names)}: {names}")
            out = dict(zip(names, result, strict=True))
        else:
            out = {names[0]: result}
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                if value.is_cpu:
                    if not value.is_contiguous():
                        out[key] = value.contiguous()
                    continue
                value = value.to("cpu")
                if not value.is_contiguous():
                    value = value.contiguous()
                out[key] = value
            elif not _is_bytes_list(value):
                raise ModelError(f"model {self.name!r} output {key!r} is a "
                                 f"{type(value).__name__}; return tensors, or lists of bytes/str "
                                 "for BYTES outputs")
        return out


def _names(signature: Signature) -> tuple[list[str] | None, list[str]]:
    """The names ``forward`` passes inputs by (None: one dict) and names outputs by."""
    return ([s.name for s in signature.inputs] if signature.inputs is not None else None,
            [s.name for s in signature.outputs])


def _is_bytes_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (bytes, str)) for v in value)


def load_model(config: ModelConfig, version: int = 1) -> LoadedModel:
    """Load, ``eval()``, work out the signature and warm up one model, logging progress.

    Warm-up runs ``config.warmup`` times on each of the model's instances at once (the
    TorchScript executor optimises per thread); the model is returned only when warm.
    """
    t0 = time.monotonic()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model {config.name!r} asks for device {config.device!r}, but CUDA is "
                         f"not available here (torch {torch.__version__}); use --device cpu")
    log.info("loading model %r version %d from %s (%s)%s", config.name, version, config.source,
             backend_name(config.source),
             f" with weights {config.weights}" if config.weights else "")
    module, declared = load_backend(config)
    if hasattr(module, "eval"):
        module.eval()
    if hasattr(module, "to") and config.device != "cpu":
        module = module.to(config.device)
    inputs = config.inputs if config.inputs is not None else declared.get(
        "inputs", forward_inputs(module))
    outputs = config.outputs if config.outputs is not None else declared.get("outputs")
    signature = Signature.parse(inputs, outputs)
    pipeline = _build_pipeline(config, module, signature)
    model = LoadedModel(config, module, signature, pipeline, version)
    log.info("loaded %r in %.2f s", config.name, time.monotonic() - t0)
    # A remote model loaded while its remote is down is not warmed up (nothing to call).
    if config.warmup > 0 and getattr(module, "available", True):
        # Warm up the module itself: its inputs can be made up even when the client's
        # (image files) cannot; the postprocess then runs on its outputs.
        example = _warmup_example(config, signature)
        if example is None:
            log.info("no warm-up for %r: it needs declared FP/INT input shapes (BYTES inputs "
                     "and open signatures cannot be made up) or warmup_inputs", config.name)
        else:
            t1 = time.monotonic()
            for i in range(config.warmup):
                result = model.forward(example)
                log.info("warm-up %r: run %d/%d", config.name, i + 1, config.warmup)
            if config.instance_count > 1:
                _warm_instances(model, example, config.instance_count, config.warmup)
            if outputs is None:
                learnt = _signature_from_run(signature, result)
                if pipeline.active:  # the outputs it attaches to are known only now
                    model.pipeline = _build_pipeline(config, module, learnt)
                model.forward_signature = learnt
            model.postprocess(result)
            log.info("warmed up %r in %.3f s", config.name, time.monotonic() - t1)
    return model


def _build_pipeline(config: ModelConfig, module: Any, forward: Signature
                    ) -> Pipeline | TextPipeline:
    """The factory's declared ``tensorbridge_pipeline``, overridden key by key by the config."""
    declared = dict(getattr(module, "tensorbridge_pipeline", None) or {})
    unknown = set(declared) - {"preprocess", "postprocess"}
    if unknown:
        raise ValueError(f"model {config.name!r}: tensorbridge_pipeline has unknown keys "
                         f"{sorted(unknown)}; use 'preprocess' and 'postprocess'")
    pre = {**(declared.get("preprocess") or {}), **(config.preprocess or {})}
    post = {**(declared.get("postprocess") or {}), **(config.postprocess or {})}
    try:
        return Pipeline.build(pre or None, post or None, forward,
                              getattr(module, "tensorbridge_notice", None))
    except PipelineConfigError as exc:
        raise PipelineConfigError(f"model {config.name!r}: {exc}") from None


def _warm_instances(model: LoadedModel, example: dict[str, Any], instances: int,
                    runs: int) -> None:
    """Run the warm-up on ``instances`` threads at once, as the instances will run."""
    errors: list[BaseException] = []

    def warm() -> None:
        try:
            for _ in range(runs):
                model.forward(example)
        except BaseException as exc:  # re-raised below, in the loading thread
            errors.append(exc)

    threads = [threading.Thread(target=warm, name=f"tb-warm-{model.name}-{i}")
               for i in range(instances)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _warmup_example(config: ModelConfig, signature: Signature) -> dict[str, Any] | None:
    """Warm-up inputs: ``warmup_inputs`` of the config, else made up from the signature."""
    if config.warmup_inputs is None:
        return _example_inputs(signature)
    example = {}
    specs = {s.name: s for s in signature.inputs or ()}
    for name, values in config.warmup_inputs.items():
        spec = specs.get(name)
        dtype = (BY_NAME[spec.datatype].torch if spec is not None and spec.datatype in BY_NAME
                 and BY_NAME[spec.datatype].torch is not None else None)
        try:
            example[name] = torch.tensor(values, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"model {config.name!r}: warmup_inputs[{name!r}] cannot be made "
                             f"into a tensor: {exc}") from None
    return example


def _example_inputs(signature: Signature) -> dict[str, Any] | None:
    if signature.inputs is None:
        return None
    example = {}
    for spec in signature.inputs:
        if spec.shape is None or spec.datatype in (ANY, "BYTES"):
            return None
        shape = [1 if d == -1 else d for d in spec.shape]
        example[spec.name] = torch.zeros(shape, dtype=BY_NAME[spec.datatype].torch)
    return example


def _signature_from_run(signature: Signature, result: Mapping[str, Any]) -> Signature:
    """Fill in output datatypes/shapes seen in a warm-up run (leading dim left dynamic)."""
    batch_dynamic = any(s.shape and s.shape[0] == -1 for s in signature.inputs or ())
    outs: list[dict[str, Any]] = []
    for name, value in result.items():
        if isinstance(value, torch.Tensor) and value.dtype in BY_TORCH:
            shape = list(value.shape)
            if batch_dynamic and shape:
                shape[0] = -1
            outs.append({"name": name, "datatype": BY_TORCH[value.dtype].name, "shape": shape})
        else:
            outs.append({"name": name, "datatype": "BYTES", "shape": None})
    return Signature.parse([s.as_dict() for s in signature.inputs or ()]
                           if signature.inputs is not None else None, outs)

