"""PHP -> minilm end to end: ``$client->embed()`` and ``embedBatch()`` against a real server,
compared with sentence-transformers' own embeddings; bad texts fail alone, by item."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
import torch
from test_text import MINILM, SAME, TEXTS, _cosine, reference  # noqa: F401 - a fixture

from conftest import ROOT

AUTOLOAD = ROOT / "php" / "autoload.php"
pytestmark = pytest.mark.xdist_group("text")

SCRIPT = r"""<?php
declare(strict_types=1);
require $argv[1];
$job = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$client = new TensorBridge\Client($job['socket'], timeout: 60.0);
$texts = array_map('base64_decode', $job['texts']);
$short = static fn (Throwable $e): array => ['error' => (new ReflectionClass($e))->getShortName(),
    'message' => $e->getMessage()];
$batch = $client->embedBatch('minilm', $texts);
$out = ['batch' => array_map(static fn ($r) => $r->ok() ? $r->value() : $short($r->error()), $batch)];
try {
    $out['embed'] = $client->embed('minilm', $texts);
    $out['truncated'] = $client->lastTruncated();
} catch (TensorBridge\Exception\TensorBridgeException $e) {
    $out['embed'] = $short($e);
}
$out['raw'] = $client->embed('minilm', ['x' => $texts['english']], normalize: false);
echo json_encode($out, JSON_THROW_ON_ERROR);
"""


def test_embed_and_embed_batch_from_php(make_server, reference, tmp_path,  # noqa: F811
                                        leak_check) -> None:
    srv = make_server([MINILM])
    script = tmp_path / "embed.php"
    script.write_text(SCRIPT)
    texts = {name: base64.b64encode(t.encode()).decode() for name, t in TEXTS.items()}
    texts["bad"] = base64.b64encode(b"caf\xe9").decode()  # not UTF-8: fails alone in the batch
    good = {k: v for k, v in texts.items() if k != "bad"}

    def run(sent: dict) -> dict:
        done = subprocess.run(["php", str(script), str(AUTOLOAD)],
                              input=json.dumps({"socket": srv.socket, "texts": sent}),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    out = run(good)
    for name in TEXTS:
        vector = torch.tensor(out["embed"][name])
        assert vector.shape == (384,)
        assert _cosine(vector, reference[name]) >= SAME, name
        assert _cosine(torch.tensor(out["batch"][name]), reference[name]) >= SAME, name
    assert out["truncated"] == {name: name == "long" for name in TEXTS}
    raw = torch.tensor(out["raw"]["x"])
    assert raw.norm() > 1.5 and _cosine(raw, reference["english"]) >= SAME  # not normalised

    out = run(texts)
    # embedBatch: the bad text fails alone; embed() of all of them fails, naming the item
    assert out["batch"]["bad"]["error"] == "InvalidInputException"
    assert "not valid UTF-8" in out["batch"]["bad"]["message"]
    assert _cosine(torch.tensor(out["batch"]["cjk"]), reference["cjk"]) >= SAME
    assert out["embed"]["error"] == "InvalidInputException"
    assert f"item {list(texts).index('bad')} is not valid UTF-8" in out["embed"]["message"]
