"""The HTTP baselines: the same models behind FastAPI on uvicorn, tuned fairly.

* ``POST /json/{model}``   KServe-v2-style JSON (stdlib ``json``)
* ``POST /orjson/{model}`` the same with orjson
* ``POST /binary/{model}`` raw little-endian FP32 body (``X-Shape: 1,3,224,224``), raw FP32 back
* ``POST /jpeg/{model}``   a JPEG file; Pillow preprocessing on the server; top-5 JSON back

Run: ``python bench/http_app.py --port 8781 --threads 1``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import orjson
import torch
import uvicorn
import vision
from fastapi import FastAPI, Request, Response

from tensorbridge.models import testing

MODELS = {"echo": testing.echo(), "head": testing.head(), "resnet": vision.resnet18()}
DEVICE = torch.device("cpu")
app = FastAPI()


def _run(model: str, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        t = torch.from_numpy(x).to(DEVICE)
        out = MODELS[model]({"x": t})["x"] if model == "echo" else MODELS[model](t)
        if isinstance(out, tuple):  # resnet: (top-5 index, top-5 prob); send the probabilities
            out = out[1]
        return out.cpu().numpy()


def _from_json(body: dict) -> np.ndarray:
    spec = body["inputs"][0]
    return np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])


def _to_json(model: str, y: np.ndarray) -> dict:
    return {"model_name": model, "outputs": [
        {"name": "output", "datatype": "FP32", "shape": list(y.shape),
         "data": y.reshape(-1).tolist()}]}


@app.post("/json/{model}")
async def infer_json(model: str, request: Request) -> Response:
    y = _run(model, _from_json(json.loads(await request.body())))
    return Response(json.dumps(_to_json(model, y)), media_type="application/json")


@app.post("/orjson/{model}")
async def infer_orjson(model: str, request: Request) -> Response:
    y = _run(model, _from_json(orjson.loads(await request.body())))
    return Response(orjson.dumps(_to_json(model, y), option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


@app.post("/binary/{model}")
async def infer_binary(model: str, request: Request) -> Response:
    shape = [int(d) for d in request.headers["x-shape"].split(",")]
    x = np.frombuffer(await request.body(), dtype=np.float32).reshape(shape)
    y = np.ascontiguousarray(_run(model, x))
    return Response(y.tobytes(), media_type="application/octet-stream",
                    headers={"x-shape": ",".join(map(str, y.shape))})


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


@app.post("/jpeg/{model}")
async def infer_jpeg(model: str, request: Request) -> Response:
    """The strongest HTTP variant of the seed's scenario: the JPEG itself, Pillow on the server."""
    with torch.inference_mode():
        index, prob = MODELS[model](vision.preprocess(await request.body()).to(DEVICE))
    return Response(json.dumps({"top5": [{"class": int(i), "p": float(p)} for i, p in
                                         zip(index[0].tolist(), prob[0].tolist(), strict=True)]}),
                    media_type="application/json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8781)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    DEVICE = torch.device(args.device)
    MODELS = {k: m.to(DEVICE) for k, m in MODELS.items()}
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning",
                http="httptools", loop="uvloop" if _has_uvloop() else "asyncio")
