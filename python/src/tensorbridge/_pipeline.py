"""Server-side pre- and postprocessing: image files in, top-k classes out.

A model's ``[models.NAME.preprocess]`` table turns a BYTES input (one encoded image file per
item) into the float tensor the module takes; ``[models.NAME.postprocess]`` turns its logits
into ``scores``/``indices``/``labels`` (docs/models.md). Both work item by item / row by row,
so they serve any batch size.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ._errors import InvalidInputError
from ._signature import Signature, TensorSpec
from ._spec import BY_NAME

if TYPE_CHECKING:
    from ._text import TextPipeline

# Pillow only warns between MAX_IMAGE_PIXELS and twice that; a server must refuse instead.
# (The declared size is also checked against max_pixels before any pixel is decoded.)
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

#: Pillow's name for each resampling filter a config may choose.
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
            "bilinear": Image.Resampling.BILINEAR, "hamming": Image.Resampling.HAMMING,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
#: Formats decoded by default (the issue's list); a config may narrow or widen it.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


class PipelineConfigError(ValueError):
    """A ``preprocess``/``postprocess`` table is wrong; raised while the server starts."""


def _size(value: Any, key: str) -> tuple[int, int] | None:
    """``N`` or ``[height, width]`` -> (height, width)."""
    if value is None:
        return None
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise PipelineConfigError(f"{key} must be a positive integer or [height, width], "
                                  f"got {value!r}")
    return pair[0], pair[1]


@dataclass(frozen=True)
class ImagePreprocess:
    """How one BYTES input of encoded image files becomes a float tensor (``preprocess``)."""

    #: Client input name: BYTES [-1], one encoded image file per item.
    input: str = "image"
    #: Module input it becomes; None = the module's only input (or one of the same name).
    target: str | None = None
    #: Pillow mode after decoding: ``RGB`` (3 channels) or ``L`` (gray, 1 channel).
    mode: str = "RGB"
    #: Turn the pixels as the camera's EXIF orientation tag says (phone photos).
    exif_transpose: bool = True
    #: Transparent pixels are laid on this colour (a canvas PNG is transparent where unpainted).
    background: tuple[int, int, int] = (255, 255, 255)
    #: Let the JPEG decoder shrink by 1/2, 1/4 or 1/8 while staying above the sizes needed:
    #: much faster for big photos, with results a little different from a full decode.
    draft: bool = True
    #: Resize so that the shorter side has this many pixels, keeping the aspect ratio.
    resize_shorter: int | None = None
    #: Then cut the centre (height, width) out (an int means a square).
    center_crop: tuple[int, int] | None = None
    #: Or resize to exactly (height, width), ignoring the aspect ratio.
    resize: tuple[int, int] | None = None
    #: Resampling filter for the resizes (``box`` averages areas: right for big shrinks).
    resample: str = "bilinear"
    #: ``value = 255 - value`` first (dark ink on light paper -> ink is high).
    invert: bool = False
    #: Pixel values (0..255) are multiplied by this ...
    scale: float = 1 / 255
    #: ... then ``(value - mean) / std`` per channel (one number or one per channel).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: ``CHW`` (torchvision), ``HWC``, or ``flat`` (C*H*W values per item).
    layout: str = "CHW"
    #: Datatype of the tensor handed to the module.
    dtype: str = "FP32"
    #: Largest accepted file, in bytes.
    max_bytes: int = 20 * 1024 * 1024
    #: Largest accepted image, in pixels, as declared by the file's header (checked before
    #: decoding: a tiny file may declare a gigantic image, a "decompression bomb").
    max_pixels: int = 40_000_000
    #: Accepted file formats (Pillow's names).
    formats: tuple[str, ...] = DEFAULT_FORMATS

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ImagePreprocess:
        """Build from a ``[models.NAME.preprocess]`` table; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise PipelineConfigError(f"unknown preprocess keys {sorted(unknown)}; known keys: "
                                      f"{sorted(known)}")
        values = dict(raw)
        for key in ("center_crop", "resize"):
            if key in values:
                values[key] = _size(values[key], key)
        for key in ("mean", "std"):
            if values.get(key) is not None:
                v = values[key]
                values[key] = (float(v),) if isinstance(v, (int, float)) else tuple(
                    float(x) for x in v)
        if "background" in values:
            values["background"] = tuple(int(x) for x in values["background"])
        if "formats" in values:
            values["formats"] = tuple(str(x).upper() for x in values["formats"])
        try:
            config = cls(**values)
        except TypeError as exc:
            raise PipelineConfigError(f"preprocess: {exc}") from None
        config._validate()
        return config

    def _validate(self) -> None:
        channels = self.channels
        if self.mode not in ("RGB", "L"):
            raise PipelineConfigError(f"preprocess mode must be 'RGB' or 'L', got {self.mode!r}")
        if self.layout not in ("CHW", "HWC", "flat"):
            raise PipelineConfigError(f"preprocess layout must be 'CHW', 'HWC' or 'flat', got "
                                      f"{self.layout!r}")
        if self.resample not in RESAMPLE:
            raise PipelineConfigError(f"preprocess resample must be one of {sorted(RESAMPLE)}, "
                                      f"got {self.resample!r}")
        dtype = BY_NAME[self.dtype].torch if self.dtype in BY_NAME else None
        if dtype is None or not dtype.is_floating_point:
            raise PipelineConfigError(f"preprocess dtype must be a float type (FP32, FP16, "
                                      f"BF16, FP64), got {self.dtype!r}")
        if self.resize is not None and (self.resize_shorter or self.center_crop):
            raise PipelineConfigError("preprocess: give either resize, or resize_shorter and/or "
                                      "center_crop, not both")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) not in (1, channels):
                raise PipelineConfigError(f"preprocess {key} needs 1 or {channels} values for "
                                          f"mode {self.mode!r}, got {list(value)}")
        if self.std is not None and any(s == 0 for s in self.std):
            raise PipelineConfigError("preprocess std must not contain 0")
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise PipelineConfigError("preprocess max_bytes and max_pixels must be positive")
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit and self.max_pixels > pillow_limit:
            raise PipelineConfigError(f"preprocess max_pixels {self.max_pixels:,} is above "
                                      f"Pillow's own limit ({pillow_limit:,} pixels, "
                                      "PIL.Image.MAX_IMAGE_PIXELS), which refuses such images "
                                      "anyway; give at most that")
        unknown = set(self.formats) - set(Image.registered_extensions().values())
        if unknown:
            raise PipelineConfigError(f"preprocess formats {sorted(unknown)} are not known to "
                                      "Pillow")

    @property
    def channels(self) -> int:
        """1 for ``L``, 3 for ``RGB``."""
        return 1 if self.mode == "L" else 3

    @property
    def out_size(self) -> tuple[int, int] | None:
        """(height, width) of every item, when the config fixes it."""
        return self.resize or self.center_crop

    def item_shape(self) -> list[int]:
        """Shape of one preprocessed item (-1 where the image decides)."""
        h, w = self.out_size or (-1, -1)
        c = self.channels
        if self.layout == "flat":
            return [c * h * w if h > 0 else -1]
        return [c, h, w] if self.layout == "CHW" else [h, w, c]

    def __call__(self, items: Sequence[bytes]) -> torch.Tensor:
        """Decode and preprocess every item, then stack them: [N, *item_shape]."""
        arrays = [self.one(i, data) for i, data in enumerate(items)]
        if not arrays:
            shape = [0, *(max(d, 0) for d in self.item_shape())]
            return torch.empty(shape, dtype=BY_NAME[self.dtype].torch)
        if len({a.shape for a in arrays}) > 1:
            raise InvalidInputError(
                f"input {self.input!r}: the images come out in different sizes "
                f"{sorted({a.shape for a in arrays})} and cannot be stacked; configure "
                "center_crop or resize for this model, or send one image per request")
        batch = torch.from_numpy(np.stack(arrays))
        return batch.to(BY_NAME[self.dtype].torch)

    def one(self, index: int, data: bytes) -> np.ndarray:
        """Preprocess item ``index`` to a float32 array; bad input -> InvalidInputError."""
        where = f"input {self.input!r} item {index}"
        if not data:
            raise InvalidInputError(f"{where} is empty (0 bytes): send the contents of the "
                                    "image file, e.g. file_get_contents($_FILES[...]['tmp_name'])")
        if len(data) > self.max_bytes:
            raise InvalidInputError(f"{where} is {len(data):,} bytes, more than this model's "
                                    f"limit of {self.max_bytes:,} (preprocess.max_bytes); send "
                                    "a smaller file")
        image = self._open(where, data)
        if self.resize_shorter:
            # Resizing the shorter side scales the longer one too: a 1 x 2,000,000 strip would
            # become 224 x 448,000,000 before the crop. Check the size it would reach.
            tw, th = _shorter_to(image.size, self.resize_shorter)
            if tw * th > self.max_pixels:
                raise InvalidInputError(
                    f"{where} is {image.size[0]:,} x {image.size[1]:,} pixels: scaled to a "
                    f"shorter side of {self.resize_shorter} it would be {tw:,} x {th:,}, more "
                    f"than this model's limit of {self.max_pixels:,} pixels "
                    "(preprocess.max_pixels); send an image of a usual aspect ratio")
        try:
            image = self._decode(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, EOFError, struct.error, KeyError, TypeError,
                IndexError) as exc:
            # Pillow's decoders and EXIF parser raise all of these on corrupt files.
            raise InvalidInputError(
                f"{where}: the {image.format} file could not be decoded ({exc}); it is probably "
                "truncated or corrupt; send the complete file") from None
        except MemoryError:
            raise InvalidInputError(
                f"{where}: decoding the {image.format} file needs more memory than the server "
                "has; send a smaller image") from None
        return self._to_array(image)

    def _open(self, where: str, data: bytes) -> Image.Image:
        accepted = ", ".join(self.formats)
        try:
            image = Image.open(io.BytesIO(data), formats=list(self.formats))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidInputError(
                f"{where} declares an image too large to decode safely ({exc}); this looks "
                "like a decompression bomb; send an image of at most "
                f"{self.max_pixels:,} pixels") from None
        except UnidentifiedImageError:
            raise InvalidInputError(
                f"{where} is not an image this model accepts ({accepted}): its "
                f"{len(data):,} bytes start with {data[:8]!r}; send the image file's bytes "
                "unchanged (not base64, not a data: URL, not a path)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(f"{where}: the image header cannot be read ({exc}); send "
                                    f"a complete {accepted} file") from None
        width, height = image.size
        if width * height > self.max_pixels:
            raise InvalidInputError(
                f"{where} is a {image.format} of {width:,} x {height:,} = "
                f"{width * height:,} pixels, more than this model's limit of "
                f"{self.max_pixels:,} (preprocess.max_pixels; a decompression-bomb guard); "
                "send a smaller image")
        if width == 0 or height == 0:
            raise InvalidInputError(f"{where} is a {image.format} with no pixels "
                                    f"({width} x {height})")
        return image

    def _decode(self, image: Image.Image) -> Image.Image:
        if self.draft and image.format == "JPEG":
            wanted = self._draft_size(image.size)
            if wanted is not None:
                image.draft(self.mode if image.mode in ("RGB", "L") else None, wanted)
        image.load()  # decodes (the first frame of a GIF); truncated files fail here
        if self.exif_transpose:
            image = ImageOps.exif_transpose(image)
        image = self._flatten_alpha(image)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        resample = RESAMPLE[self.resample]
        if self.resize is not None:
            h, w = self.resize
            image = image.resize((w, h), resample)
        if self.resize_shorter:
            image = image.resize(_shorter_to(image.size, self.resize_shorter), resample)
        if self.center_crop is not None:
            image = _center_crop(image, self.center_crop)
        return image

    def _draft_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The smallest decode size that still gives the resizes below all their pixels."""
        if self.resize is not None:
            h, w = self.resize
            # Orientation may swap the sides later, so ask for the larger one both ways.
            side = max(h, w)
            return side, side
        if self.resize_shorter:
            return _shorter_to(size, self.resize_shorter)
        return None

    def _flatten_alpha(self, image: Image.Image) -> Image.Image:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            if image.mode != "PA" and image.getchannel("A").getextrema() == (255, 255):
                return image.convert("RGB" if image.mode == "RGBA" else "L")  # opaque: cheap
            rgba = image.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (*self.background, 255))
            image = Image.alpha_composite(base, rgba).convert("RGB")
        return image

    def _to_array(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.invert:
            pixels = 255.0 - pixels
        pixels = pixels * np.float32(self.scale)
        if self.mean is not None:
            pixels -= np.asarray(self.mean, dtype=np.float32)
        if self.std is not None:
            pixels /= np.asarray(self.std, dtype=np.float32)
        if self.layout == "CHW":
            pixels = pixels.transpose(2, 0, 1)
        elif self.layout == "flat":
            pixels = pixels.transpose(2, 0, 1).reshape(-1)
        return np.ascontiguousarray(pixels)


def _shorter_to(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is ``shorter`` (torchvision's rounding)."""
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's CenterCrop: round((side - crop) / 2); smaller images are padded with 0."""
    h, w = size
    width, height = image.size
    top = int(round((height - h) / 2.0))
    left = int(round((width - w) / 2.0))
    return image.crop((left, top, left + w, top + h))


@dataclass(frozen=True)
class Classify:
    """Logits -> softmax -> top-k with class names (``postprocess``)."""

    #: Module output holding the logits [N, classes]; None = the module's only output.
    output: str | None = None
    #: Turn logits into probabilities first (off when the module already returns them).
    softmax: bool = True
    #: How many classes to return per row (fewer when the model has fewer).
    top_k: int = 5
    #: Class names: a file (one per line), ``package:resource``, or the list itself.
    labels: str | tuple[str, ...] | None = None
    #: Text returned per row as ``notice`` (e.g. that the weights are random); None = none.
    notice: str | None = None
    #: The loaded class names (from ``labels``).
    names: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Classify:
        """Build from a ``[models.NAME.postprocess]`` table; unknown keys are an error."""
        known = {f.name for f in fields(cls)} - {"names"}
        unknown = set(raw) - known
        if unknown:
            raise PipelineConfigError(f"unknown postprocess keys {sorted(unknown)}; known "
                                      f"keys: {sorted(known)}")
        values = dict(raw)
        labels = values.get("labels")
        if labels is not None and not isinstance(labels, str):
            values["labels"] = tuple(str(x) for x in labels)
        try:
            config = cls(**values)
        except TypeError as exc:
            raise PipelineConfigError(f"postprocess: {exc}") from None
        if not isinstance(config.top_k, int) or config.top_k < 1:
            raise PipelineConfigError(f"postprocess top_k must be a positive integer, got "
                                      f"{config.top_k!r}")
        names = load_labels(config.labels) if config.labels is not None else ()
        object.__setattr__(config, "names", names)
        return config

    def k(self, classes: int | None) -> int | None:
        """Classes returned per row for a model with ``classes`` outputs (None: unknown)."""
        return None if classes is None else min(self.top_k, classes)

    def specs(self, classes: int | None) -> list[TensorSpec]:
        """The outputs clients get instead of the logits."""
        k = self.k(classes) or -1
        specs = [TensorSpec("scores", "FP32", (-1, k)), TensorSpec("indices", "INT64", (-1, k)),
                 TensorSpec("labels", "BYTES", (-1,))]
        if self.notice:
            specs.append(TensorSpec("notice", "BYTES", (-1,)))
        return specs

    def __call__(self, logits: torch.Tensor) -> dict[str, Any]:
        """[N, classes] -> scores FP32 [N, k], indices INT64 [N, k], labels [N*k], notice."""
        if logits.dim() != 2:
            raise InvalidInputError(f"postprocess expects logits of shape [N, classes], the "
                                    f"model returned {list(logits.shape)}")
        logits = logits.float()
        probs = torch.softmax(logits, dim=1) if self.softmax else logits
        k = min(self.top_k, logits.shape[1])
        scores, indices = probs.topk(k, dim=1)
        names = self.names
        labels = [names[i] if i < len(names) else str(i) for i in indices.reshape(-1).tolist()]
        out: dict[str, Any] = {"scores": scores.contiguous(), "indices": indices.contiguous(),
                               "labels": labels}
        if self.notice:
            out["notice"] = [self.notice] * logits.shape[0]
        return out


def load_labels(source: str | Sequence[str]) -> tuple[str, ...]:
    """Class names from a list, a file (one per line) or ``package:resource``."""
    if not isinstance(source, str):
        return tuple(source)
    path = Path(source)
    if ":" in source and not path.exists():
        package, _, name = source.partition(":")
        try:
            text = resources.files(package).joinpath(name).read_text("utf-8")
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise PipelineConfigError(f"postprocess labels {source!r}: no such package "
                                      f"resource ({exc})") from None
    else:
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise PipelineConfigError(f"postprocess labels {source!r}: cannot read the file "
                                      f"({exc}); give an absolute path or package:resource"
                                      ) from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class Pipeline:
    """Pre- and postprocessing around one module, and the client-facing signature."""

    preprocess: ImagePreprocess | None = None
    postprocess: Classify | None = None
    #: Module input the preprocessed tensor feeds, module output the postprocess reads.
    target: str | None = None
    source: str | None = None
    #: Inputs the scheduler pads along dim 1 when it merges requests (text models only).
    pad: Mapping[str, int] = field(default_factory=dict)
    #: Inputs handed back beside the module's outputs (text models only).
    passthrough: tuple[str, ...] = ()

    @classmethod
    def build(cls, pre: Mapping[str, Any] | None, post: Mapping[str, Any] | None,
              forward: Signature, notice: str | None = None) -> Pipeline | TextPipeline:
        """Parse both tables and tie them to the module's signature ``forward``; a preprocess
        naming a ``tokenizer`` makes a text pipeline (``_text.py``)."""
        from ._text import TextPipeline, is_text

        if is_text(pre):
            assert pre is not None
            return TextPipeline.build(pre, post, forward)
        preprocess = ImagePreprocess.parse(pre) if pre else None
        raw_post = dict(post or {})
        if raw_post and notice and "notice" not in raw_post:
            raw_post["notice"] = notice
        postprocess = Classify.parse(raw_post) if raw_post else None
        target = source = None
        if preprocess is not None:
            target = _pick(preprocess.target, preprocess.input, forward.inputs, "input",
                           "preprocess target")
        if postprocess is not None:
            source = _pick(postprocess.output, None, forward.outputs, "output",
                           "postprocess output")
            spec = next((s for s in forward.outputs if s.name == source), None)
            classes = spec.shape[-1] if spec and spec.shape and spec.shape[-1] > 0 else None
            if postprocess.names and classes is not None and len(postprocess.names) != classes:
                raise PipelineConfigError(
                    f"postprocess labels has {len(postprocess.names)} names but the model's "
                    f"output {source!r} has {classes} classes")
        return cls(preprocess, postprocess, target, source)

    @property
    def active(self) -> bool:
        """Whether there is anything to do."""
        return self.preprocess is not None or self.postprocess is not None

    def client_signature(self, forward: Signature) -> Signature:
        """What clients send and get: the module's signature with both ends replaced."""
        inputs: list[TensorSpec] | None = None
        if forward.inputs is not None:
            inputs = list(forward.inputs)
            if self.preprocess is not None:
                image = TensorSpec(self.preprocess.input, "BYTES", (-1,))
                inputs = [image if s.name == self.target else s for s in inputs]
        elif self.preprocess is not None:
            inputs = [TensorSpec(self.preprocess.input, "BYTES", (-1,))]
        outputs = list(forward.outputs)
        if self.postprocess is not None:
            spec = next(s for s in forward.outputs if s.name == self.source)
            classes = spec.shape[-1] if spec.shape and spec.shape[-1] > 0 else None
            outputs = splice(outputs, spec, self.postprocess.specs(classes))
        return Signature(None if inputs is None else tuple(inputs), tuple(outputs))

    def pre(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Client inputs -> module inputs."""
        out = dict(inputs)
        if self.preprocess is not None:
            items = take_items(out, self.preprocess.input, "the image files",
                               "one encoded image file per item")
            assert self.target is not None
            out[self.target] = self.preprocess(items)
        return out

    def post(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """Module outputs -> client outputs (order kept, the logits replaced)."""
        if self.postprocess is None:
            return dict(outputs)
        out: dict[str, Any] = {}
        for name, value in outputs.items():
            if name == self.source:
                out.update(self.postprocess(value))
            else:
                out[name] = value
        return out


def splice(outputs: list[TensorSpec], spec: TensorSpec, new: list[TensorSpec]
           ) -> list[TensorSpec]:
    """``outputs`` with ``spec`` replaced by ``new`` (a postprocess's outputs), names unique."""
    at = outputs.index(spec)
    outputs = [*outputs[:at], *new, *outputs[at + 1:]]
    names = [s.name for s in outputs]
    if len(set(names)) != len(names):
        raise PipelineConfigError(f"postprocess outputs clash with the module's other "
                                  f"outputs: {names}")
    return outputs


def take_items(inputs: dict[str, Any], name: str, what: str, each: str) -> Sequence[bytes]:
    """Remove and return the BYTES input ``name``; missing or not BYTES -> InvalidInputError."""
    if name not in inputs:
        raise InvalidInputError(f"missing input {name!r}: send {what} as a BYTES tensor named "
                                f"{name!r}, {each}")
    items = inputs.pop(name)
    if isinstance(items, torch.Tensor):
        raise InvalidInputError(f"input {name!r} must be BYTES ({each}), got a {items.dtype} "
                                "tensor")
    return cast(Sequence[bytes], items)


def _pick(explicit: str | None, fallback: str | None, specs: Sequence[TensorSpec] | None,
          side: str, key: str) -> str:
    """The module tensor a pipeline step attaches to: the one named by ``key``, else one
    named ``fallback``, else the module's only one."""
    if specs is None:  # an open signature: trust the config
        name = explicit or fallback
        if name is None:
            raise PipelineConfigError(f"the module's {side}s are not declared; name the "
                                      f"{side} to use with {key} = \"...\"")
        return name
    names = [s.name for s in specs]
    if explicit is not None:
        if explicit not in names:
            raise PipelineConfigError(f"{key} = {explicit!r}: the module has no such {side}; "
                                      f"its {side}s are {names}")
        return explicit
    if fallback in names:
        return fallback
    if len(names) == 1:
        return names[0]
    raise PipelineConfigError(f"the module's {side}s are {names}; say which one the pipeline "
                              f"uses with {key} = \"...\"")
