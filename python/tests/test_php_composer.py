"""The PHP client installed with Composer into a scratch app (path repository, no Packagist),
then calling a real server through Composer's autoloader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PHP_DIR, ROOT

pytestmark = pytest.mark.usefixtures("leak_check")

LIBRARY = ROOT / "php"


def composer(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """Run Debian's composer offline, with its home (cache, config) under the test's tmp dir."""
    exe = shutil.which("composer")
    assert exe is not None, "composer is not installed (make setup installs the Debian package)"
    env = {**os.environ, "COMPOSER_HOME": str(home), "COMPOSER_CACHE_DIR": str(home / "cache"),
           "COMPOSER_DISABLE_NETWORK": "1", "COMPOSER_NO_INTERACTION": "1",
           "COMPOSER_ALLOW_SUPERUSER": "1"}
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_composer_json_validates_strictly(tmp_path) -> None:
    proc = composer(["validate", "--strict", "--no-check-publish"], LIBRARY, tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid" in proc.stdout + proc.stderr


def test_scratch_app_installs_the_client_and_calls_the_server(server, tmp_path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "composer.json").write_text(json.dumps({
        "name": "acme/scratch-app",
        "type": "project",
        "repositories": [
            {"type": "path", "url": str(LIBRARY), "options": {"symlink": False}},
            {"packagist.org": False},
        ],
        "require": {"php": ">=8.1", "tensorbridge/client": "*@dev"},
    }, indent=2))
    proc = composer(["install", "--no-interaction", "--no-progress"], app, tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = app / "vendor" / "tensorbridge" / "client"
    assert (installed / "src" / "Client.php").is_file()
    assert not installed.is_symlink()  # a copy, as a deployed app would have it

    state = tmp_path / "breaker"
    state.mkdir(mode=0o700)
    run = subprocess.run(["php", str(PHP_DIR / "composer_app.php"), server.socket, str(state)],
                         cwd=app, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""
    result = json.loads(run.stdout)
    assert result["pong"]["server"] == "tensorbridge" and result["pong"]["protocol"] == 1
    assert result["echo"] == [[1.5, -2.0], [0.25, 8.0]]
    assert result["missing"] == "no-such-model"
    # the classes came from the installed copy, through Composer's autoloader alone
    assert result["client_file"] == str(installed / "src" / "Client.php")
    assert str(LIBRARY / "autoload.php") not in result["included"]
    assert not any(f.startswith(str(LIBRARY)) for f in result["included"])
    assert str(app / "vendor" / "autoload.php") in result["included"]
