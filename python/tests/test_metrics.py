"""Metrics (``_metrics``) and JSON logs (``_logging``): the classes on their own, then a real
server scraped over HTTP while Python and PHP clients call it."""

from __future__ import annotations

import io
import json
import logging
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tensorbridge as tb
from tensorbridge._logging import JsonFormatter, configure_logging
from tensorbridge._metrics import BATCH_BUCKETS, LATENCY_BUCKETS, OTHER_MODEL, Metrics

from conftest import php


def samples(text: bytes | str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of an exposition text."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_answered_counts_and_observes_every_stage() -> None:
    m = Metrics(1 << 20)
    m.model_loaded("digits", 1.25, 2)
    m.answered("digits", 1, "ok", 0.0002, 0.00005, 0.003, 0.004)
    m.answered("digits", 1, "invalid_input", 0, 0, 0, 0.0001)
    s = samples(m.text())
    assert value(s, "tensorbridge_requests_total", model="digits", status="ok") == 1
    assert value(s, "tensorbridge_requests_total", model="digits", status="invalid_input") == 1
    assert value(s, "tensorbridge_model_version_requests_total", model="digits", version="1",
                 status="ok") == 1
    for stage in ("queue_wait", "preprocess", "compute", "request_duration"):
        assert value(s, f"tensorbridge_{stage}_seconds_count", model="digits") == 2
    # 3 ms of compute lands in the 5 ms bucket, not in the 2.5 ms one.
    assert value(s, "tensorbridge_compute_seconds_bucket", model="digits", le="0.0025") == 1
    assert value(s, "tensorbridge_compute_seconds_bucket", model="digits", le="0.005") == 2
    assert value(s, "tensorbridge_model_load_seconds", model="digits") == 1.25
    assert value(s, "tensorbridge_instances_configured", model="digits") == 2
    assert value(s, "tensorbridge_instances_alive", model="digits") == 2
    m.instances_alive("digits", 1)
    assert value(samples(m.text()), "tensorbridge_instances_alive", model="digits") == 1


def test_buckets_span_a_tenth_of_a_millisecond_to_five_seconds() -> None:
    assert LATENCY_BUCKETS[0] == 0.0001 and LATENCY_BUCKETS[-1] == 5.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    m = Metrics(1)
    m.model_loaded("b", 0, 1)
    m.batch("b", 3)
    m.batch("b", 64)
    s = samples(m.text())
    les = sorted(float(dict(k[1])["le"]) for k in s if k[0] == "tensorbridge_batch_size_bucket")
    assert les[:-1] == list(BATCH_BUCKETS) and les[-1] == float("inf")
    assert value(s, "tensorbridge_batch_size_bucket", model="b", le="2.0") == 0
    assert value(s, "tensorbridge_batch_size_bucket", model="b", le="4.0") == 1
    assert value(s, "tensorbridge_batch_size_sum", model="b") == 67


def test_client_chosen_model_names_do_not_create_series() -> None:
    """A fuzzer sending random model names must not grow the registry without bound."""
    m = Metrics(1)
    m.model_loaded("echo", 0, 1)
    for i in range(500):
        m.error("model_not_found", f"random-{i}")
        m.answered(f"random-{i}", 1, "model_not_found", 0, 0, 0, 0)
    s = samples(m.text())
    assert value(s, "tensorbridge_errors_total", code="model_not_found",
                 model=OTHER_MODEL) == 500
    assert value(s, "tensorbridge_requests_total", model=OTHER_MODEL,
                 status="model_not_found") == 500
    assert not any("random" in str(k) for k in s)
    m.error("PROTOCOL_ERROR")  # code names are lower-cased; no model -> empty label
    assert value(samples(m.text()), "tensorbridge_errors_total", code="protocol_error",
                 model="") == 1


def test_gauges_and_shm_ratio() -> None:
    m = Metrics(1000)
    m.shm_mapped(900)
    m.connections(2)
    for _ in range(3):
        m.received()
    m.answered_one()
    s = samples(m.text())
    assert value(s, "tensorbridge_shm_mapped_bytes") == 900
    assert value(s, "tensorbridge_shm_cap_bytes") == 1000
    assert value(s, "tensorbridge_shm_usage_ratio") == pytest.approx(0.9)
    assert value(s, "tensorbridge_connections_open") == 2
    assert value(s, "tensorbridge_in_flight_requests") == 2
    m.shm_mapped(-900)
    assert value(samples(m.text()), "tensorbridge_shm_usage_ratio") == 0
    # Each Metrics has its own registry: a second server starts from zero.
    assert value(samples(Metrics(1000).text()), "tensorbridge_connections_open") == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(response.read())


def test_start_http_serves_metrics_and_stops() -> None:
    m = Metrics(1)
    port = _free_port()
    m.start_http("127.0.0.1", port)
    try:
        m.connections(1)
        assert value(_scrape(port), "tensorbridge_connections_open") == 1
    finally:
        m.stop_http()
    with pytest.raises(OSError):
        _scrape(port)


def test_json_formatter_one_object_per_line_with_extras() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tensorbridge.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("slow request: %s", "digits",
                       extra={"model": "digits", "rid": 7, "queue_ms": 1.5, "total_ms": 60.0,
                              "path": object()})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "warning" and first["logger"] == "tensorbridge.test-json"
    assert first["msg"] == "slow request: digits"
    assert (first["model"], first["rid"], first["queue_ms"], first["total_ms"]) == (
        "digits", 7, 1.5, 60.0)
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert first["path"].startswith("<object")  # not serialisable: kept as text
    assert "ValueError: boom" in second["exc"] and second["level"] == "error"


def test_configure_logging_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="xml"):
        configure_logging("info", "xml")


def test_warnings_and_thread_crashes_become_json_lines() -> None:
    import threading
    import warnings

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, threading.excepthook)
    try:
        handler = configure_logging("info", "json", stream)
        with warnings.catch_warnings():  # the suite turns warnings into errors
            warnings.simplefilter("always")
            warnings.warn("old API", DeprecationWarning, stacklevel=1)

        def crash() -> None:
            raise RuntimeError("worker died")

        t = threading.Thread(target=crash, name="tb-test")
        t.start()
        t.join()
        assert handler.flush_for(10)  # the lines are written by the log writer thread
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        threading.excepthook = saved[2]
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any("old API" in e["msg"] and e["logger"] == "py.warnings" for e in entries)
    (crash_entry,) = [e for e in entries if e["level"] == "critical"]
    assert crash_entry["msg"] == "thread tb-test crashed"
    assert "RuntimeError: worker died" in crash_entry["exc"]


# -- a real server ----------------------------------------------------------------------------


def test_server_metrics_over_http(make_server, leak_check: None) -> None:
    port = _free_port()
    models = ["echo=tensorbridge.models.testing:echo", "fail=tensorbridge.models.testing:fail",
              "sleep=tensorbridge.models.testing:sleep"]
    srv = make_server(models, ["--metrics-port", str(port), "--shm-cap-mb", "64"])
    before = _scrape(port)
    assert value(before, "tensorbridge_instances_alive", model="echo") == 1
    assert value(before, "tensorbridge_instances_configured", model="echo") == 1
    assert ("tensorbridge_model_load_seconds", frozenset({("model", "echo")})) in before
    assert value(before, "tensorbridge_shm_cap_bytes") == 64 << 20
    assert value(before, "process_open_fds") > 0

    with tb.Client(srv.socket) as client:
        for i in range(3):
            assert client.infer("echo", {"x": [i]})["x"].tolist() == [i]
        with pytest.raises(tb.ModelError):
            client.infer("fail", {"x": [1]})
        with pytest.raises(tb.InvalidInputError):
            client.infer("sleep", {"wrong": [1.0]})
        with pytest.raises(tb.ModelNotFoundError):
            client.infer("no-such-model", {"x": [1]})
        during = _scrape(port)
    (result,) = php({"socket": srv.socket, "calls": [
        {"op": "infer", "model": "echo", "inputs": {"x": {"dtype": "INT32", "values": [5]}}}]})
    assert result["outputs"]["x"]["values"] == [5]
    after = _scrape(port)

    # While the Python client was connected: one connection and its region mapped.
    assert value(during, "tensorbridge_connections_open") == 1
    assert value(during, "tensorbridge_shm_mapped_bytes") >= 1 << 20
    assert value(during, "tensorbridge_shm_usage_ratio") == pytest.approx(
        value(during, "tensorbridge_shm_mapped_bytes") / (64 << 20))
    assert value(during, "tensorbridge_in_flight_requests") == 0
    assert value(after, "tensorbridge_requests_total", model="echo", status="ok") == 4
    assert value(after, "tensorbridge_request_duration_seconds_count", model="echo") == 4
    assert value(after, "tensorbridge_compute_seconds_count", model="echo") == 4
    assert value(after, "tensorbridge_requests_total", model="fail", status="model_error") == 1
    assert value(after, "tensorbridge_errors_total", code="model_error", model="fail") == 1
    assert value(after, "tensorbridge_errors_total", code="invalid_input", model="sleep") == 1
    assert sum(v for (name, labels), v in after.items()
               if name == "tensorbridge_errors_total"
               and ("code", "model_not_found") in labels) == 1
    assert not any("no-such-model" in str(k) for k in after)
    # Both clients are gone: no connection, no region.
    assert value(after, "tensorbridge_connections_open") == 0
    assert value(after, "tensorbridge_shm_mapped_bytes") == 0


def test_json_logs_and_slow_request_warning(make_server) -> None:
    srv = make_server(["sleep=tensorbridge.models.testing:sleep"],
                      ["--log-format", "json", "--slow-ms", "5"])
    with tb.Client(srv.socket) as client:
        client.infer("sleep", {"ms": [20.0]})
        client.infer("sleep", {"ms": [0.0]})
    srv.stop()
    entries = [json.loads(line) for line in srv.log]  # every line is one JSON object
    assert any(e["msg"].endswith(f"ready on {srv.socket}") for e in entries)
    slow = [e for e in entries if e["level"] == "warning" and e["msg"].startswith("slow")]
    assert len(slow) == 1, entries
    (entry,) = slow
    assert entry["model"] == "sleep" and isinstance(entry["rid"], int)
    assert entry["total_ms"] >= 20 and entry["queue_ms"] <= entry["total_ms"]
