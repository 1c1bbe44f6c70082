"""Model signatures: input/output names, datatypes and shapes, and checks against them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._spec import MAX_DIMS, DType, dtype_by_name

ANY = "ANY"


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: datatype (or ``ANY``) and shape (-1 = dynamic, None = any)."""

    name: str
    datatype: str = ANY
    shape: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | str) -> TensorSpec:
        """Build from a config entry ``{name=, datatype=, shape=}`` or a bare name."""
        if isinstance(raw, str):
            return cls(raw)
        unknown = set(raw) - {"name", "datatype", "dtype", "shape"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in tensor spec {dict(raw)}")
        datatype = str(raw.get("datatype", raw.get("dtype", ANY)))
        datatype = ANY if datatype.upper() == ANY else dtype_by_name(datatype).name
        shape = raw.get("shape")
        if shape is not None:
            shape = tuple(int(d) for d in shape)
            if len(shape) > MAX_DIMS or any(d < -1 for d in shape):
                raise ValueError(f"bad shape {list(shape)} for {raw['name']!r}: up to "
                                 f"{MAX_DIMS} dims, each >= 0 or -1 (dynamic)")
        return cls(str(raw["name"]), datatype, shape)

    def as_dict(self) -> dict[str, Any]:
        """KServe-style metadata (spec §4.1)."""
        return {"name": self.name, "datatype": self.datatype,
                "shape": None if self.shape is None else list(self.shape)}

    def check(self, dtype: DType, shape: Sequence[int]) -> str | None:
        """Return why ``dtype``/``shape`` do not fit this spec, or None when they do."""
        if self.datatype != ANY and dtype.name != self.datatype:
            return f"input {self.name!r} must be {self.datatype}, got {dtype.name}"
        if self.shape is None:
            return None
        if len(shape) != len(self.shape) or any(
                want not in (-1, got) for want, got in zip(self.shape, shape, strict=True)):
            return (f"input {self.name!r} must have shape {list(self.shape)} (-1 = any size), "
                    f"got {list(shape)}")
        return None


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of a model. ``inputs=None`` accepts any named inputs."""

    inputs: tuple[TensorSpec, ...] | None
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def parse(cls, inputs: Any, outputs: Any) -> Signature:
        """Build from config lists (None keeps the input side open)."""
        ins = None if inputs is None else tuple(TensorSpec.parse(x) for x in inputs)
        outs = tuple(TensorSpec.parse(x) for x in (outputs or ["output"]))
        for side in (ins or (), outs):
            names = [s.name for s in side]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate tensor names in signature: {names}")
        return cls(ins, outs)

    def as_dict(self) -> dict[str, Any]:
        """KServe-style metadata (spec §4.1)."""
        return {"inputs": None if self.inputs is None else [s.as_dict() for s in self.inputs],
                "outputs": [s.as_dict() for s in self.outputs]}

    def check_inputs(self, given: Mapping[str, tuple[DType, Sequence[int]]]) -> str | None:
        """Return why the inputs do not match, naming the input and what was expected."""
        if self.inputs is None:
            return None
        wanted = [s.name for s in self.inputs]
        missing = [n for n in wanted if n not in given]
        extra = [n for n in given if n not in wanted]
        if missing or extra:
            return (f"inputs must be named {wanted}; missing {missing}, unexpected {extra}")
        for spec in self.inputs:
            problem = spec.check(*given[spec.name])
            if problem:
                return problem
        return None

