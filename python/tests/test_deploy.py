"""deploy/: the systemd unit, the Supervisor program (run for real: it restarts a killed
server), the Prometheus rules (promtool), the Grafana dashboard. Settings: test_config.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tensorbridge as tb
from tensorbridge._metrics import METRIC_NAMES, Metrics

from conftest import ROOT

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "tensorbridge.service"
SUPERVISOR = DEPLOY / "supervisor" / "tensorbridge.conf"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "tensorbridge.json"
SAMPLE_TOML = DEPLOY / "tensorbridge.toml"


def _ini(path: Path) -> dict[str, str]:
    """key=value lines of a unit / supervisor file (comments dropped)."""
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this interpreter.
    text = UNIT.read_text().replace("/usr/local/bin/tensorbridge",
                                    f"{sys.executable} -m tensorbridge")
    unit = tmp_path / "tensorbridge.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tensorbridge.service" not in proc.stdout + proc.stderr  # no warning about it
    keys = _ini(UNIT)
    assert keys["Restart"] == "always" and keys["KillSignal"] == "SIGTERM"
    # READY=1 after warm-up, WATCHDOG=1 from the loop's heartbeat (tests: test_faults.py).
    assert keys["Type"] == "notify" and int(keys["WatchdogSec"]) >= 5
    assert keys["RuntimeDirectory"] == "tensorbridge"


def _supervisor_copy(tmp_path: Path, command: str, socket: str = "/tmp/none.sock",
                     failures: int = 3) -> Path:
    """The shipped program and watchdog sections, runnable here: our user, temp logs,
    ``command`` for the server, and the watchdog listener pointed at ``socket``."""
    import pwd

    program, _, listener = SUPERVISOR.read_text().partition("[eventlistener:")
    program = re.sub(r"(?m)^command=.*$", f"command={command}", program)
    program = re.sub(r"(?m)^stdout_logfile=.*$", f"stdout_logfile={tmp_path}/tb.log", program)
    listener = re.sub(r"(?m)^command=.*$", f"command={sys.executable} -m tensorbridge watchdog "
                      f"--socket {socket} --failures {failures} --timeout 1", listener)
    listener = re.sub(r"(?m)^stderr_logfile=.*$", f"stderr_logfile={tmp_path}/watchdog.log",
                      listener)
    text = re.sub(r"(?m)^user=.*$", f"user={pwd.getpwuid(os.getuid()).pw_name}",
                  program + "[eventlistener:" + listener)
    path = tmp_path / "tensorbridge.conf"
    path.write_text(text)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[supervisord]\nlogfile={tmp_path}/supervisord.log\n"
                    f"pidfile={tmp_path}/supervisord.pid\nnodaemon=true\n"
                    f"[include]\nfiles={path}\n")
    return conf


def test_supervisor_program_parses(tmp_path: Path) -> None:
    from supervisor.options import ServerOptions

    conf = _supervisor_copy(tmp_path, "/usr/local/bin/tensorbridge serve")
    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    groups = {g.name: g for g in opts.process_group_configs}
    (program,) = groups["tensorbridge"].process_configs
    assert program.name == "tensorbridge"
    (listener,) = groups["tensorbridge-watchdog"].process_configs
    assert "watchdog" in listener.command and listener.autorestart is not False
    from supervisor.datatypes import RestartUnconditionally

    assert program.autostart and program.autorestart is RestartUnconditionally
    assert program.stopsignal == signal.SIGTERM and program.stopwaitsecs >= 15
    assert program.killasgroup and program.stopasgroup


def _pid_when_healthy(socket: str, not_pid: int | None, limit: float = 60) -> int:
    """Wait (bounded) for a server on ``socket`` whose pid is not ``not_pid``."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with tb.Client(socket, timeout=1.0) as client:
                pid = client.ping()["pid"]
            if pid != not_pid:
                return pid
        except tb.TensorBridgeError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no server came up on {socket}")


def test_supervisor_restarts_a_killed_server(tmp_path: Path, leak_check: None) -> None:
    """The shipped Supervisor program brings a SIGKILLed server back; stop drains it."""
    sock = str(tmp_path / "tb.sock")
    command = (f"{sys.executable} -m tensorbridge serve --socket {sock} --threads 1 "
               "--model echo=tensorbridge.models.testing:echo --warmup 0")
    conf = _supervisor_copy(tmp_path, command)
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = _pid_when_healthy(sock, None)
        os.kill(first, signal.SIGKILL)
        second = _pid_when_healthy(sock, first)
        with tb.Client(sock) as client:
            assert client.infer("echo", {"x": [1, 2, 3]})["x"].tolist() == [1, 2, 3]
    finally:
        daemon.send_signal(signal.SIGTERM)  # supervisord stops its program with SIGTERM
        daemon.wait(60)
    assert second != first
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
    assert not os.path.exists(sock)  # a clean stop removes the socket file
    log = (tmp_path / "tb.log").read_text()
    assert log.count("ready on") == 2, log


def _promtool() -> str | None:
    return shutil.which("promtool")


@pytest.mark.skipif(_promtool() is None, reason="promtool missing (Debian package prometheus)")
def test_alert_rules_pass_promtool() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                           text=True)
    assert check.returncode == 0 and "SUCCESS: 4 rules found" in check.stdout + check.stderr, \
        check.stdout + check.stderr
    # The unit tests fire each alert at the seed's thresholds and not below them.
    unit = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"],
                          cwd=ALERTS.parent, capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_alert_thresholds_are_the_seeds() -> None:
    text = ALERTS.read_text()
    assert "tensorbridge_shm_usage_ratio > 0.85" in text
    assert re.search(r"histogram_quantile\(0\.99,.*tensorbridge_request_duration_seconds_bucket"
                     r".*\)\) > 0\.05", text.replace("\n", " "))
    assert "tensorbridge_instances_alive < tensorbridge_instances_configured" in text


def _exposed_names() -> set[str]:
    """Metric families a server with every kind of sample exposes."""
    m = Metrics(1 << 30)
    m.model_loaded("m", 0.5, 2)
    m.request_done("m", "ok", queue_s=0.001, preprocess_s=0.0001, compute_s=0.002,
                   total_s=0.004)
    m.error("invalid_input", "m")
    m.batch("m", 4)
    names = set()
    for line in m.text().decode().splitlines():
        if line.startswith("# TYPE tensorbridge_"):
            names.add(line.split()[2])
    return names


def test_metric_names_in_alerts_and_dashboard_exist() -> None:
    assert _exposed_names() == METRIC_NAMES
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    used = set()
    for text in [*exprs, ALERTS.read_text()]:
        for name in re.findall(r"tensorbridge_[a-z_]+", text):
            used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used <= METRIC_NAMES, used - METRIC_NAMES
    # Every metric of the issue is on the dashboard.
    assert METRIC_NAMES - {"tensorbridge_shm_cap_bytes"} <= used | {
        "tensorbridge_shm_cap_bytes"}, METRIC_NAMES - used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
