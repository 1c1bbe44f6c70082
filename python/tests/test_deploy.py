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
    m.answered("m", 1, "ok", 0.001, 0.0001, 0.002, 0.004)
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


# -- Kubernetes (deploy/kubernetes/): the node-local DaemonSet and the sidecar variant -------

KUBE = DEPLOY / "kubernetes"
#: The command every probe runs (docs/operations.md, "Kubernetes").
HEALTH = "tensorbridge health"


def _kube(name: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def _kube_config(tmp_path: Path) -> tuple[Path, str]:
    """The ConfigMap's tensorbridge.toml as a file, and the socket it sets."""
    from tensorbridge._config import ServerConfig

    (configmap,) = _kube("configmap.yaml")
    path = tmp_path / "tensorbridge.toml"
    path.write_text(configmap["data"]["tensorbridge.toml"])
    return path, ServerConfig.from_toml(str(path)).socket


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _mount_dir(container: dict, pod: dict, volume_kind: str) -> tuple[str, dict]:
    """(mountPath, volume) of the container's socket directory, a ``volume_kind`` volume."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if volume_kind in volume:
            return mount["mountPath"], volume
    raise AssertionError(f"{container['name']} mounts no {volume_kind} volume")


def _probe_command(container: dict, probe: str) -> str:
    return " ".join(container[probe]["exec"]["command"])


def _check_server(container: dict, pod: dict, socket: str, volume_kind: str) -> None:
    """A tensorbridge container: its flag, socket directory, probes and requests."""
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--socket") + 1] == socket
    config_dir = str(Path(args[args.index("--config") + 1]).parent)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_volume = next(v for v in pod["volumes"] if v["name"] == mounts[config_dir])
    assert config_volume["configMap"]["name"] == _kube("configmap.yaml")[0]["metadata"]["name"]
    assert _mount_dir(container, pod, volume_kind)[0] == str(Path(socket).parent)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = _probe_command(container, probe)
        assert HEALTH in command and f"--socket {socket}" in command, (probe, command)
    # Readiness fails on any problem (a remote down too); liveness only when unreachable
    # (exit 3): a remote outage must not restart the node's server.
    assert container["readinessProbe"]["exec"]["command"][:2] == ["tensorbridge", "health"]
    assert "$? -ne 3" in _probe_command(container, "livenessProbe")


def _check_requests(pod: dict) -> None:
    for container in pod.get("initContainers", []) + pod["containers"]:
        requests = container["resources"]["requests"]
        assert requests.get("cpu") and requests.get("memory"), container["name"]


def _check_php(container: dict, pod: dict, socket: str, volume_kind: str) -> dict:
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TENSORBRIDGE_SOCKET"] == socket
    mount, volume = _mount_dir(container, pod, volume_kind)
    assert mount == str(Path(socket).parent)
    return volume


def test_kubernetes_config_is_valid(tmp_path: Path) -> None:
    path, socket = _kube_config(tmp_path)
    assert socket.startswith("/run/tensorbridge/")
    from conftest import run_cli

    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr


def test_kubernetes_daemonset_shares_its_socket_with_php_pods_on_the_node(tmp_path: Path
                                                                          ) -> None:
    _, socket = _kube_config(tmp_path)
    (daemonset,) = _kube("daemonset.yaml")
    assert daemonset["kind"] == "DaemonSet"
    pod = _pod(daemonset)
    (server,) = [c for c in pod["containers"] if c["name"] == "tensorbridge"]
    _check_server(server, pod, socket, "hostPath")
    _check_requests(pod)
    host_dir = _mount_dir(server, pod, "hostPath")[1]["hostPath"]["path"]
    # The drain (SIGTERM) fits in the grace period.
    assert pod["terminationGracePeriodSeconds"] > 10
    (php_app,) = _kube("php-fpm-node-local.yaml")
    php_pod = _pod(php_app)
    volume = _check_php(php_pod["containers"][0], php_pod, socket, "hostPath")
    assert volume["hostPath"]["path"] == host_dir
    _check_requests(php_pod)


def test_kubernetes_sidecar_shares_an_emptydir_socket_in_one_pod(tmp_path: Path) -> None:
    _, socket = _kube_config(tmp_path)
    (deployment,) = _kube("sidecar.yaml")
    pod = _pod(deployment)
    (server,) = [c for c in pod["initContainers"] if c["name"] == "tensorbridge"]
    assert server["restartPolicy"] == "Always"  # a native sidecar: up before PHP-FPM
    _check_server(server, pod, socket, "emptyDir")
    (php_fpm,) = pod["containers"]
    _check_php(php_fpm, pod, socket, "emptyDir")
    _check_requests(pod)
