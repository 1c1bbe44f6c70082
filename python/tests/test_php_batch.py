"""PHP inferBatch(): pipelined items on one connection, each with its own answer or its own error."""

from __future__ import annotations

import json
import time

import pytest

from conftest import php, php_popen

pytestmark = pytest.mark.usefixtures("leak_check")


def _by_key(batch: list[dict]) -> dict:
    return {str(item["key"]): item for item in batch}


def test_echo_batch_every_good_item_gets_its_own_answer(server) -> None:
    dtypes = ["INT8", "INT16", "INT32", "INT64", "FP32", "FP64", "UINT8"]
    inputs = {f"item{i}": {"x": {"dtype": dtypes[i % len(dtypes)],
                                 "values": [i * 3 + j for j in range(1 + i % 5)]},
                           "tag": {"dtype": "BYTES", "values": [f"tag-{i}"]}}
              for i in range(14)}
    bad = dict(inputs)
    bad["ragged"] = {"x": {"array": [[1.0, 2.0], [3.0]]}}  # fails in the client, not sent
    bad["scalar"] = "not an input array"
    (r,) = php({"socket": server.socket, "calls": [
        {"op": "infer_batch", "model": "echo", "inputs": bad}]})
    got = _by_key(r["batch"])
    assert [item["key"] for item in r["batch"]] == list(bad)  # same keys, same order
    for key, want in inputs.items():
        out = got[key]["value"]
        assert out["x"]["values"] == want["x"]["values"], key
        assert out["x"]["dtype"] == want["x"]["dtype"]
        assert bytes.fromhex(out["tag"]["hex"])[4:].decode() == want["tag"]["values"][0]
    assert got["ragged"]["error"] == "InvalidInputException" and "ragged" in got["ragged"]["message"]
    assert got["scalar"]["error"] == "InvalidInputException"
    assert set(r["timing"]) == {"queue_us", "compute_us", "preprocess_us", "batch_size", "version"}


def test_digits_batch_with_bad_items_keeps_the_good_answers_in_place(server) -> None:
    rows = [[float((i * 7 + j) % 17) for j in range(64)] for i in range(6)]
    items = {str(i): {"input": {"dtype": "FP32", "values": [row]}} for i, row in enumerate(rows)}
    items["2"] = {"input": {"dtype": "FP32", "values": [rows[2][:63]]}}  # wrong shape
    items["4"] = {"input": {"dtype": "FP64", "values": [rows[4]]}}  # wrong type
    singles = [{"op": "infer", "model": "digits", "inputs": {"input": {"dtype": "FP32",
                                                                       "values": [row]}}}
               for row in rows]
    *single, (batch) = php({"socket": server.socket, "calls": [
        *singles, {"op": "infer_batch", "model": "digits", "inputs": items}]})
    got = _by_key(batch["batch"])
    assert got["2"]["error"] == "InvalidInputException" and "shape" in got["2"]["message"]
    assert got["4"]["error"] == "InvalidInputException" and "FP32" in got["4"]["message"]
    for i in (0, 1, 3, 5):
        assert got[str(i)]["value"]["logits"]["values"] == single[i]["outputs"]["logits"]["values"]
    # the rows really differ, so a mix-up would show
    assert len({json.dumps(s["outputs"]["logits"]["values"]) for s in single}) == len(rows)


def test_model_errors_and_unknown_models_are_per_item(server) -> None:
    (fail, missing) = php({"socket": server.socket, "calls": [
        {"op": "infer_batch", "model": "fail", "inputs": [{"x": {"dtype": "INT8", "values": [1]}},
                                                          {"x": {"dtype": "INT8", "values": [2]}}]},
        {"op": "infer_batch", "model": "nope", "inputs": [{"x": {"dtype": "INT8", "values": [1]}}]},
    ]})
    assert [i["error"] for i in fail["batch"]] == ["ModelException"] * 2
    assert "always fails" in fail["batch"][1]["message"]
    assert missing["batch"][0]["error"] == "ModelNotFoundException"


def test_server_killed_mid_batch_fails_only_the_unanswered_items(make_server) -> None:
    server = make_server()
    sleep = [{"ms": {"dtype": "FP32", "values": [ms]}} for ms in (1.0, 3000.0, 1.0)]
    p = php_popen({"socket": server.socket, "timeout": 10, "calls": [
        {"op": "infer_batch", "model": "sleep", "inputs": sleep}]})
    deadline = time.monotonic() + 10
    while server.memfds() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the PHP client has attached its region
    time.sleep(0.3)  # the batch is sent right after; its second item sleeps 3 s
    server.kill()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    (r,) = json.loads(out)
    first, second, third = r["batch"]
    assert first["value"]["ms"]["values"] == [1.0]
    for item in (second, third):
        assert item["error"] == "ConnectionException", item
        assert "was sent but not answered" in item["message"]
        assert "not re-sent" in item["message"]


ROWS_CONFIG = ('[models.rows]\nsource = "tensorbridge.models.testing:rows"\n'
               'max_batch_size = 32\nmax_queue_delay_us = 2000\n')


def _rows(worker: int, item: int, fail: bool = False) -> list[list[float]]:
    """1-3 rows unique to (worker, item); a negative first column makes the model raise."""
    first = -1.0 if fail else float(worker)
    return [[first, float(item), float(r), float(worker * 100 + item)]
            for r in range(1 + (worker + item) % 3)]


def test_batches_of_several_php_processes_merged_by_the_server_stay_apart(make_server,
                                                                         tmp_path) -> None:
    (tmp_path / "rows.toml").write_text(ROWS_CONFIG)
    server = make_server(models=[], extra=["--config", str(tmp_path / "rows.toml")])
    procs = [php_popen({"socket": server.socket, "timeout": 30, "calls": [
        {"op": "infer_batch", "model": "rows", "inputs": [
            {"x": {"dtype": "FP32", "values": _rows(w, i)}} for i in range(6)]}]})
        for w in range(8)]
    merged = 0
    for w, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        (r,) = json.loads(out)
        for i, item in enumerate(r["batch"]):
            want = [[2 * v + 1 for v in row] for row in _rows(w, i)]
            assert item["value"]["y"]["values"] == want, (w, i)
            merged = max(merged, item["value"]["rows"]["values"][0] - len(want))
    assert merged > 0  # some model calls computed the rows of several items


def test_a_failing_item_in_a_merged_model_call_fails_alone(make_server, tmp_path) -> None:
    (tmp_path / "rows.toml").write_text(ROWS_CONFIG)
    server = make_server(models=[], extra=["--config", str(tmp_path / "rows.toml")])
    (r,) = php({"socket": server.socket, "timeout": 30, "calls": [
        {"op": "infer_batch", "model": "rows", "inputs": [
            {"x": {"dtype": "FP32", "values": _rows(1, i, fail=i == 3)}} for i in range(6)]}]})
    for i, item in enumerate(r["batch"]):
        if i == 3:
            assert item["error"] == "ModelException" and "negative" in item["message"]
        else:
            assert item["value"]["y"]["values"] == [[2 * v + 1 for v in row]
                                                    for row in _rows(1, i)], i


def test_an_item_larger_than_the_region_cap_fails_alone(make_server) -> None:
    srv = make_server(models=["echo=tensorbridge.models.testing:echo"],
                      extra=["--region-cap-mb", "1"])
    small = {"x": {"dtype": "FP32", "values": [1.0, 2.0, 3.0]}}
    huge = {"x": {"dtype": "FP32", "values": [0.5] * 300_000}}  # 1.2 MB > the 1 MiB cap
    (r,) = php({"socket": srv.socket, "calls": [{"op": "infer_batch", "model": "echo",
                                                  "inputs": {"a": small, "b": huge, "c": small,
                                                             "d": small}}]})
    got = _by_key(r["batch"])
    assert got["b"]["error"] == "PayloadTooLargeException"
    for key in ("a", "c", "d"):  # before and after the oversized item
        assert got[key]["value"]["x"]["values"] == [1.0, 2.0, 3.0], got[key]
