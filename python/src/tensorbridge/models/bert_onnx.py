"""BERT encoders run by ONNX Runtime: a fused fp32 graph written once from the weights, cached.

``onnx_encoder(folder)`` turns a Hugging Face BERT folder (``config.json`` +
``model.safetensors``, e.g. all-MiniLM-L6-v2) into an ONNX graph made of ONNX Runtime's fused
transformer kernels (``EmbedLayerNormalization``, ``Attention``, ``SkipLayerNormalization``,
``BiasGelu``: the ops its own BERT optimiser produces), checks it against the torch encoder
on probe texts, and keeps it in the cache directory, so later loads only read it back. The
graph is written from the weights directly rather than exported from torch: no exporter and no
fusion pattern matching can silently leave an unfused (twice slower) graph behind.

Cache: ``<cache>/tensorbridge-<version>/bert-<key>.onnx`` beside ``.sha256`` (the file's
digest, written last), where ``<cache>`` is ``cache_dir``, else ``$XDG_CACHE_HOME/tensorbridge``,
else ``~/.cache/tensorbridge``, and ``<key>`` hashes the folder, its weights' size and mtime
and this module's graph revision. A file whose digest does not match is rebuilt; an unwritable
cache builds into a temporary file each load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tensorbridge

log = logging.getLogger("tensorbridge")

#: Bumped whenever the graph below changes: old cache files are then never read.
GRAPH_REVISION = 1
#: Cosine every probe embedding must reach against the torch encoder before a graph is used.
PROBE_COSINE = 0.99999
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "",
               "Ça a été très déjà-vu. 東京は日本の首都です 🍕",
               " ".join(f"word{i} of a longer text" for i in range(12)))


class OnnxUnavailable(RuntimeError):
    """ONNX Runtime (or ``onnx``, to write the graph) is missing, or the graph is unusable."""


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted graphs are kept, one folder per TensorBridge version."""
    if cache_dir:
        base = Path(cache_dir)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) / "tensorbridge" if xdg else Path.home() / ".cache" / "tensorbridge"
    return base / f"tensorbridge-{tensorbridge.__version__}"


def cache_key(folder: Path) -> str:
    """Names the graph of one weights folder: its path, its files' identity, the revision."""
    weights = folder / "model.safetensors"
    stat = weights.stat()
    ident = {"folder": str(folder.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
             "config": (folder / "config.json").read_text("utf-8"), "rev": GRAPH_REVISION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def build_graph(folder: Path) -> Any:
    """The fused fp32 ONNX graph (``onnx.ModelProto``) of a BERT folder: ``input_ids`` and
    ``attention_mask`` INT64 [n, L] (right-padded) -> ``token_embeddings`` FP32 [n, L, d]."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise OnnxUnavailable("writing the ONNX graph needs the 'onnx' package: "
                              "pip install onnx") from None
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text("utf-8"))
    if config.get("hidden_act", "gelu") != "gelu" or config.get(
            "position_embedding_type", "absolute") != "absolute":
        raise OnnxUnavailable("the ONNX graph implements BERT with gelu and absolute positions "
                              "only")
    w = load_file(str(folder / "model.safetensors"))
    eps = float(config.get("layer_norm_eps", 1e-12))
    inits: list[Any] = []
    nodes: list[Any] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def fused(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], domain="com.microsoft", **attrs))
        return output

    emb = "embeddings."
    # Every text has token type 0 (sentence-transformers sends zeros): fold its embedding
    # into the position table, so the graph needs no token-type input.
    positions = w[emb + "position_embeddings.weight"] + w[emb + "token_type_embeddings.weight"][0]
    nodes.append(helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32))
    nodes.append(helper.make_node("Cast", ["attention_mask"], ["mask32"], to=TensorProto.INT32))
    # mask_index = tokens per row: Attention then treats everything after them as padding.
    nodes.append(helper.make_node(
        "EmbedLayerNormalization",
        ["ids32", "", init("word", w[emb + "word_embeddings.weight"]), init("pos", positions),
         "", init("emb_g", w[emb + "LayerNorm.weight"]), init("emb_b", w[emb + "LayerNorm.bias"]),
         "mask32"], ["x0", "mask_index"], domain="com.microsoft", epsilon=eps))
    x = "x0"
    layers = int(config["num_hidden_layers"])
    for i in range(layers):
        p, a = f"encoder.layer.{i}.", f"encoder.layer.{i}.attention."
        qkv_w = np.concatenate([w[f"{a}self.{n}.weight"].T for n in ("query", "key", "value")], 1)
        qkv_b = np.concatenate([w[f"{a}self.{n}.bias"] for n in ("query", "key", "value")])
        att = fused("Attention", [x, init(f"l{i}.qkv_w", qkv_w), init(f"l{i}.qkv_b", qkv_b),
                                  "mask_index"], f"l{i}.att",
                    num_heads=int(config["num_attention_heads"]))
        nodes.append(helper.make_node("MatMul", [att, init(f"l{i}.ao_w", w[
            a + "output.dense.weight"].T)], [f"l{i}.ao"]))
        x1 = fused("SkipLayerNormalization", [
            f"l{i}.ao", x, init(f"l{i}.aln_g", w[a + "output.LayerNorm.weight"]),
            init(f"l{i}.aln_b", w[a + "output.LayerNorm.bias"]),
            init(f"l{i}.ao_b", w[a + "output.dense.bias"])], f"l{i}.x1", epsilon=eps)
        nodes.append(helper.make_node("MatMul", [x1, init(f"l{i}.in_w", w[
            p + "intermediate.dense.weight"].T)], [f"l{i}.in"]))
        gelu = fused("BiasGelu", [f"l{i}.in", init(f"l{i}.in_b", w[
            p + "intermediate.dense.bias"])], f"l{i}.gelu")  # exact (erf) GELU, as BERT's
        nodes.append(helper.make_node("MatMul", [gelu, init(f"l{i}.out_w", w[
            p + "output.dense.weight"].T)], [f"l{i}.out"]))
        x = fused("SkipLayerNormalization", [
            f"l{i}.out", x1, init(f"l{i}.oln_g", w[p + "output.LayerNorm.weight"]),
            init(f"l{i}.oln_b", w[p + "output.LayerNorm.bias"]),
            init(f"l{i}.out_b", w[p + "output.dense.bias"])],
            "token_embeddings" if i == layers - 1 else f"l{i}.x2", epsilon=eps)
    graph = helper.make_graph(
        nodes, "bert",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["n", "L"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT,
                                       ["n", "L", int(config["hidden_size"])])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             producer_name=f"tensorbridge {tensorbridge.__version__}")


def onnx_encoder(folder: Path, reference: Any, threads: int,
                 cache_dir: str | None = None) -> Any:
    """An ONNX Runtime session (``OnnxModule``) running ``folder``'s BERT, from the cache or
    written now; ``reference(ids, mask)`` is the torch encoder a new graph is checked against.

    Raises ``OnnxUnavailable`` when ONNX Runtime or ``onnx`` is missing or the graph fails
    its check: the caller then serves the torch encoder.
    """
    try:
        import onnxruntime  # noqa: F401 - only whether it is there
    except ImportError:
        raise OnnxUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
    from .._backends import OnnxModule

    root = cache_root(cache_dir)
    path = root / f"bert-{cache_key(folder)}.onnx"
    digest_file = path.with_suffix(".sha256")
    if path.is_file():
        try:
            recorded = digest_file.read_text("ascii").strip()
        except OSError:
            recorded = ""
        if recorded and recorded == _digest(path):
            return _session(OnnxModule, path, threads)  # it passed the check when written
        log.warning("ONNX cache %s does not match its recorded digest (damaged, or another "
                    "process was writing it); writing it again", path)
    graph = build_graph(folder)
    data = graph.SerializeToString()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, suffix=".part", delete=False) as f:
            f.write(data)
        os.chmod(f.name, 0o644)  # as any other file written: other users may read it
        os.replace(f.name, path)  # whole or absent: readers never see half a file
    except OSError as exc:
        log.warning("ONNX cache %s is not writable (%s); the graph is written to a temporary "
                    "file on every load (set options.cache_dir)", root, exc)
        with tempfile.NamedTemporaryFile(suffix=".onnx") as tmp:
            tmp.write(data)
            tmp.flush()
            module = _session(OnnxModule, Path(tmp.name), threads)
        _check(module, reference, folder)
        return module
    module = _session(OnnxModule, path, threads)
    try:
        _check(module, reference, folder)
    except OnnxUnavailable:
        path.unlink(missing_ok=True)
        raise
    digest_file.write_text(hashlib.sha256(data).hexdigest() + "\n", "ascii")
    log.info("ONNX graph of %s written to %s", folder, path)
    return module


def _session(cls: Any, path: Path, threads: int) -> Any:
    try:
        # No spinning: a text server shares the CPU with its PHP clients, and spinning idle
        # threads cost 3x the CPU per sentence at 16 clients on 2 cores (bench S8).
        return cls(path, threads, spin=False)
    except ValueError as exc:  # e.g. an onnxruntime without the com.microsoft kernels
        raise OnnxUnavailable(str(exc)) from None


def _check(module: Any, reference: Any, folder: Path) -> None:
    """Refuse a graph whose pooled probe embeddings differ from the torch encoder's."""
    from .._text import Pool, TextPreprocess

    pre = TextPreprocess.parse({"tokenizer": str(folder)})
    ids, mask, _ = pre([t.encode() for t in PROBE_TEXTS])
    pool = Pool()
    with torch.inference_mode():
        want = pool(reference(ids, mask), mask)["embedding"]
        got = pool(module(ids, mask)[0], mask)["embedding"]
    cosine = torch.nn.functional.cosine_similarity(want.double(), got.double(), dim=1)
    if not bool(torch.isfinite(cosine).all()) or float(cosine.min()) < PROBE_COSINE:
        raise OnnxUnavailable(f"the ONNX graph of {folder} answers differently from the torch "
                              f"encoder (cosine {float(cosine.min()):.6f} < {PROBE_COSINE})")
