"""PHP -> text models: embed()/embedBatch() against the bundled all-MiniLM-L6-v2 (checked against
sentence-transformers itself) and classify() of a text by a tokenizer + classifier model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from tensorbridge.models import minilm

from conftest import php

pytestmark = pytest.mark.usefixtures("leak_check")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MINILM = "minilm=tensorbridge.models.minilm:create"
TEXTS = {"en": "The quick brown fox jumps over the lazy dog.",
         "fr": "Ça a été très déjà-vu pour la naïve Zoë au café à Málaga.",
         "cjk": "東京は日本の首都です。北京是中国的首都。",
         "long": " ".join(f"word{i % 97} of a long text" for i in range(200))}


@pytest.fixture(scope="module")
def reference() -> dict[str, list[float]]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm.bundled_folder()), device="cpu")
    vectors = model.encode(list(TEXTS.values()), normalize_embeddings=True)
    return {k: v.tolist() for k, v in zip(TEXTS, vectors, strict=True)}


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def length(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_embed_normalised_and_raw(make_server, reference) -> None:
    srv = make_server([MINILM])
    unit, raw = php({"socket": srv.socket, "timeout": 60, "calls": [
        {"op": "embed", "model": "minilm", "texts": TEXTS},
        {"op": "embed", "model": "minilm", "texts": TEXTS, "normalize": False}]})
    assert list(unit["vectors"]) == list(TEXTS)  # keyed like the texts, in order
    for key in TEXTS:
        assert len(unit["vectors"][key]) == 384
        assert cosine(unit["vectors"][key], reference[key]) >= 0.99999, key
        assert abs(length(unit["vectors"][key]) - 1) < 1e-5, key
        # the pooled vector as the model made it: same direction, its own length (> 1 here)
        assert cosine(raw["vectors"][key], reference[key]) >= 0.99999, key
        assert length(raw["vectors"][key]) > 1.5, key
    assert unit["truncated"] == {"en": False, "fr": False, "cjk": False, "long": True}


def test_embed_batch_gives_each_text_its_own_result(make_server, reference) -> None:
    srv = make_server([MINILM])
    texts = {"en": TEXTS["en"].encode().hex(), "bad": "ff", "number": 42,
             "long": TEXTS["long"].encode().hex()}
    (r,) = php({"socket": srv.socket, "timeout": 60, "calls": [
        {"op": "embed_batch", "model": "minilm", "texts_hex": texts}]})
    items = {i["key"]: i for i in r["batch"]}
    assert list(items) == list(texts)
    assert cosine(items["en"]["value"], reference["en"]) >= 0.99999
    assert cosine(items["long"]["value"], reference["long"]) >= 0.99999
    assert items["bad"]["error"] == "InvalidInputException" and "UTF-8" in items["bad"]["message"]
    assert items["number"]["error"] == "InvalidInputException"
    assert r["truncated"] == {"en": False, "long": True}


def test_embed_refuses_what_is_no_text_model(make_server) -> None:
    srv = make_server(["digits=tensorbridge.models.digits:create"])
    (r,) = php({"socket": srv.socket, "calls": [
        {"op": "embed", "model": "digits", "texts": ["x"]}]})
    assert r["error"] == "InvalidInputException" and r["is_base"]


TOPIC_MODEL = '''
import torch


class Topic(torch.nn.Module):
    """Logits from the token count: long texts are "long", short ones "short"."""

    tensorbridge_signature = {
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}

    def forward(self, input_ids, attention_mask):
        n = attention_mask.sum(dim=1).float() - 8.0
        return torch.stack([n, -n, torch.zeros_like(n)], dim=1)


def create():
    from tensorbridge.models import minilm

    model = Topic()
    # the pipeline as a model factory declares it (as models.minilm does)
    model.tensorbridge_pipeline = {
        "preprocess": {"input": "text", "tokenizer": str(minilm.bundled_folder()),
                       "max_length": 64},
        "postprocess": {"top_k": 2, "labels": ["long", "short", "neutral"]}}
    return model
'''


def test_classify_accepts_a_text_for_a_tokenizer_model(make_server, tmp_path: Path) -> None:
    (tmp_path / "topic.py").write_text(TOPIC_MODEL)
    srv = make_server([f"topic={tmp_path / 'topic.py'}"])
    one, batch = php({"socket": srv.socket, "timeout": 30, "calls": [
        {"op": "classify", "model": "topic", "text": TEXTS["long"], "top_k": 2},
        {"op": "classify_batch", "model": "topic", "top_k": 1,
         "texts": {"short": "hi", "long": TEXTS["en"] * 3}}]})
    assert "error" not in one, one
    assert [t["label"] for t in one["top"]] == ["long", "neutral"]
    assert one["top"][0]["score"] > one["top"][1]["score"]
    labels = {i["key"]: [t["label"] for t in i["value"]] for i in batch["batch"]}
    assert labels == {"short": ["short"], "long": ["long"]}
