"""PHP -> a versioned model repository: pinned versions, A/B routing keys, the version that
answered (lastTiming), the versions models() lists; real server, real PHP processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from repo_fixtures import LINEAR_CONFIG, write_config, write_version

from conftest import ServerProcess, php

# One server for the module (no test here reloads, unloads or stops it), on one xdist worker:
# each server start costs ~2 s of CPU importing torch.
pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.xdist_group("php_versions")]

ECHO = ["echo=tensorbridge.models.testing:echo"]
#: version -> (a, b) of y = a * x + b
LINES = {1: (2.0, 1.0), 2: (3.0, 0.0)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp_path = tmp_path_factory.mktemp("versions")
    repo = tmp_path / "repo"
    write_config(repo, "linear", LINEAR_CONFIG + 'version_policy = "all"\n'
                 '[routing]\nsplit = { "1" = 50, "2" = 50 }\n')
    for version, (a, b) in LINES.items():
        write_version(repo, "linear", version, a, b)
    args = [a for m in ECHO for a in ("--model", m)] + ["--repository", str(repo)]
    srv = ServerProcess(str(tmp_path / "tb.sock"), args).start()
    yield srv
    srv.stop()


def call(x: float, **route) -> dict:
    return {"op": "infer", "model": "linear",
            "inputs": {"x": {"dtype": "FP32", "values": [[x]]}}, **route}


def line_of(result: dict, x: float) -> int:
    """Which version's line the answer lies on; it must also be the version lastTiming names."""
    assert "error" not in result, result
    y = result["outputs"]["y"]["values"][0][0]
    (version,) = [v for v, (a, b) in LINES.items() if a * x + b == y]
    assert result["timing"]["version"] == version
    return version


def test_pinned_versions_answer_and_say_so(server) -> None:
    one, two, missing = php({"socket": server.socket, "calls": [
        call(5.0, version=1), call(5.0, version=2), call(5.0, version=7)]})
    assert line_of(one, 5.0) == 1 and line_of(two, 5.0) == 2
    assert missing["error"] == "ModelNotFoundException"
    assert "no version 7; versions: [1, 2]" in missing["message"]


def test_one_routing_key_always_reaches_one_version_and_keys_spread(server) -> None:
    keys = [f"user-{i}" for i in range(12)]
    calls = [call(float(i + 2), routing_key=key) for i, key in enumerate(keys) for _ in range(5)]
    results = php({"socket": server.socket, "calls": calls})
    seen: dict[str, set[int]] = {}
    for i, (c, r) in enumerate(zip(calls, results, strict=True)):
        seen.setdefault(c["routing_key"], set()).add(line_of(r, float(i // 5 + 2)))
    assert all(len(v) == 1 for v in seen.values()), seen  # sticky per key
    # the key -> version hash is fixed (the same in every process), so this never flickers
    assert {v for (v,) in seen.values()} == {1, 2}


def test_bad_route_is_refused_before_sending(server) -> None:
    zero, empty = php({"socket": server.socket, "calls": [
        call(1.0, version=0), call(1.0, routing_key="")]})
    assert zero["error"] == empty["error"] == "InvalidInputException"
    assert "version must be" in zero["message"] and "routingKey must be" in empty["message"]


def test_batch_with_a_pinned_version(server) -> None:
    (r,) = php({"socket": server.socket, "calls": [{
        "op": "infer_batch", "model": "linear", "version": 2,
        "inputs": {str(x): {"x": {"dtype": "FP32", "values": [[float(x)]]}} for x in range(4)}}]})
    assert [i["value"]["y"]["values"] for i in r["batch"]] == [[[3.0 * x]] for x in range(4)]
    assert r["timing"]["version"] == 2


def test_models_lists_versions_and_states(server) -> None:
    (r,) = php({"socket": server.socket, "calls": [{"op": "models"}]})
    (linear,) = [m for m in r["models"] if m["name"] == "linear"]
    assert linear["versions"] == [{"version": 2, "state": "ready"},
                                  {"version": 1, "state": "ready"}]
