"""Exit 0 when this checkout's Python package and every dependency it declares are installed.

`make setup` runs this from outside the source tree with no PYTHONPATH, so the answer is about
what pip installed, never about what the checkout can import: a clean clone on a machine that
has the dependencies but not the package (or an install of another checkout) is reinstalled.

    python3 scripts/installed.py /path/to/checkout [extra ...]
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

try:  # pip always carries packaging; a bare interpreter may not have it on its own
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover - depends on the machine
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]


def missing(checkout: Path, extras: list[str]) -> list[str]:
    """What is not installed (or installed from elsewhere), one line each."""
    project = tomllib.loads((checkout / "python" / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    problems = []
    try:
        dist = metadata.distribution(project["name"])
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        here = (checkout / "python").resolve().as_uri()
        if url.get("url") != here or not url.get("dir_info", {}).get("editable"):
            problems.append(f"{project['name']} is installed from {url.get('url', 'an index')},"
                            f" not editable from {here}")
    except metadata.PackageNotFoundError:
        problems.append(f"{project['name']} is not installed")
    env = {"extra": ""}
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} does not satisfy {req}")
    return problems


if __name__ == "__main__":
    found = missing(Path(sys.argv[1]), sys.argv[2:])
    for line in found:
        print(f"  {line}")
    sys.exit(1 if found else 0)
