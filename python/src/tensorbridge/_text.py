"""Server-side text pipeline: UTF-8 strings in, token ids to the module, pooled vectors out.

``[models.NAME.preprocess]`` with a ``tokenizer`` key turns a BYTES input (one UTF-8 text per
item) into ``input_ids``/``attention_mask`` (and zero ``token_type_ids`` when the module takes
them), padded to the longest text of the request; ``[models.NAME.postprocess]`` pools the
module's token embeddings (mean over the attention mask, or the CLS token) and L2-normalises
them into ``embedding``/``norm``, or classifies as the image pipeline does. Every reply also
says, per text, whether it was ``truncated`` to ``max_length`` tokens.

The mask and the truncation flags travel beside the module's inputs (``passthrough``) and come
back beside its outputs, so a batch of several requests is split and pooled row by row; the
scheduler pads the ``pad`` inputs of merged requests to the longest one (docs/models.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._errors import InvalidInputError
from ._pipeline import Classify, PipelineConfigError, _pick, splice, take_items
from ._signature import Signature, TensorSpec

#: Where the truncation flags ride between preprocess and postprocess (never a module name).
TRUNCATED_KEY = "_tb_truncated"
#: Module input names the preprocess fills.
IDS, MASK, TYPES = "input_ids", "attention_mask", "token_type_ids"
#: Module outputs the pooling reads when the config names none (sentence-transformers, HF).
TOKEN_OUTPUTS = ("token_embeddings", "last_hidden_state")
POOLINGS = ("mean", "cls", "none")
PADDINGS = ("longest", "max_length")


def _known(cls: type, raw: Mapping[str, Any], side: str, hidden: set[str]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)} - hidden
    unknown = set(raw) - known
    if unknown:
        raise PipelineConfigError(f"unknown {side} keys {sorted(unknown)} for a text model; known "
                              f"keys: {sorted(known)}")
    return dict(raw)


def load_tokenizer(path: str) -> tuple[Any, Path]:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or a folder holding one."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a declared dependency
        raise PipelineConfigError("text preprocessing needs the 'tokenizers' package: "
                              "pip install tokenizers") from None
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise PipelineConfigError(f"preprocess tokenizer = {path!r}: no tokenizer.json there; give "
                              "the file or the model folder holding it")
    try:
        return Tokenizer.from_file(str(file)), file.parent
    except Exception as exc:  # the Rust library raises its own exception type
        raise PipelineConfigError(f"preprocess tokenizer {file}: cannot be read ({exc})") from None


def _default_max_length(tokenizer: Any, folder: Path) -> int:
    """sentence-transformers' ``max_seq_length``, else the tokenizer file's, else 512."""
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text("utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    truncation = tokenizer.truncation or {}
    return int(truncation.get("max_length") or 512)


@dataclass(frozen=True)
class TextPreprocess:
    """How one BYTES input of UTF-8 texts becomes token ids and an attention mask."""

    #: Client input name: BYTES [n], one UTF-8 text per item.
    input: str = "text"
    #: ``tokenizer.json`` or a model folder holding it (Hugging Face ``tokenizers`` format).
    tokenizer: str = ""
    #: Tokens per text, special tokens included; None = the folder's
    #: ``sentence_bert_config.json``, else the tokenizer file's truncation, else 512.
    max_length: int | None = None
    #: Cut longer texts to ``max_length`` (and say so in ``truncated``); false = refuse them.
    truncation: bool = True
    #: ``longest``: pad to the longest text of the batch; ``max_length``: always pad to it.
    padding: str = "longest"
    #: Largest accepted text, in UTF-8 bytes.
    max_bytes: int = 100_000
    #: Module inputs fed with the ids, the mask and (when the module has it) zero type ids.
    ids_input: str = IDS
    mask_input: str = MASK
    types_input: str = TYPES
    #: The loaded tokenizer and its padding id.
    loaded: Any = field(default=None, compare=False, repr=False)
    pad_id: int = field(default=0, compare=False)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> TextPreprocess:
        """Build from a ``[models.NAME.preprocess]`` table that has ``tokenizer``."""
        values = _known(cls, raw, "preprocess", {"loaded", "pad_id"})
        try:
            config = cls(**values)
        except TypeError as exc:
            raise PipelineConfigError(f"preprocess: {exc}") from None
        tokenizer, folder = load_tokenizer(str(config.tokenizer))
        max_length = config.max_length or _default_max_length(tokenizer, folder)
        if not isinstance(max_length, int) or max_length < 2:
            raise PipelineConfigError(f"preprocess max_length must be an integer >= 2, got "
                                  f"{max_length!r}")
        if config.padding not in PADDINGS:
            raise PipelineConfigError(f"preprocess padding must be one of {list(PADDINGS)}, got "
                                  f"{config.padding!r}")
        if not isinstance(config.max_bytes, int) or config.max_bytes <= 0:
            raise PipelineConfigError("preprocess max_bytes must be a positive integer")
        tokenizer.no_padding()
        # Cut at max_length + 1 when refusing long texts: one token over is enough to tell.
        tokenizer.enable_truncation(max_length if config.truncation else max_length + 1)
        pad = (tokenizer.padding or {}).get("pad_id")
        if pad is None:
            pad = tokenizer.token_to_id("[PAD]") or 0
        object.__setattr__(config, "max_length", max_length)
        object.__setattr__(config, "loaded", tokenizer)
        object.__setattr__(config, "pad_id", int(pad))
        return config

    def targets(self, forward: Signature) -> tuple[str, ...]:
        """The module inputs this preprocess fills (the type ids only if the module has them)."""
        names = [s.name for s in forward.inputs] if forward.inputs is not None else None
        wanted = [self.ids_input, self.mask_input]
        if names is None:
            return tuple(wanted)
        missing = [n for n in wanted if n not in names]
        if missing:
            raise PipelineConfigError(f"the module's inputs are {names}, it has no {missing}; name "
                                  "them with ids_input / mask_input")
        if self.types_input in names:
            wanted.append(self.types_input)
        return tuple(wanted)

    def texts(self, items: Sequence[bytes]) -> list[str]:
        """Decode every item; an empty batch, invalid UTF-8 or an oversized item is refused."""
        if len(items) == 0:
            raise InvalidInputError(f"input {self.input!r} holds no texts (an empty batch); "
                                    "send at least one string")
        texts = []
        for index, data in enumerate(items):
            where = f"input {self.input!r} item {index}"
            if len(data) > self.max_bytes:
                raise InvalidInputError(f"{where} is {len(data):,} bytes, more than this "
                                        f"model's limit of {self.max_bytes:,} "
                                        "(preprocess.max_bytes); send a shorter text")
            try:
                texts.append(bytes(data).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"{where} is not valid UTF-8 (byte {exc.start}: {exc.reason}); convert "
                    "the text to UTF-8 first, e.g. mb_convert_encoding($s, 'UTF-8', "
                    "'ISO-8859-1')") from None
        return texts

    def __call__(self, items: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
        """Texts -> (ids INT64 [n, L], mask INT64 [n, L], truncated BOOL [n])."""
        texts = self.texts(items)
        encodings = self.loaded.encode_batch(texts)
        limit = self.max_length
        assert limit is not None
        lengths = [len(e.ids) for e in encodings]
        truncated = [bool(e.overflowing) for e in encodings]
        if not self.truncation:
            for index, n in enumerate(lengths):
                if n > limit:
                    raise InvalidInputError(
                        f"input {self.input!r} item {index} is longer than this model's "
                        f"{limit} tokens and preprocess.truncation is off; send a shorter "
                        "text")
        width = limit if self.padding == "max_length" else max(lengths)
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, (encoding, n) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        return (torch.from_numpy(ids), torch.from_numpy(mask),
                torch.tensor(truncated, dtype=torch.bool))


@dataclass(frozen=True)
class Pool:
    """Token embeddings -> one vector per text (``postprocess`` of a text model)."""

    #: Module output with token embeddings [n, L, d] (or [n, d] with pooling = "none").
    output: str | None = None
    #: ``mean`` over the attention mask (sentence-transformers' default), ``cls`` (the first
    #: token), or ``none`` (the module pools itself).
    pooling: str = "mean"
    #: Divide each vector by its L2 norm (``norm`` still gives the norm before).
    normalize: bool = True

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Pool:
        """Build from a ``[models.NAME.postprocess]`` table of a text model."""
        config = cls(**_known(cls, raw, "postprocess", set()))
        if config.pooling not in POOLINGS:
            raise PipelineConfigError(f"postprocess pooling must be one of {list(POOLINGS)}, got "
                                  f"{config.pooling!r}")
        return config

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """-> embedding FP32 [n, d] and norm FP32 [n]."""
        tokens = tokens.float()
        if self.pooling == "none":
            pooled = tokens
        elif tokens.dim() != 3:
            raise InvalidInputError(f"postprocess pooling {self.pooling!r} expects token "
                                    f"embeddings [n, tokens, dim], the model returned "
                                    f"{list(tokens.shape)}")
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.int64)
            weights = mask[:, :tokens.shape[1]].unsqueeze(-1).to(tokens.dtype)
            # sentence-transformers' formula: sum / max(count, 1e-9)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if pooled.dim() != 2:
            raise InvalidInputError(f"postprocess expects one vector per text, got shape "
                                    f"{list(pooled.shape)}")
        norm = pooled.norm(dim=1)
        if self.normalize:
            pooled = pooled / norm.clamp(min=1e-12).unsqueeze(1)
        return {"embedding": pooled.contiguous(), "norm": norm.contiguous()}


def is_text(pre: Mapping[str, Any] | None) -> bool:
    """Whether a preprocess table describes text (it names a tokenizer)."""
    return pre is not None and "tokenizer" in pre


#: Keys only a text preprocess has: a TOML table with one of them but no ``tokenizer``
#: completes the text pipeline a model factory declares (models.minilm does).
TEXT_ONLY_KEYS = frozenset({"tokenizer", "max_length", "truncation", "padding", "ids_input",
                            "mask_input", "types_input"})


def check_text_keys(raw: Mapping[str, Any]) -> None:
    """Refuse unknown keys of a text preprocess table whose tokenizer the model declares."""
    _known(TextPreprocess, raw, "preprocess", {"loaded", "pad_id"})


#: Postprocess keys that only classification has: with none of them, a text model pools.
CLASSIFY_KEYS = frozenset({"top_k", "softmax", "labels", "notice"})


@dataclass(frozen=True)
class TextPipeline:
    """Tokenizer before the module; pooling (or classification) after it."""

    preprocess: TextPreprocess
    #: Pooling, or the image pipeline's classification (logits [n, classes] -> top-k).
    postprocess: Pool | Classify
    #: Module inputs filled by the preprocess, and the module output the postprocess reads.
    targets: tuple[str, ...] = ()
    source: str | None = None
    #: Inputs the scheduler pads along dim 1 when it merges requests, and with what.
    pad: Mapping[str, int] = field(default_factory=dict)
    #: Inputs handed back beside the module's outputs (the mask, the truncation flags).
    passthrough: tuple[str, ...] = ()

    active = True

    @classmethod
    def build(cls, pre: Mapping[str, Any], post: Mapping[str, Any] | None,
              forward: Signature) -> TextPipeline:
        """Parse both tables and tie them to the module's signature ``forward``."""
        preprocess = TextPreprocess.parse(pre)
        targets = preprocess.targets(forward)
        raw_post = dict(post or {})
        postprocess: Pool | Classify = (Classify.parse(raw_post) if CLASSIFY_KEYS & set(raw_post)
                                        else Pool.parse(raw_post))
        explicit = postprocess.output
        fallback = None
        if forward.outputs is not None and explicit is None:
            fallback = next((n for n in TOKEN_OUTPUTS
                             if n in [s.name for s in forward.outputs]), None)
        source = _pick(explicit, fallback, forward.outputs, "output", "postprocess output")
        pad = {preprocess.ids_input: preprocess.pad_id, preprocess.mask_input: 0}
        if preprocess.types_input in targets:
            pad[preprocess.types_input] = 0
        if preprocess.padding == "max_length":
            pad = {}  # every request has the same width already
        return cls(preprocess, postprocess, targets, source, pad,
                   (preprocess.mask_input, TRUNCATED_KEY))

    def client_signature(self, forward: Signature) -> Signature:
        """Clients send ``text`` BYTES [n]; they get ``embedding``/``norm``/``truncated``."""
        text = TensorSpec(self.preprocess.input, "BYTES", (-1,))
        if forward.inputs is None:
            inputs: list[TensorSpec] = [text]
        else:
            inputs = [s for s in forward.inputs if s.name not in self.targets]
            inputs.insert(0, text)
        outputs = list(forward.outputs)
        spec = next(s for s in outputs if s.name == self.source)
        width = spec.shape[-1] if spec.shape and spec.shape[-1] > 0 else -1
        if isinstance(self.postprocess, Pool):
            new = [TensorSpec("embedding", "FP32", (-1, width)), TensorSpec("norm", "FP32", (-1,))]
        else:
            new = self.postprocess.specs(None if width < 0 else width)
        new.append(TensorSpec("truncated", "BOOL", (-1,)))
        outputs = splice(outputs, spec, new)
        return Signature(tuple(inputs), tuple(outputs))

    def pre(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Client inputs -> module inputs (plus the passthrough values)."""
        out = dict(inputs)
        items = take_items(out, self.preprocess.input, "the texts", "one UTF-8 text per item")
        ids, mask, truncated = self.preprocess(items)
        out[self.preprocess.ids_input] = ids
        out[self.preprocess.mask_input] = mask
        if self.preprocess.types_input in self.targets:
            out[self.preprocess.types_input] = torch.zeros_like(ids)
        out[TRUNCATED_KEY] = truncated
        return out

    def post(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """Module outputs -> client outputs (order kept, the token embeddings replaced)."""
        values = dict(outputs)
        mask = values.pop(self.preprocess.mask_input, None)
        truncated = values.pop(TRUNCATED_KEY, None)
        out: dict[str, Any] = {}
        for name, value in values.items():
            if name != self.source:
                out[name] = value
                continue
            if isinstance(self.postprocess, Pool):
                out.update(self.postprocess(value, mask))
            else:
                out.update(self.postprocess(value))
            rows = value.shape[0] if value.dim() else 0
            out["truncated"] = (truncated.contiguous() if truncated is not None
                                else torch.zeros(rows, dtype=torch.bool))
        return out
