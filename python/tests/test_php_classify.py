"""PHP classify() / classifyBatch() against real image models (ResNet-18, digits-image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import tensorbridge as tb
from tensorbridge.models import digits, resnet

from conftest import ServerProcess, php

pytestmark = pytest.mark.usefixtures("leak_check")

MODELS = ["resnet18=tensorbridge.models.resnet:create",
          "digits-image=tensorbridge.models.digits:create_image",
          "echo=tensorbridge.models.testing:echo"]


def jpeg(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A photo-like JPEG (gradients and noise; the seed makes each one different)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (x * seed + y) % 256], axis=2)
    rgb += rng.normal(0, 20, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def digit_png(pixels) -> bytes:
    """A held-out 8x8 digit drawn as a web canvas would: black ink on white, 32 px blocks."""
    gray = np.round(255 - pixels.reshape(8, 8).numpy() * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray, "L").resize((256, 256), Image.NEAREST).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """One server for the module: loading ResNet-18 takes a few seconds on 2 cores."""
    args = [a for m in MODELS for a in ("--model", m)]
    srv = ServerProcess(str(tmp_path_factory.mktemp("classify") / "tb.sock"), args).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def held_out():
    x, y = digits.load_data()
    _, test_idx = digits.split()
    return x[test_idx][:6], y[test_idx][:6]


def test_classify_resnet18_matches_the_python_client_and_says_weights_are_random(
        image_server) -> None:
    server = image_server
    image = jpeg(1)
    top, big = php({"socket": server.socket, "timeout": 30, "calls": [
        {"op": "classify", "model": "resnet18", "image_hex": image.hex(), "top_k": 5},
        {"op": "classify", "model": "resnet18", "image_hex": image.hex(), "top_k": 11}]})
    with tb.Client(server.socket, timeout=30) as c:
        want = c.infer("resnet18", {"image": [image]})
    assert [t["label"] for t in top["top"]] == [b.decode() for b in want["labels"][:5]]
    assert [t["index"] for t in top["top"]] == want["indices"][0, :5].tolist()
    scores = [t["score"] for t in top["top"]]
    assert scores == pytest.approx(want["scores"][0, :5].tolist())
    assert scores == sorted(scores, reverse=True)
    assert top["notice"] == resnet.RANDOM_NOTICE
    assert top["timing"]["preprocess_us"] > 0  # the server decoded the JPEG
    assert big["error"] == "InvalidInputException"
    assert "topK 11 is more than the 10 classes" in big["message"]


def test_topk_checked_before_sending_once_the_signature_is_known(image_server) -> None:
    server = image_server
    _, big = php({"socket": server.socket, "timeout": 30, "calls": [
        {"op": "models"},
        {"op": "classify", "model": "resnet18", "image_hex": jpeg(2).hex(), "top_k": 20}]})
    assert big["error"] == "InvalidInputException" and "ask for at most 10" in big["message"]


def test_digits_image_with_real_weights_has_no_notice(image_server, held_out) -> None:
    server = image_server
    x, y = held_out
    results = php({"socket": server.socket, "timeout": 30, "calls": [
        {"op": "classify", "model": "digits-image", "image_hex": digit_png(row).hex(), "top_k": 3}
        for row in x]})
    for r, label in zip(results, y.tolist(), strict=True):
        assert r["notice"] is None
        assert len(r["top"]) == 3 and r["top"][0]["label"] == str(label), r


BAD_IMAGES = [
    (jpeg(3)[:2000], "could not be decoded"),  # a truncated JPEG
    (b"%PDF-1.4 not a picture", "is not an image this model accepts"),
    (b"", "is empty"),
]


def test_bad_images_are_invalid_input_and_the_connection_carries_on(image_server) -> None:
    server = image_server
    calls = []
    for image, _ in BAD_IMAGES:
        # top_k within the model's 3: after the first refusal the client knows the signature
        # and would refuse a larger one itself, before sending
        calls += [{"op": "classify", "model": "digits-image", "image_hex": image.hex(), "top_k": 3},
                  {"op": "classify", "model": "resnet18", "image_hex": jpeg(4).hex(), "top_k": 1}]
    results = php({"socket": server.socket, "timeout": 30, "calls": calls})
    for (_, match), bad, good in zip(BAD_IMAGES, results[::2], results[1::2], strict=True):
        assert bad["error"] == "InvalidInputException" and match in bad["message"], bad
        assert len(good["top"]) == 1


def test_classify_batch_mixed_good_and_bad_images(image_server, held_out) -> None:
    server = image_server
    x, y = held_out
    images = {f"digit{i}": digit_png(row).hex() for i, row in enumerate(x)}
    images = {"pdf": b"%PDF-1.4".hex(), **images, "cut": jpeg(5)[:1500].hex(), "empty": ""}
    singles = [{"op": "classify", "model": "digits-image", "image_hex": digit_png(row).hex(),
                "top_k": 2} for row in x]
    *single, batch = php({"socket": server.socket, "timeout": 30, "calls": [
        *singles, {"op": "classify_batch", "model": "digits-image", "images": images,
                   "top_k": 2}]})
    got = {item["key"]: item for item in batch["batch"]}
    assert list(got) == list(images)
    for i, label in enumerate(y.tolist()):
        value = got[f"digit{i}"]["value"]
        assert value == single[i]["top"]  # its own answer, same as one classify() call
        assert value[0]["label"] == str(label)
    for key in ("pdf", "cut", "empty"):
        assert got[key]["error"] == "InvalidInputException", got[key]
    assert batch["notice"] is None


def test_classify_on_a_model_that_is_not_a_classifier(image_server) -> None:
    server = image_server
    (r,) = php({"socket": server.socket, "calls": [
        {"op": "classify", "model": "echo", "image_hex": b"abc".hex()}]})
    assert r["error"] == "InvalidInputException"
    assert 'model "echo" is not an image classifier' in r["message"]
