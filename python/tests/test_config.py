"""The settings schema: flags, TENSORBRIDGE_* twins, TOML keys and the docs table all come
from one declaration; every bad value stops ``serve`` before it binds, with exit code 2 and a
message naming the file, the key, the value and what is allowed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tensorbridge as tb
from tensorbridge._cli import build_parser, main, server_config, update_doc_table
from tensorbridge._config import MODEL_SETTINGS, SERVER_SETTINGS
from tensorbridge._exitcode import ExitCode
from tensorbridge._settings import MIB, MODE, ConfigError, Setting, markdown_table

from conftest import ROOT

SAMPLE_TOML = ROOT / "deploy" / "tensorbridge.toml"
OPERATIONS = ROOT / "docs" / "operations.md"
ECHO = 'source = "tensorbridge.models.testing:echo"\nwarmup = 0\n'

# (id, TOML text, fragments the one-line message must hold). {dir} is the config's folder.
BAD_CONFIGS = [
    ("typo_key", "[server]\ntreads = 2\n[models.m]\n" + ECHO,
     ["[server] unknown key 'treads' (= 2); did you mean 'threads'?"]),
    ("wrong_type", '[server]\nio_threads = "four"\n[models.m]\n' + ECHO,
     ["[server] io_threads = 'four': wrong type (a string); allowed: an integer from 2 to 256"]),
    ("negative_instances", "[models.m]\n" + ECHO + "instances = -3\n",
     ["[models.m] instances = -3: out of range; allowed: an integer from 1 to 256"]),
    ("unknown_batch_policy", "[models.m]\n" + ECHO + 'batch_policy = "queue-depht"\n',
     ["[models.m] batch_policy = 'queue-depht': unknown choice; allowed: one of 'delay', "
      "'queue_depth'; did you mean 'queue_depth'?"]),
    ("missing_weights", "[models.m]\n" + ECHO + 'weights = "gone.pth"\n',
     ["[models.m] weights = '{dir}/gone.pth': no such file"]),
    ("bad_octal_mode", '[server]\nsocket_mode = "rw-rw----"\n[models.m]\n' + ECHO,
     ["[server] socket_mode = 'rw-rw----': invalid value; allowed: an octal file mode"]),
    ("mode_out_of_range", "[server]\nsocket_mode = 1777\n[models.m]\n" + ECHO,
     ["[server] socket_mode = '1777': not a permission mode (000..777)"]),
    ("unknown_device", "[models.m]\n" + ECHO + 'device = "gpu"\n',
     ["[models.m] device = 'gpu': unknown device; allowed: cpu, cuda, cuda:N or mps"]),
    ("missing_factory", '[models.m]\nsource = "tensorbridge.models.testing:nope"\n',
     ["[models.m] source = 'tensorbridge.models.testing:nope': module "
      "'tensorbridge.models.testing' has no factory 'nope'"]),
    ("missing_module", '[models.m]\nsource = "no_such_pkg.models:create"\n',
     ["[models.m] source = 'no_such_pkg.models:create': no module named 'no_such_pkg'"]),
    ("missing_model_file", '[models.m]\nsource = "gone.pt"\n',
     ["[models.m] source = '{dir}/gone.pt': no such file"]),
    ("port_out_of_range", "[server]\nmetrics_port = 70000\n[models.m]\n" + ECHO,
     ["[server] metrics_port = 70000: out of range; allowed: an integer from 0 to 65535"]),
    ("bool_for_number", "[server]\nthreads = true\n[models.m]\n" + ECHO,
     ["[server] threads = true: wrong type (a boolean)"]),
    ("bad_toml_syntax", "[server]\nthreads = \n", ["not valid TOML", "line 2"]),
    ("model_key_in_server", "[server]\nmax_queue = 3\n[models.m]\n" + ECHO,
     ["[server] unknown key 'max_queue' (= 3): it belongs in [models.NAME]"]),
    ("model_key_typo", "[models.m]\n" + ECHO + "warm_up = 3\n",
     ["[models.m] unknown key 'warm_up' (= 3); did you mean 'warmup'?"]),
    ("table_typo", "[sever]\nthreads = 1\n[models.m]\n" + ECHO,
     ["unknown key 'sever'; did you mean 'server'?"]),
    ("bad_preprocess", "[models.m]\n" + ECHO + '[models.m.preprocess]\nmode = "CMYK"\n',
     ["[models.m.preprocess] preprocess mode must be 'RGB' or 'L', got 'CMYK'"]),
    ("no_source", "[models.m]\nwarmup = 0\n",
     ["[models.m] source = '': none, and no repository folder 'm' exists to take it from"]),
    ("missing_repository", '[server]\nrepository = "gone"\n',
     ["[server] repository = '{dir}/gone': no such directory"]),
    ("bad_version_policy", "[models.m]\n" + ECHO + 'version_policy = "newest"\n',
     ["[models.m] version_policy = 'newest': unknown version policy; allowed: \"latest\""]),
    ("no_models", "[server]\nthreads = 1\n", ["no models"]),
    ("unknown_socket_group", '[server]\nsocket_group = "no-such-group-tb"\n[models.m]\n' + ECHO,
     ["[server] socket_group = 'no-such-group-tb': no such group on this host"]),
    ("region_initial_over_cap", "[server]\nregion_initial_mb = 64\nregion_cap_mb = 8\n"
     "[models.m]\n" + ECHO, ["region_initial_mb (64) is larger than region_cap_mb (8)"]),
]


@pytest.mark.parametrize(("toml", "fragments"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_stops_serve_before_binding(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              toml: str, fragments: list[str]) -> None:
    config, sock = tmp_path / "tb.toml", tmp_path / "tb.sock"
    config.write_text(toml)
    code = main(["serve", "--config", str(config), "--socket", str(sock)])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG == 2, err
    assert not sock.exists()  # nothing was bound
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one message
    if "no models" not in fragments[0]:
        assert lines[0].startswith(f"tensorbridge serve: {config}:"), err  # names the file
    for fragment in fragments:
        assert fragment.format(dir=tmp_path) in lines[0], err
    # check-config finds the same, without starting anything.
    assert main(["check-config", str(config)]) == ExitCode.CONFIG
    assert capsys.readouterr().err.strip().removeprefix("tensorbridge check-config: ") == \
        lines[0].removeprefix("tensorbridge serve: ")


def test_real_process_exits_2_and_binds_nothing(tmp_path: Path) -> None:
    """The console script itself, for three kinds of mistake at once (file, env, flag)."""
    runs = []
    for i, (args, env) in enumerate([
        (["--config", str(tmp_path / "c.toml")], {}),
        (["--model", "e=tensorbridge.models.testing:echo"], {"TENSORBRIDGE_MAX_QUEUE": "-1"}),
        (["--model", "e=tensorbridge.models.testing:echo", "--log-format", "xml"], {}),
    ]):
        (tmp_path / "c.toml").write_text("[models.e]\n" + ECHO + "instances = 0\n")
        sock = tmp_path / f"s{i}.sock"
        runs.append((sock, subprocess.Popen(
            [sys.executable, "-m", "tensorbridge", "serve", "--socket", str(sock), *args],
            env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)))
    errs = []
    for sock, proc in runs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert not sock.exists()
        errs.append(err)
    assert "[models.e] instances = 0: out of range" in errs[0]
    assert "environment: TENSORBRIDGE_MAX_QUEUE: max_queue = '-1': out of range" in errs[1]
    assert "command line: --log-format: log_format = 'xml': unknown choice; allowed: one of " \
           "'text', 'json'" in errs[2]


def test_check_config_accepts_the_shipped_files(capsys: pytest.CaptureFixture) -> None:
    assert main(["check-config", str(ROOT / "examples" / "models.toml")]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "digits, digits-image, resnet18" in out
    # a text model whose factory names the tokenizer: the TOML only tunes it
    assert main(["check-config", str(ROOT / "examples" / "minilm.toml")]) == ExitCode.OK
    assert "(minilm)" in capsys.readouterr().out


def test_text_preprocess_keys_are_checked_without_a_tokenizer_in_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "text.toml"
    bad.write_text('[models.t]\nsource = "tensorbridge.models.minilm:create"\n'
                   '[models.t.preprocess]\nmax_lenght = 64\npadding = "longest"\n')
    assert main(["check-config", str(bad)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "[models.t.preprocess] unknown preprocess keys ['max_lenght'] for a text model" in err


def test_docs_settings_table_is_current(tmp_path: Path) -> None:
    copy = tmp_path / "operations.md"
    copy.write_text(OPERATIONS.read_text())
    assert update_doc_table(copy) == OPERATIONS.read_text(), \
        "run: tensorbridge settings --update docs/operations.md"
    table = markdown_table(("server", SERVER_SETTINGS), ("model", MODEL_SETTINGS))
    for spec in (*SERVER_SETTINGS, *MODEL_SETTINGS):
        assert f"| `{spec.key}` |" in table


def _sample(spec: Setting) -> tuple[str, object]:
    """A valid non-default value as text (flag/environment) and what the config then holds."""
    if spec.choices:
        choice = next(c for c in reversed(spec.choices) if c != spec.default)
        return choice, choice
    if spec.key == "device":
        return "cpu", "cpu"
    if spec.key == "repository":  # an absolute path: a relative one is the config file's
        return "/srv/models", "/srv/models"
    if spec.kind == "int" and spec.minimum is not None and spec.minimum > 7:
        return str(int(spec.minimum) + 1), int(spec.minimum) + 1
    return {MODE: ("640", 0o640), MIB: ("3", 3 << 20), "int": ("7", 7), "float": ("2.5", 2.5),
            "str": ("x7", "x7"), "ints": ("5,6", [5, 6]), "bool": ("true", True)}[spec.kind]


def _config(argv: list[str], env: dict[str, str] | None = None) -> tb.ServerConfig:
    return server_config(build_parser().parse_args(["serve", *argv]), env or {})


@pytest.mark.parametrize("spec", [s for s in SERVER_SETTINGS if s.cli], ids=lambda s: s.key)
def test_every_server_setting_has_toml_env_and_flag(tmp_path: Path, spec: Setting) -> None:
    text, held = _sample(spec)
    toml = tmp_path / "tb.toml"
    written = {MODE: repr(text), "str": repr(text), "ints": "[5, 6]"}.get(spec.kind, text)
    toml.write_text(f"[server]\n{spec.key} = {written}\n")
    assert getattr(_config(["--config", str(toml)]), spec.name) == held
    assert getattr(_config([], {spec.env: text}), spec.name) == held
    flag = [spec.flag, *(["5", spec.flag, "6"] if spec.repeatable else [text])]
    assert getattr(_config(flag), spec.name) == held


@pytest.mark.parametrize("spec", [s for s in MODEL_SETTINGS if s.cli], ids=lambda s: s.key)
def test_model_flags_and_env_apply_to_cli_models(spec: Setting) -> None:
    text, held = _sample(spec)
    model = ["--model", "e=tensorbridge.models.testing:echo"]
    (from_env,) = _config(model, {spec.env: text}).models
    assert getattr(from_env, spec.name) == held
    flag = [spec.flag, *(["5", spec.flag, "6"] if spec.repeatable else [text])]
    (from_flag,) = _config([*model, *flag]).models
    assert getattr(from_flag, spec.name) == held


def test_sample_toml_loads() -> None:
    config = tb.ServerConfig.from_toml(SAMPLE_TOML)
    assert config.socket == "/run/tensorbridge/tensorbridge.sock"
    assert config.socket_mode == 0o660 and config.socket_group == "www-data"
    assert config.shm_cap == 2048 << 20 and config.metrics_port == 9464
    assert config.log_format == "json" and config.allow_gid == [33]
    (model,) = config.models
    assert model.name == "digits" and model.watchdog_timeout == 5.0


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    toml = tmp_path / "tb.toml"
    toml.write_text("[server]\nshm_cap_mb = 100\nallow_gid = [5, 6]\nregion_cap_mb = 8\n")
    env = {"TENSORBRIDGE_SHM_CAP_MB": "200", "TENSORBRIDGE_ALLOW_GID": "7,8"}
    assert _config(["--config", str(toml)]).shm_cap == 100 << 20
    from_env = _config(["--config", str(toml)], env)
    assert (from_env.shm_cap, from_env.allow_gid, from_env.region_cap) == (
        200 << 20, [7, 8], 8 << 20)  # an unset flag leaves the file's value alone
    flags = _config(["--config", str(toml), "--shm-cap-mb", "300", "--allow-gid", "9",
                     "--allow-gid", "10"], env)
    assert (flags.shm_cap, flags.allow_gid) == (300 << 20, [9, 10])


def test_environment_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "environment: TENSORBRIDGE_METRICS_PORT: metrics_port = 'http': invalid value")):
        _config([], {"TENSORBRIDGE_METRICS_PORT": "http"})


@pytest.mark.parametrize("written", ["440", "0o440", '"440"', '"0440"'])
def test_socket_mode_is_read_the_chmod_way_however_it_is_written(tmp_path: Path,
                                                                  written: str) -> None:
    # A bare 440 is decimal to TOML (0o670, which would let the group write); it means 0o440.
    path = tmp_path / "mode.toml"
    path.write_text(f"[server]\nsocket_mode = {written}  # r--r-----\n")
    assert tb.ServerConfig.from_toml(path).socket_mode == 0o440


def test_settings_command_prints_every_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["settings", "--format", "json"]) == ExitCode.OK
    out = capsys.readouterr().out
    for spec in (*SERVER_SETTINGS, *MODEL_SETTINGS):
        assert f'"key": "{spec.key}"' in out
