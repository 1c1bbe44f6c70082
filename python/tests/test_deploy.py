"""deploy/: the systemd unit, the Supervisor program (run for real: it restarts a killed
server), the Prometheus rules (promtool), the Grafana dashboard, the sample TOML; and the CLI's
flags / TENSORBRIDGE_* twins / TOML keys for the operations settings."""

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
from tensorbridge._cli import build_parser, server_config
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
    assert keys["RuntimeDirectory"] == "tensorbridge"


def _supervisor_copy(tmp_path: Path, command: str) -> Path:
    """The shipped program section, runnable here: our user, a temp log, ``command``."""
    import pwd

    text = SUPERVISOR.read_text()
    text = re.sub(r"(?m)^command=.*$", f"command={command}", text)
    text = re.sub(r"(?m)^user=.*$", f"user={pwd.getpwuid(os.getuid()).pw_name}", text)
    text = re.sub(r"(?m)^stdout_logfile=.*$", f"stdout_logfile={tmp_path}/tb.log", text)
    program = tmp_path / "tensorbridge.conf"
    program.write_text(text)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[supervisord]\nlogfile={tmp_path}/supervisord.log\n"
                    f"pidfile={tmp_path}/supervisord.pid\nnodaemon=true\n"
                    f"[include]\nfiles={program}\n")
    return conf


def test_supervisor_program_parses(tmp_path: Path) -> None:
    from supervisor.options import ServerOptions

    conf = _supervisor_copy(tmp_path, "/usr/local/bin/tensorbridge serve")
    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    (group,) = opts.process_group_configs
    (program,) = group.process_configs
    assert program.name == "tensorbridge"
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


def test_sample_toml_loads() -> None:
    config = tb.ServerConfig.from_toml(SAMPLE_TOML)
    assert config.socket == "/run/tensorbridge/tensorbridge.sock"
    assert config.socket_mode == 0o660 and config.socket_group == "www-data"
    assert config.shm_cap == 2048 << 20 and config.metrics_port == 9464
    assert config.log_format == "json" and config.allow_gid == [33]
    (model,) = config.models
    assert model.name == "digits" and model.watchdog_timeout == 5.0


def _config(argv: list[str], env: dict[str, str] | None = None) -> tb.ServerConfig:
    return server_config(build_parser().parse_args(["serve", *argv]), env or {})


def test_every_operations_setting_has_flag_env_and_toml_key(tmp_path: Path) -> None:
    toml = tmp_path / "tb.toml"
    toml.write_text("[server]\nshm_cap_mb = 100\nsocket_owner = 'root'\nsocket_group = '0'\n"
                    "socket_mode = 0o600\nallow_gid = [5, 6]\ndrain_timeout = 3\n"
                    "metrics_port = 9100\nmetrics_host = '0.0.0.0'\nlog_format = 'json'\n"
                    "io_threads = 6\n")
    from_file = _config(["--config", str(toml)])
    assert (from_file.shm_cap, from_file.socket_owner, from_file.socket_group,
            from_file.socket_mode, from_file.allow_gid, from_file.drain_timeout,
            from_file.metrics_port, from_file.metrics_host, from_file.log_format,
            from_file.io_threads) == (100 << 20, "root", "0", 0o600, [5, 6], 3.0, 9100,
                                      "0.0.0.0", "json", 6)
    env = {"TENSORBRIDGE_SHM_CAP_MB": "200", "TENSORBRIDGE_SOCKET_MODE": "640",
           "TENSORBRIDGE_ALLOW_GID": "7,8", "TENSORBRIDGE_METRICS_PORT": "9200",
           "TENSORBRIDGE_LOG_FORMAT": "text", "TENSORBRIDGE_IO_THREADS": "3",
           "TENSORBRIDGE_DRAIN_TIMEOUT": "4.5", "TENSORBRIDGE_SOCKET_GROUP": "www-data"}
    from_env = _config(["--config", str(toml)], env)  # the environment beats the file
    assert (from_env.shm_cap, from_env.socket_mode, from_env.allow_gid, from_env.metrics_port,
            from_env.log_format, from_env.io_threads, from_env.drain_timeout,
            from_env.socket_group) == (200 << 20, 0o640, [7, 8], 9200, "text", 3, 4.5,
                                       "www-data")
    flags = _config(["--config", str(toml), "--shm-cap-mb", "300", "--socket-mode", "660",
                     "--allow-gid", "9", "--allow-gid", "10", "--metrics-port", "9300",
                     "--metrics-host", "127.0.0.2", "--log-format", "json", "--io-threads",
                     "2", "--drain-timeout", "1", "--socket-owner", "nobody",
                     "--socket-group", "nogroup"], env)  # flags beat both
    assert (flags.shm_cap, flags.socket_mode, flags.allow_gid, flags.metrics_port,
            flags.metrics_host, flags.log_format, flags.io_threads, flags.drain_timeout,
            flags.socket_owner, flags.socket_group) == (
        300 << 20, 0o660, [9, 10], 9300, "127.0.0.2", "json", 2, 1.0, "nobody", "nogroup")
    # The region cap from the file is no longer overwritten by the flag's default.
    toml.write_text("[server]\nregion_cap_mb = 8\n")
    assert _config(["--config", str(toml)]).region_cap == 8 << 20


@pytest.mark.parametrize(("toml", "message"), [
    ("socket_mode = 'rw-rw----'", "octal digits"),
    ("socket_mode = '1777'", "not a permission mode"),
    ("metrics_port = 70000", "TCP port"),
    ("log_format = 'xml'", "log_format"),
    ("shm_cap_mb = -1", "shm_cap_mb must be > 0"),
    ("allow_gid = 'abc'", "allow_gid must be a number"),
    ("drain_timeout = -2", "drain_timeout must be >= 0"),
    ("shm_cap = 5", "unknown [server] keys ['shm_cap']"),
])
def test_bad_settings_are_named(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "tb.toml"
    path.write_text(f"[server]\n{toml}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        tb.ServerConfig.from_toml(path)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="environment: metrics_port"):
        _config([], {"TENSORBRIDGE_METRICS_PORT": "http"})


def test_cli_reports_a_bad_setting_and_exits_1(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tensorbridge", "serve", "--socket",
                           str(tmp_path / "s"), "--model", "e=tensorbridge.models.testing:echo"],
                          env={**os.environ, "TENSORBRIDGE_SOCKET_MODE": "999"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "socket_mode" in proc.stderr and "TENSORBRIDGE_" in proc.stderr


@pytest.mark.parametrize("written", ["440", "0o440", '"440"', '"0440"'])
def test_socket_mode_is_read_the_chmod_way_however_it_is_written(tmp_path: Path,
                                                                  written: str) -> None:
    # A bare 440 is decimal to TOML (0o670, which would let the group write); it means 0o440.
    path = tmp_path / "mode.toml"
    path.write_text(f"[server]\nsocket_mode = {written}  # r--r-----\n")
    assert tb.ServerConfig.from_toml(path).socket_mode == 0o440
