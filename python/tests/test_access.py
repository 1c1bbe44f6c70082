"""Access control with a real second Unix user: SO_PEERCRED uid/gid checks, the socket file's
owner, group and mode, and regions that another user cannot open.

Needs root (to create the user and run processes as it); skipped otherwise.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PHP_DIR, TEST_MODELS

USER = "tbtest-other"
GROUP = "tbtest-shared"
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike a root-owned venv
BREAKER_DIRS = "/tmp/tb-access-breaker"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                       reason="needs root and useradd to create a second user"),
    # One xdist worker for every test that adds or deletes a user: useradd and userdel in two
    # workers at once fight over /etc/passwd's lock and leave half-deleted users behind.
    pytest.mark.xdist_group("users"),
]


@dataclass(frozen=True)
class Other:
    """The second user: its uid, its own group, and a group shared with the server."""

    uid: int
    gid: int
    shared_gid: int


def _ensure(lookup: Callable[[str], object], name: str, create: list[str]) -> bool:
    """Create the user or group ``name`` unless it exists; True if this call created it.

    useradd and groupadd also refuse a name that a half-finished deletion left in
    /etc/shadow or /etc/gshadow (exit 9): then the entry is removed and created again.
    """
    try:
        lookup(name)
        return False
    except KeyError:
        pass
    proc = subprocess.run(create, capture_output=True, text=True)
    if proc.returncode == 9:  # "already exists" in a file the lookup does not read
        subprocess.run(["userdel" if create[0] == "useradd" else "groupdel", name],
                       capture_output=True, check=False)
        proc = subprocess.run(create, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(create)}: {proc.stderr}"
    lookup(name)
    return True


# Session scope, created once: a module fixture is torn down and made again whenever the
# xdist worker runs another module's test in between, and that churn of useradd/userdel
# raced with the tests that were using the user.
@pytest.fixture(scope="session")
def other() -> Iterator[Other]:
    created = []
    if _ensure(grp.getgrnam, GROUP, ["groupadd", "--system", GROUP]):
        created.append(("groupdel", GROUP))
    if _ensure(pwd.getpwnam, USER, ["useradd", "--system", "--user-group", "--no-create-home",
                                    "--shell", "/usr/sbin/nologin", USER]):
        created.insert(0, ("userdel", USER))
    entry = pwd.getpwnam(USER)
    yield Other(entry.pw_uid, entry.pw_gid, grp.getgrnam(GROUP).gr_gid)
    for uid in (0, entry.pw_uid, pwd.getpwnam("nobody").pw_uid):
        shutil.rmtree(f"{BREAKER_DIRS}-{uid}", ignore_errors=True)
    for command, name in created:
        subprocess.run([command, name], check=False)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tb-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def php_as(uid: int, gid: int, cmd: dict) -> list[dict]:
    """Run the PHP driver as ``uid:gid`` with no supplementary groups."""
    # The client's circuit-breaker state lives in a directory private to each user.
    cmd = {"breaker_state_dir": f"{BREAKER_DIRS}-{uid}", **cmd}
    proc = subprocess.run(["php", str(PHP_DIR / "call.php")], input=json.dumps(cmd),
                          capture_output=True, text=True, timeout=60, user=uid, group=gid,
                          extra_groups=[], env={"PATH": os.environ["PATH"], "HOME": "/tmp"},
                          cwd="/tmp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def ping_as(uid: int, gid: int, socket: str) -> dict:
    (result,) = php_as(uid, gid, {"socket": socket, "calls": [{"op": "ping"}]})
    return result


_READ_REFUSAL = """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
data = b""
while chunk := s.recv(65536):
    data += chunk
magic, ver, ftype, flags, rid, n, crc = struct.unpack("<IBBHQII", data[:24])
code, _, m = struct.unpack("<HHI", data[24:32])
print(json.dumps({"type": ftype, "rid": rid, "code": code, "message": data[32:32 + m].decode()}))
"""


def refusal_as(uid: int, gid: int, socket: str) -> dict:
    """Connect as ``uid:gid`` and read what the server sends before hanging up (spec §10)."""
    proc = subprocess.run([SYSTEM_PYTHON, "-c", _READ_REFUSAL, socket], capture_output=True,
                          text=True, timeout=30, user=uid, group=gid, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin"}, cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _serve(make_server, shared_dir: Path, extra: list[str]):
    return make_server(TEST_MODELS[:1], ["--warmup", "0", *extra],
                       socket=str(shared_dir / "tb.sock"))


def php_refused(result: dict) -> dict:
    """A PHP call's result must be UnauthorizedException (spec §4: the client MUST raise it,
    even when the server hung up before the client's first send)."""
    assert result["error"] == "UnauthorizedException", result
    return result


def test_other_uid_is_refused_with_unauthorized(make_server, shared_dir: Path, other: Other,
                                                leak_check: None) -> None:
    # Mode 666: the file system lets anyone connect, so the refusal is SO_PEERCRED's.
    srv = _serve(make_server, shared_dir, ["--allow-uid", "0", "--socket-mode", "666"])
    wire = refusal_as(other.uid, other.gid, srv.socket)
    assert (wire["type"], wire["rid"], wire["code"]) == (0xFF, 0, 8)  # ERROR UNAUTHORIZED
    assert f"uid {other.uid}" in wire["message"] and "--allow-uid" in wire["message"]
    assert ping_as(0, 0, srv.socket)["pong"]["server"] == "tensorbridge"
    refused = php_refused(ping_as(other.uid, other.gid, srv.socket))
    assert f"uid {other.uid}" in refused["message"]


def test_allow_gid_admits_by_primary_group(make_server, shared_dir: Path, other: Other,
                                           leak_check: None) -> None:
    srv = _serve(make_server, shared_dir, ["--allow-gid", str(other.shared_gid),
                                           "--socket-mode", "666"])
    assert ping_as(other.uid, other.shared_gid, srv.socket)["pong"]["server"] == "tensorbridge"
    wire = refusal_as(other.uid, other.gid, srv.socket)
    assert (wire["type"], wire["rid"], wire["code"]) == (0xFF, 0, 8)  # ERROR UNAUTHORIZED
    assert f"gid {other.gid}" in wire["message"]
    refused = php_refused(ping_as(other.uid, other.gid, srv.socket))
    assert f"gid {other.gid}" in refused["message"]


def test_socket_owner_group_and_mode(make_server, shared_dir: Path, other: Other,
                                     leak_check: None) -> None:
    srv = _serve(make_server, shared_dir, ["--socket-owner", USER, "--socket-group", GROUP,
                                           "--socket-mode", "660"])
    # The user as the server resolved it (the names are what the flags carry).
    entry = pwd.getpwnam(USER)
    st = os.stat(srv.socket)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (entry.pw_uid, other.shared_gid, 0o660)
    # Same user, group not shared: the file mode lets it in only as the owner.
    assert ping_as(entry.pw_uid, entry.pw_gid, srv.socket)["pong"]["server"] == "tensorbridge"
    # A third identity (nobody) in neither: refused by the file system, before the server.
    nobody = pwd.getpwnam("nobody")
    denied = ping_as(nobody.pw_uid, nobody.pw_gid, srv.socket)
    assert denied["error"] == "ConnectionException", denied
    assert "ermission denied" in denied["message"]
    # ... and let in through the group.
    assert ping_as(nobody.pw_uid, other.shared_gid, srv.socket)["pong"]["server"] \
        == "tensorbridge"


_PROBE = """
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            out[path] = "read %d bytes" % len(f.read(16))
    except OSError as exc:
        out[path] = type(exc).__name__
for pid in {p.split("/")[2] for p in sys.argv[1:]}:
    try:
        os.listdir("/proc/%s/fd" % pid)
        out["list " + pid] = "listed"
    except OSError as exc:
        out["list " + pid] = type(exc).__name__
print(json.dumps(out))
"""


def _region_fds(pid: int) -> list[str]:
    base = f"/proc/{pid}/fd"
    found = []
    for fd in os.listdir(base):
        try:
            if "memfd:tensorbridge-region" in os.readlink(f"{base}/{fd}"):
                found.append(f"{base}/{fd}")
        except FileNotFoundError:
            pass
    return found


def test_other_user_cannot_open_a_clients_region(make_server, shared_dir: Path, other: Other,
                                                 tmp_path: Path, leak_check: None) -> None:
    """Regions are memfds with no name; the only ways in are /proc/<pid>/fd of the client or
    the server, which the kernel closes to other users."""
    srv = _serve(make_server, shared_dir, ["--socket-mode", "666"])
    release = tmp_path / "release"
    secret = "73656372657420" * 8
    client = subprocess.Popen(["php", str(PHP_DIR / "call.php")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert client.stdin is not None
    client.stdin.write(json.dumps({"socket": srv.socket, "breaker_state_dir":
                                   f"{BREAKER_DIRS}-0", "calls": [
        {"op": "infer", "model": "echo", "inputs": {"x": {"dtype": "UINT8",
                                                           "shape": [len(secret) // 2],
                                                           "hex": secret}}},
        {"op": "wait_file", "path": str(release)}]}))
    client.stdin.close()
    client.stdin = None  # so that communicate() leaves it alone
    try:
        end = time.monotonic() + 30
        while not (_region_fds(client.pid) and _region_fds(srv.pid)) and \
                time.monotonic() < end:
            time.sleep(0.05)
        targets = _region_fds(client.pid) + _region_fds(srv.pid)
        assert _region_fds(client.pid) and _region_fds(srv.pid)
        # Root can read them: the paths are right, so a refusal below is the kernel's.
        with open(targets[0], "rb") as f:
            assert len(f.read(16)) == 16
        probe = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE, *targets], capture_output=True,
                               text=True, timeout=30, user=other.uid, group=other.gid,
                               extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/tmp")
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout)
    finally:
        release.touch()
        out, err = client.communicate(timeout=30)
    assert json.loads(out)[0]["outputs"]["x"]["hex"] == secret, err
    assert seen and set(seen.values()) == {"PermissionError"}, seen
