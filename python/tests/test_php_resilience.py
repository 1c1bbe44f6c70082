"""PHP client resilience against real servers: set-up retries, the circuit breaker (also
across PHP-FPM web requests), and no silent re-send of a request that was in flight."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_fpm import fpm  # noqa: F401 - the php-fpm pool fixture

from conftest import PHP_DIR, php, php_popen
from fcgi import get

pytestmark = pytest.mark.usefixtures("leak_check")


def _wait_for(path: Path, proc) -> None:
    """Until the PHP driver has created ``path`` (it has reached that point of its calls)."""
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the PHP driver did not get there"
        time.sleep(0.01)


def test_no_server_setup_is_retried_then_connection_exception(tmp_path: Path) -> None:
    sock = str(tmp_path / "tb.sock")
    few, once = php({"socket": sock, "connect_attempts": 4, "connect_backoff": 0.005,
                     "calls": [{"op": "ping"}, {"op": "ping"}]})
    assert few["error"] == "ConnectionException"
    assert f"cannot connect to {sock}: No such file or directory (4 attempts" in few["message"]
    assert "Is `tensorbridge serve" in few["message"]
    assert once["error"] == "ConnectionException"
    (single,) = php({"socket": sock, "connect_attempts": 1, "calls": [{"op": "ping"}]})
    assert "attempts" not in single["message"]


def test_a_server_that_comes_up_during_the_back_off_is_reached(make_server,
                                                               tmp_path: Path) -> None:
    started = tmp_path / "calling"
    p = php_popen({"socket": str(tmp_path / "tb.sock"), "timeout": 30, "connect_attempts": 1000,
                   "connect_backoff": 0.05, "calls": [
                       {"op": "touch", "path": str(started)}, {"op": "ping"}]})
    _wait_for(started, p)
    # The server process starts only now, so the first attempts found no socket.
    server = make_server()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    _, pong = json.loads(out)
    assert pong.get("pong", {}).get("pid") == server.pid, pong
    assert pong["pong"]["connections_accepted"] == 1


def test_breaker_opens_fails_fast_without_connecting_then_one_probe_closes_it(
        make_server, tmp_path: Path) -> None:
    sock = tmp_path / "tb.sock"
    # The server is up from the start under another name; it is moved into place while the
    # breaker is open (rename keeps the listening socket), so only the breaker stops PHP.
    server = make_server(socket=str(tmp_path / "elsewhere.sock"))
    opened, go = tmp_path / "opened", tmp_path / "go"
    p = php_popen({"socket": str(sock), "connect_attempts": 1, "breaker_threshold": 3,
                   "breaker_cooldown": 2.5, "calls": [
                       {"op": "ping"}, {"op": "ping"}, {"op": "ping"},
                       {"op": "breaker"},
                       {"op": "touch", "path": str(opened)},
                       {"op": "wait_file", "path": str(go)},
                       {"op": "ping"},                    # fails fast: the server is not contacted
                       {"op": "sleep", "us": 2_700_000},  # past the cool-down
                       {"op": "breaker"},
                       {"op": "ping"},                    # the probe
                       {"op": "breaker"},
                       {"op": "ping"}]})
    _wait_for(opened, p)
    os.rename(server.socket, sock)
    go.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    r = json.loads(out)
    assert [x.get("error") for x in r[:3]] == ["ConnectionException"] * 3
    assert r[3]["state"] == "open"
    fast = r[6]
    assert fast["error"] == "CircuitOpenException", fast
    assert "after 3 consecutive connection failures or timeouts" in fast["message"]
    assert "then one call will probe the server" in fast["message"]
    assert r[8]["state"] == "half-open"
    # The probe was the first connection this server ever accepted: the fast failure above
    # did not touch the socket.
    assert r[9]["pong"]["connections_accepted"] == 1
    assert r[10]["state"] == "closed"
    assert r[11]["pong"]["connections_accepted"] == 1  # and the connection is kept
    assert not list((tmp_path / ".tb-breaker").iterdir())  # closed: no state file remains


def test_consecutive_timeouts_open_the_breaker_too(server) -> None:
    slow = {"op": "infer", "model": "sleep",
            "inputs": {"ms": {"dtype": "FP32", "values": [600.0]}}}
    first, second, fast, state = php({"socket": server.socket, "timeout": 0.2,
                                      "breaker_threshold": 2, "breaker_cooldown": 30,
                                      "calls": [slow, slow, {"op": "ping"}, {"op": "breaker"}]})
    assert first["error"] == second["error"] == "TimeoutException"
    assert first["deadline"] == second["deadline"] == "client"
    assert fast["error"] == "CircuitOpenException" and "timed out" in fast["message"]
    assert state["state"] == "open"


def test_request_in_flight_when_the_server_dies_is_not_resent(make_server,
                                                              tmp_path: Path) -> None:
    server = make_server()
    # A second server, ready to take over the socket path at once: a client that re-sent
    # the request (or reconnected on its own) would reach it.
    standby = make_server(socket=str(tmp_path / "standby.sock"))
    go = tmp_path / "go"
    p = php_popen({"socket": server.socket, "timeout": 10, "connect_attempts": 50,
                   "connect_backoff": 0.05, "calls": [
                       {"op": "infer", "model": "sleep",
                        "inputs": {"ms": {"dtype": "FP32", "values": [3000.0]}}, "print_now": True},
                       {"op": "wait_file", "path": str(go)},
                       {"op": "ping"}]})
    deadline = time.monotonic() + 10
    while server.memfds() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the PHP client has attached its region
    time.sleep(0.3)  # the INFER follows at once; the model then sleeps 3 s
    os.rename(standby.socket, server.socket)
    server.kill()
    assert p.stderr is not None
    first = json.loads(p.stderr.readline())
    assert first["error"] == "ConnectionException", first
    assert "while a request to model \"sleep\" was in flight" in first["message"]
    assert "It was not re-sent" in first["message"]
    # Nothing reached the standby server: this ping is its first connection.
    (check,) = php({"socket": server.socket, "calls": [{"op": "ping"}]})
    assert check["pong"]["pid"] == standby.pid and check["pong"]["connections_accepted"] == 1
    go.touch()
    out, _ = p.communicate(timeout=30)
    later = json.loads(out)[2]
    # The next call is a new request: it connects to the new server.
    assert later["pong"]["pid"] == standby.pid and later["pong"]["connections_accepted"] == 2


def test_breaker_state_survives_across_php_fpm_web_requests(fpm, tmp_path: Path) -> None:  # noqa: F811
    state = tmp_path / "breaker"
    query = f"socket={tmp_path / 'none.sock'}&threshold=2&cooldown=60&state={state}"
    pages = [json.loads(get(fpm, str(PHP_DIR / "breaker_page.php"), query)) for _ in range(4)]
    assert len({p["pid"] for p in pages}) == 1  # one FPM worker served every web request
    assert [p["error"] for p in pages] == ["ConnectionException", "ConnectionException",
                                           "CircuitOpenException", "CircuitOpenException"]
    assert [p["breaker"] for p in pages] == ["closed", "open", "open", "open"]
    assert "failing fast for" in pages[3]["message"]


@pytest.mark.parametrize("persistent", [False, True])
def test_a_connection_the_server_closed_while_idle_is_replaced_unseen(make_server, tmp_path: Path,
                                                                      persistent: bool) -> None:
    """The server closes a connection idle for idle_timeout; the client's next INFER finds it
    gone before a byte went out, so it sends on a new connection instead of failing."""
    server = make_server(extra=["--idle-timeout", "0.3"])
    go = tmp_path / "go"
    echo = {"op": "infer", "model": "echo", "inputs": {"x": {"dtype": "INT32", "values": [7]}}}
    driver = php_popen({"socket": server.socket, "persistent": persistent, "calls": [
        echo, {"op": "touch", "path": str(tmp_path / "first-done")},
        {"op": "wait_file", "path": str(go)}, echo, {"op": "ping"}]})
    deadline = time.monotonic() + 30
    while not (tmp_path / "first-done").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    while time.monotonic() < deadline:  # until the server has closed the driver's connection
        (pong,) = php({"socket": server.socket, "calls": [{"op": "ping"}]})
        if pong["pong"]["connections_open"] == 1:  # this ping's own connection only
            break
    else:
        pytest.fail("the server did not close the idle connection")
    go.touch()
    out, err = driver.communicate(timeout=60)
    first, _, _, second, ping = json.loads(out)
    assert first["outputs"]["x"]["values"] == [7]
    assert "error" not in second, second
    assert second["outputs"]["x"]["values"] == [7]
    assert ping["pong"]["server"] == "tensorbridge"
