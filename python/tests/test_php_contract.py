"""The PHP Client contract (php/tests/ClientContractTestCase.php) against a real server: the same
PHPUnit cases that FakeTransportContractTest runs in memory run here over LocalTransport."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("leak_check")


def test_contract_cases_pass_against_the_real_transport(server) -> None:
    proc = subprocess.run(
        ["phpunit", "--group", "server", "--filter", "LocalTransportContractTest"],
        cwd=ROOT / "php", env={**os.environ, "TENSORBRIDGE_CONTRACT_SOCKET": server.socket},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every case ran (none skipped for want of a server) and the fake runs the same ones
    ran = re.search(r"OK \((\d+) tests?, (\d+) assertions?\)", proc.stdout)
    assert ran is not None, proc.stdout
    cases = (ROOT / "php" / "tests" / "ClientContractTestCase.php").read_text()
    assert int(ran.group(1)) == len(re.findall(r"public function test\w+\(", cases)) >= 10


def test_readme_fake_transport_example_passes(tmp_path) -> None:
    readme = (ROOT / "php" / "README.md").read_text()
    start = readme.index("```php\nuse PHPUnit\\Framework\\TestCase;")
    code = readme[start + len("```php\n"):readme.index("```", start + 6)]
    test = tmp_path / "DigitReaderTest.php"
    test.write_text("<?php\n\ndeclare(strict_types=1);\n\n" + code)
    proc = subprocess.run(["phpunit", "--bootstrap", str(ROOT / "php" / "autoload.php"), str(test)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK (2 tests" in proc.stdout
