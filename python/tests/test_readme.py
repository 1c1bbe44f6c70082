"""The README's PHP snippet runs as shown, against a real server."""

from __future__ import annotations

import re
import subprocess

from conftest import ROOT


def test_readme_php_snippet_runs(make_server) -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```php\n(.*?)```", readme, re.S).group(1)
    server = make_server(["digits=tensorbridge.models.digits:create"])
    code = "<?php\n" + snippet.replace("/tmp/tensorbridge.sock", server.socket)
    proc = subprocess.run(["php"], input=code, capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[2,10]"
