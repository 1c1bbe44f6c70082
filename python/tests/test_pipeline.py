"""Server-side image preprocessing and top-k postprocessing: digits-image, ResNet-18, bad
images through the real server, and the config tables."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tensorbridge as tb
from tensorbridge._pipeline import Classify, ImagePreprocess, PipelineConfigError, load_labels
from tensorbridge.models import digits, resnet

DATA = Path(__file__).parent / "data"
DIGITS_IMAGE = "digits-image=tensorbridge.models.digits:create_image"


# -- images ------------------------------------------------------------------------------

def canvas(pixels: torch.Tensor, block: int = 32, transparent: bool = False) -> Image.Image:
    """A held-out digit as a web page draws it: 8x8 gray blocks, black ink on white (RGBA).

    ``transparent``: blank cells left unpainted (alpha 0), as on a canvas never filled.
    """
    values = pixels.reshape(8, 8).numpy()
    gray = np.round(255 - values * 255 / 16).astype(np.uint8)
    alpha = np.where(values > 0, 255, 0) if transparent else np.full((8, 8), 255)
    rgba = np.dstack([gray, gray, gray, alpha.astype(np.uint8)])
    return Image.fromarray(rgba, "RGBA").resize((8 * block, 8 * block), Image.NEAREST)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    if fmt in ("JPEG",) and image.mode == "RGBA":
        image = image.convert("RGB")
    image.save(buf, fmt, **params)
    return buf.getvalue()


def photo(width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG: gradients, a block, noise (seeded)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) % 256], axis=2)
    rgb += rng.normal(0, 12, rgb.shape)
    rgb[height // 4:height // 2, width // 3:width // 2] = [30, 160, 90]
    return encode(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares ``width`` x ``height`` gray pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits.load_data()
    _, test_idx = digits.split()
    return x[test_idx], y[test_idx]


@pytest.fixture(scope="module")
def digits_image() -> tb.LoadedModel:
    return tb.load_model(tb.ModelConfig("digits-image", "tensorbridge.models.digits:create_image"))


# -- digits-image ------------------------------------------------------------------------

def test_canvas_drawings_of_held_out_digits_are_classified(held_out, digits_image) -> None:
    x, y = held_out
    files = [encode(canvas(row)) for row in x]
    # The canvas path recovers the 0..16 pixel values (up to the 8-bit gray rounding) ...
    pre = digits_image.preprocess({"image": files})["input"]
    assert pre.shape == (len(files), 64) and pre.dtype == torch.float32
    assert (pre - x).abs().max() < 0.05
    # ... so it is as accurate as the tensor path.
    out = digits_image.predict({"image": files})
    accuracy = (out["indices"][:, 0] == y).float().mean().item()
    print(f"digits-image held-out accuracy through canvas PNGs: {accuracy:.4f} ({len(y)} images)")
    assert accuracy >= 0.97
    assert out["scores"].shape == (len(files), 3) and out["labels"][0] == str(
        int(out["indices"][0, 0]))
    assert torch.all(out["scores"][:, :-1] >= out["scores"][:, 1:])  # descending


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "transparent PNG"])
def test_formats(held_out, digits_image, fmt: str) -> None:
    x, y = held_out
    rows = range(8)
    if fmt == "transparent PNG":
        files = [encode(canvas(x[i], transparent=True)) for i in rows]
    elif fmt == "JPEG":
        files = [encode(canvas(x[i]), "JPEG", quality=95) for i in rows]
    elif fmt == "WEBP":
        files = [encode(canvas(x[i]), "WEBP", lossless=True) for i in rows]
    else:
        files = [encode(canvas(x[i]).convert("RGB" if fmt == "PNG" else "P"), fmt) for i in rows]
    assert Image.open(io.BytesIO(files[0])).format == fmt.split()[-1]
    got = digits_image.predict({"image": files})["indices"][:, 0]
    assert got.tolist() == y[:8].tolist()


def test_gif_first_frame_is_used(held_out, digits_image) -> None:
    x, y = held_out
    a, b = next((i, j) for i in range(20) for j in range(20) if y[i] != y[j])
    frames = [canvas(x[a]).convert("P"), canvas(x[b]).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    got = digits_image.predict({"image": [buf.getvalue()]})
    assert got["labels"][0] == str(int(y[a]))


def test_exif_orientation_is_honoured(held_out, digits_image) -> None:
    x, _ = held_out
    upright = canvas(x[0]).convert("RGB")
    # Stored turned 90° clockwise, with the EXIF tag that tells viewers to turn it back
    # (Orientation 6 = "rotate 90° CW to display"), as phone cameras do.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    tagged = encode(stored, "PNG", exif=_orientation(6))
    want = digits_image.preprocess({"image": [encode(upright)]})["input"]
    got = digits_image.preprocess({"image": [tagged]})["input"]
    assert torch.equal(got, want)
    ignoring = ImagePreprocess.parse({**digits.IMAGE_PIPELINE["preprocess"],
                                      "exif_transpose": False})
    assert not torch.equal(ignoring([tagged]), want)
    # The same as a phone's JPEG, with Orientation 8 (turned the other way).
    jpeg = encode(upright.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95,
                  exif=_orientation(8))
    assert (digits_image.preprocess({"image": [jpeg]})["input"] - want).abs().max() < 1.0


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_wrong_image_inputs(digits_image) -> None:
    with pytest.raises(tb.InvalidInputError, match="missing input 'image'"):
        digits_image.preprocess({"input": [b"x"]})
    with pytest.raises(tb.InvalidInputError, match="must be BYTES"):
        digits_image.preprocess({"image": torch.zeros(1, 64)})
    # Between Pillow's warning (89.5 M pixels) and error (179 M) levels: refused as well (by
    # Pillow's warning made an error in the server process, else by max_pixels).
    with warnings.catch_warnings(), pytest.raises(
            tb.InvalidInputError, match="item 0 .*(decompression bomb|max_pixels)"):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        digits_image.preprocess({"image": [bomb_png(10_000, 10_000)]})


# -- ResNet-18 ---------------------------------------------------------------------------

def test_resnet18_state_dict_matches_torchvision() -> None:
    # torchvision 0.20.1's resnet18().state_dict(): names and shapes (tests/data, see there).
    want = (DATA / "torchvision_resnet18_keys.txt").read_text().splitlines()
    got = [f"{k} {list(v.shape)}" for k, v in resnet.ResNet18().state_dict().items()]
    assert got == want


def test_resnet18_random_weights_repeat_and_are_flagged() -> None:
    a, b = resnet.create_tensor(), resnet.create_tensor()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.tensorbridge_notice is not None and "random weights" in a.tensorbridge_notice
    a.load_state_dict(b.state_dict())
    assert a.random_weights is False and a.tensorbridge_notice is None


def test_imagenet_class_names() -> None:
    names = load_labels(resnet.LABELS)
    assert len(names) == 1000
    assert names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"


def test_resnet18_preprocessing_follows_torchvision() -> None:
    pre = ImagePreprocess.parse(resnet.PIPELINE["preprocess"])
    # A flat colour survives resize and crop, so each channel is exactly (c/255 - mean)/std.
    colour = (200, 120, 40)
    for size in ((640, 480), (300, 900), (100, 120)):
        image = Image.new("RGB", size, colour)
        t = pre([encode(image, "PNG")])
        assert t.shape == (1, 3, 224, 224) and t.dtype == torch.float32
        want = (torch.tensor(colour) / 255 - torch.tensor(resnet.MEAN)) / torch.tensor(resnet.STD)
        assert torch.allclose(t[0, :, 112, 112], want, atol=1e-5)
        assert torch.allclose(t[0].amin((1, 2)), t[0].amax((1, 2)), atol=1e-5)
    # Geometry: resize the shorter side to 256 (640x480 -> 341x256), then crop the centre
    # 224: a 2-pixel red column at x=320 of the original lands at 320*256/480 - 58 ~ 112.
    stripes = np.zeros((480, 640, 3), np.uint8)
    stripes[:, 319:321] = [255, 0, 0]
    t = pre([encode(Image.fromarray(stripes), "PNG")])
    red = t[0, 0, 112]
    assert int(red.argmax()) in (112, 113) and float(red[0]) < float(red.max())
    # Two images of different sizes stack: both come out 3x224x224.
    assert pre([photo(), photo(480, 640)]).shape == (2, 3, 224, 224)


def test_a_thin_strip_that_would_explode_when_resized_is_refused() -> None:
    # 1 x 200,000 pixels passes max_pixels, but "shorter side to 256" would make it
    # 256 x 51,200,000 before the crop: a few kB of PNG asking for ~39 GB.
    pre = ImagePreprocess.parse(resnet.PIPELINE["preprocess"])
    strip = encode(Image.new("RGB", (1, 200_000), (10, 20, 30)), "PNG")
    assert len(strip) < 100_000
    with pytest.raises(tb.InvalidInputError, match="aspect ratio"):
        pre([strip])


def torchvision_source(width: int, height: int) -> Image.Image:
    """The seeded image behind tests/data/torchvision_resnet_preprocess.json (lossless: PNG)."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (x * 3 + y) % 256], axis=2)
    rgb += rng.normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def test_resnet18_preprocessing_equals_torchvision_transforms() -> None:
    # Golden values from torchvision 0.20.1's Resize(256) / CenterCrop(224) / ToTensor /
    # Normalize on the same PIL image (the file says how they were made).
    golden = json.loads((DATA / "torchvision_resnet_preprocess.json").read_text())
    pre = ImagePreprocess.parse(resnet.PIPELINE["preprocess"])
    for case in golden["cases"]:
        t = pre([encode(torchvision_source(*case["size"]), "PNG")])[0]
        assert t.double().sum().item() == pytest.approx(case["sum"], abs=0.05)
        samples = t[:, ::16, ::16].reshape(-1)
        assert torch.allclose(samples, torch.tensor(case["samples"]), atol=2e-5)


def test_resnet18_served_with_random_and_real_weights(make_server, tmp_path, leak_check) -> None:
    # "Real" weights: a torchvision-keyed state_dict whose fc favours class 207.
    state = resnet.ResNet18().state_dict()
    state["fc.bias"] = torch.zeros(1000)
    state["fc.bias"][207] = 1000.0
    torch.save(state, tmp_path / "resnet18.pth")
    server = make_server(["resnet18=tensorbridge.models.resnet:create",
                          f"trained=tensorbridge.models.resnet:create@{tmp_path / 'resnet18.pth'}"])
    image = photo()
    with tb.Client(server.socket, timeout=30) as c:
        meta = {m["name"]: m for m in c.models()}["resnet18"]
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
            ("scores", [-1, 10]), ("indices", [-1, 10]), ("labels", [-1]), ("notice", [-1])]
        out = c.infer("resnet18", {"image": [image, image]})
        assert out["scores"].shape == (2, 10) and out["indices"].dtype == torch.int64
        assert len(out["labels"]) == 20 and out["notice"] == [resnet.RANDOM_NOTICE.encode()] * 2
        names = load_labels(resnet.LABELS)
        assert out["labels"][:10] == [names[i].encode() for i in out["indices"][0].tolist()]
        trained = c.infer("trained", {"image": [image]})
        assert "notice" not in trained
        assert trained["labels"][0] == b"golden retriever" and trained["scores"][0, 0] > 0.99


# -- bad images through the real server --------------------------------------------------

def test_bad_images_are_clear_errors_and_the_server_carries_on(make_server, held_out, tmp_path,
                                                               leak_check) -> None:
    (tmp_path / "tb.toml").write_text("""
[models.digits-image]
source = "tensorbridge.models.digits:create_image"
[models.digits-image.preprocess]
max_bytes = 20000
""")
    server = make_server([], extra=["--config", str(tmp_path / "tb.toml")])
    x, y = held_out
    good = encode(canvas(x[0]))
    jpeg = photo(160, 120)
    big = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3),
                                                                     dtype=np.uint8)), "PNG")
    assert len(big) > 20000
    cases = [
        ("truncated JPEG", jpeg[:len(jpeg) // 2], r"item 1: the JPEG file could not be decoded"
                                                   r".*truncated"),
        ("not an image", b"%PDF-1.4 not a picture", r"item 1 is not an image this model accepts"
                                                    r" \(JPEG, PNG, WEBP, GIF\)"),
        ("empty", b"", r"item 1 is empty \(0 bytes\)"),
        ("bomb 50,000 x 50,000", bomb_png(50_000, 50_000), r"item 1 .*decompression bomb"),
        # Pillow only warns at this size; the server makes that warning an error.
        ("bomb 10,000 x 10,000", bomb_png(10_000, 10_000), r"item 1 declares an image too "
                                                           r"large .*decompression bomb"),
        ("bomb 7,000 x 7,000", bomb_png(7_000, 7_000), r"item 1 is a PNG of 7,000 x 7,000"
                                                       r".*max_pixels"),
        ("over max_bytes", big, r"item 1 is [\d,]+ bytes, more than this model's limit of "
                                r"20,000 \(preprocess.max_bytes\)"),
        ("unsupported format", encode(canvas(x[0], block=4).convert("RGB"), "BMP"),
         r"item 1 is not an image this model accepts"),
    ]
    with tb.Client(server.socket, timeout=30) as c:
        for what, data, message in cases:
            with pytest.raises(tb.InvalidInputError, match=message):
                c.infer("digits-image", {"image": [good, data]})
            out = c.infer("digits-image", {"image": [good]})  # the next request works
            assert out["labels"][0] == str(int(y[0])).encode(), what
    assert server.proc is not None and server.proc.poll() is None
    assert not any("Traceback" in line or "Warning" in line for line in server.log)


def test_batch_of_images_is_preprocessed_item_by_item(held_out, digits_image) -> None:
    x, y = held_out
    files = [encode(canvas(x[i])) for i in range(5)]
    one_by_one = torch.cat([digits_image.preprocess({"image": [f]})["input"] for f in files])
    assert torch.equal(digits_image.preprocess({"image": files})["input"], one_by_one)
    assert digits_image.preprocess({"image": []})["input"].shape == (0, 64)
    with pytest.raises(tb.InvalidInputError, match="item 3"):
        digits_image.preprocess({"image": [*files[:3], b"junk", files[4]]})


def test_postprocess_is_row_wise(digits_image) -> None:
    logits = torch.randn(5, 10)
    whole = digits_image.postprocess({"logits": logits})
    for n in (0, 1, 5):
        part = digits_image.postprocess({"logits": logits[:n]})
        assert part["scores"].shape == (n, 3) and len(part["labels"]) == 3 * n
        assert torch.equal(part["indices"], whole["indices"][:n])
    post = Classify.parse({"softmax": False, "top_k": 20, "labels": ["a", "b", "c"]})
    out = post(torch.tensor([[0.1, 0.7, 0.2]]))
    assert out["labels"] == ["b", "c", "a"] and out["scores"].shape == (1, 3)  # k <= classes


# -- configuration -----------------------------------------------------------------------

def test_pipeline_config_errors_name_the_problem(tmp_path: Path) -> None:
    def load(**kw: object) -> tb.LoadedModel:
        return tb.load_model(tb.ModelConfig("d", "tensorbridge.models.digits:create", warmup=0,
                                            **kw))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model 'd': unknown preprocess keys \['size'\]"):
        load(preprocess={"size": 8})
    with pytest.raises(ValueError, match="unknown postprocess keys"):
        load(postprocess={"topk": 3})
    with pytest.raises(ValueError, match="labels has 3 names but .* 10 classes"):
        load(postprocess={"labels": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="mode must be 'RGB' or 'L'"):
        load(preprocess={"mode": "CMYK"})
    with pytest.raises(ValueError, match="mean needs 1 or 1 values"):
        load(preprocess={"mode": "L", "mean": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="either resize, or resize_shorter"):
        load(preprocess={"resize": 8, "center_crop": 8})
    with pytest.raises(ValueError, match="no such package resource"):
        load(postprocess={"labels": "tensorbridge.models:nope.txt"})
    with pytest.raises(ValueError, match="preprocess target = 'x': the module has no such"):
        load(preprocess={"target": "x"})
    with pytest.raises(PipelineConfigError, match="layout must be"):
        ImagePreprocess.parse({"layout": "NCHW"})
    with pytest.raises(PipelineConfigError, match="above Pillow's own limit"):
        ImagePreprocess.parse({"max_pixels": 10**9})


def test_toml_tables_configure_the_pipeline(tmp_path: Path, held_out) -> None:
    labels = tmp_path / "names.txt"
    labels.write_text("".join(f"digit {d}\n" for d in range(10)))
    (tmp_path / "tb.toml").write_text("""
[models.digits-image]
source = "tensorbridge.models.digits:create"
[models.digits-image.preprocess]
mode = "L"
invert = true
resize = [8, 8]
resample = "box"
scale = 0.0627451
layout = "flat"
[models.digits-image.postprocess]
top_k = 2
labels = "names.txt"
""")
    (config,) = tb.ServerConfig.from_toml(tmp_path / "tb.toml").models
    assert config.postprocess == {"top_k": 2, "labels": str(labels)}  # beside the TOML file
    model = tb.load_model(config)
    assert model.forward_signature.inputs[0].name == "input"  # type: ignore[index]
    assert model.metadata()["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    x, y = held_out
    out = model.predict({"image": [encode(canvas(x[1]))]})
    assert out["labels"][0] == f"digit {int(y[1])}" and out["scores"].shape == (1, 2)


def test_example_config_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "models.toml"
    config = tb.ServerConfig.from_toml(example)
    by_name = {m.name: m for m in config.models}
    assert {"digits", "digits-image", "resnet18"} <= set(by_name)
    model = tb.load_model(by_name["digits-image"])
    assert model.metadata()["outputs"][0]["shape"] == [-1, 3]
