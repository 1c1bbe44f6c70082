"""Fuzzing the real server over raw sockets while a well-behaved PHP client keeps calling it.

Frames are built with the encoders of ``_wire`` and then broken: lying lengths, offsets past the
region (after a real ATTACH whose memfd we receive and fill with junk), bad dtypes, huge shapes,
reserved bits, bad checksums, truncated frames, early disconnects, random bodies, broken headers.
For every frame with a good header the server owes exactly one well-formed reply, in order; a
broken header gets ERROR with request id 0 and a hang-up. At the end the server must be alive,
hold no more connections, descriptors or regions than before, have sent no INTERNAL error, and
the PHP client must have had every answer right.

`make test` sends TB_FUZZ_FRAMES=15000 frames (plus the hypothesis run); `make fuzz` 200,000.
TB_FUZZ_SEED replays a run.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge._errors import ProtocolError
from tensorbridge._spec import (
    ALIGN,
    BY_NAME,
    HEADER_SIZE,
    LOCATION_INLINE,
    LOCATION_REGION,
    MAGIC,
    MAX_BODY,
    ErrorCode,
    FrameType,
)
from tensorbridge._wire import (
    InferRequest,
    TensorDesc,
    decode_attach_ok,
    decode_error,
    decode_header,
    decode_header_py,
    decode_infer_ok,
    decode_infer_py,
    encode_attach,
    encode_bytes_items,
    encode_frame,
    encode_infer,
)

from conftest import PHP_DIR, ServerProcess

FRAMES = int(os.environ.get("TB_FUZZ_FRAMES", "15000"))
EXAMPLES = int(os.environ.get("TB_FUZZ_EXAMPLES", "300"))
SEED = int(os.environ.get("TB_FUZZ_SEED", "0")) or random.randrange(1, 1 << 31)
THREADS = 3
REGION_CAP_MB = 64
REPLY_WAIT = 30.0  # a frame unanswered this long means the server hangs
_HEADER = struct.Struct("<IBBHQII")
_REQUESTS = (FrameType.ATTACH, FrameType.PING, FrameType.MODELS, FrameType.INFER)
_OK = {FrameType.ATTACH: FrameType.ATTACH_OK, FrameType.PING: FrameType.PONG,
       FrameType.MODELS: FrameType.MODELS_OK, FrameType.INFER: FrameType.INFER_OK}
_INT32, _FP32, _UINT8, _BYTES = (BY_NAME[n] for n in ("INT32", "FP32", "UINT8", "BYTES"))


class Hang(AssertionError):
    """The server did not answer in time."""


@dataclass
class Stats:
    """What the fuzzers sent and got back (shared by the threads, guarded by ``lock``)."""

    frames: int = 0
    connections: int = 0
    replies: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Conn:
    """A raw connection that reads frames (and any descriptors) from the server."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()
        self.eof = False
        self.region: mmap.mmap | None = None

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None
        self.sock.close()

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise Hang("no reply")
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 4)
        except ConnectionResetError:
            data, fds = b"", []
        for fd in fds:  # region descriptors: keep the newest mapped, to scribble on
            try:
                if self.region is not None:
                    self.region.close()
                self.region = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        if not data:
            self.eof = True
        self.buf += data

    def read_frame(self, deadline: float) -> tuple[int, int, bytes] | None:
        """(type, request id, body) of the next reply; None at EOF. Replies must be valid."""
        while len(self.buf) < HEADER_SIZE:
            if self.eof:
                return None
            self._fill(deadline)
        header = decode_header(bytes(self.buf[:HEADER_SIZE]))  # raises on a bad reply
        end = HEADER_SIZE + header.body_len
        while len(self.buf) < end:
            if self.eof:
                raise AssertionError("the server sent a truncated frame")
            self._fill(deadline)
        body = bytes(self.buf[HEADER_SIZE:end])
        del self.buf[:end]
        if header.type == FrameType.ATTACH_OK:  # then the fd carrier byte
            while not self.buf and not self.eof:
                self._fill(deadline)
            assert self.buf[:1] == b"\xfd", "ATTACH_OK without its fd carrier byte"
            del self.buf[:1]
        return int(header.type), header.request_id, body


def _valid_infer(rng: random.Random, region_size: int) -> tuple[bytes, list[int] | None]:
    """An INFER for ``echo`` (inline, or in the region when there is one) and, for inline
    ones, the INT32 values the reply must echo."""
    values = [rng.randrange(-1 << 31, 1 << 31) for _ in range(rng.randrange(0, 40))]
    data = struct.pack(f"<{len(values)}i", *values)
    tag = encode_bytes_items([rng.randbytes(rng.randrange(0, 20))])
    if region_size and rng.random() < 0.5:
        inputs = [TensorDesc("x", _INT32, (len(values),), LOCATION_REGION, 0, len(data)),
                  TensorDesc("t", _BYTES, (1,), LOCATION_REGION, 4096, len(tag))]
        req = InferRequest(0, "echo", 8192, region_size - 8192, inputs)
        return encode_infer(req), None
    inputs = [TensorDesc("x", _INT32, (len(values),), LOCATION_INLINE, 0, len(data)),
              TensorDesc("t", _BYTES, (1,), LOCATION_INLINE, len(data), len(tag))]
    req = InferRequest(rng.choice([0, 5_000_000]), "echo", 0, 0, inputs, data + tag)
    return encode_infer(req), values


_NASTY_U64 = (0, 1, 63, 64, 4095, 4096, (1 << 20) - 1, 1 << 20, REGION_CAP_MB << 20,
              (REGION_CAP_MB << 20) + 1, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63,
              (1 << 64) - 64, (1 << 64) - 1)


def _mutate_infer(rng: random.Random, region_size: int) -> tuple[bytes, str]:
    """A structurally plausible INFER with one thing wrong (or several random byte flips)."""
    choice = rng.randrange(12)
    values = [rng.randrange(100) for _ in range(rng.randrange(1, 16))]
    data = struct.pack(f"<{len(values)}i", *values)
    desc = dict(name="x", dtype=_INT32, shape=(len(values),), location=LOCATION_INLINE,
                offset=0, nbytes=len(data))
    model, n_inputs_override, out = "echo", None, (0, 0)
    inline = data
    if choice == 0:  # lying nbytes
        desc["nbytes"] = rng.choice(_NASTY_U64)
        kind = "lying nbytes"
    elif choice == 1:  # region offsets past the end / unaligned
        desc.update(location=LOCATION_REGION, offset=rng.choice(_NASTY_U64 + (
            region_size, max(0, region_size - 64), 65)))
        kind = "offset past region"
    elif choice == 2:  # huge shapes whose byte count matches nothing real
        ndim = rng.randrange(1, 9)
        shape = tuple(rng.choice(_NASTY_U64) for _ in range(ndim))
        desc.update(shape=shape, dtype=_UINT8, nbytes=rng.choice(_NASTY_U64),
                    location=rng.choice([LOCATION_REGION, LOCATION_INLINE]))
        kind = "huge shape"
    elif choice == 3:  # shape product overflowing 64 bits but nbytes "consistent" mod 2^64
        desc.update(shape=(1 << 32, 1 << 32), dtype=_UINT8, nbytes=0)
        kind = "overflowing shape"
    elif choice == 4:  # BYTES items with lying lengths, inline
        items = encode_bytes_items([b"ab", b"cde"])
        broken = bytearray(items)
        broken[0:4] = struct.pack("<I", rng.choice([3, 1 << 31, 0xFFFFFFFF]))
        inline = bytes(broken)
        desc.update(dtype=_BYTES, shape=(2,), nbytes=len(inline))
        kind = "lying BYTES lengths"
    elif choice == 5:  # BYTES in the region, whose junk we wrote ourselves
        count = rng.choice([1, 3, 1000])
        desc.update(dtype=_BYTES, shape=(count,), location=LOCATION_REGION, offset=0,
                    nbytes=min(region_size, rng.choice([4 * count, 1 << 16])) if region_size
                    else 4 * count)
        kind = "BYTES from junk region"
    elif choice == 6:  # unknown model, over-long model name
        model = rng.choice(["nope", "x" * 255, "é" * 100, "sleep\x00"])
        kind = "unknown model"
    elif choice == 7:  # output area past the region
        out = (rng.choice(_NASTY_U64), rng.choice(_NASTY_U64))
        kind = "bad output area"
    elif choice == 8:  # BOOL with values other than 0/1; FP16/BF16 odd sizes
        desc.update(dtype=BY_NAME["BOOL"], shape=(len(data),), nbytes=len(data))
        kind = "bad BOOL"
    elif choice == 9:
        n_inputs_override = rng.choice([0, 2, 64, 255])
        kind = "wrong input count"
    else:
        kind = "byte flips"
    t = TensorDesc(desc["name"], desc["dtype"], desc["shape"], desc["location"],
                   desc["offset"], desc["nbytes"])
    req = InferRequest(rng.choice([0, 1, 10_000_000]), model, *out, [t], inline)
    body = bytearray(encode_infer(req))
    if n_inputs_override is not None:
        body[6] = n_inputs_override
    if choice >= 10:
        for _ in range(rng.randrange(1, 9)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        if rng.random() < 0.3:  # truncate or extend the body
            body = body[:rng.randrange(len(body))] if rng.random() < 0.5 \
                else body + rng.randbytes(rng.randrange(1, 64))
    return bytes(body), kind


def _bad_header(rng: random.Random) -> tuple[bytes, str]:
    magic, ver, ftype, flags, body_len = MAGIC, 1, int(FrameType.PING), 0, 0
    choice = rng.randrange(5)
    if choice == 0:
        magic = rng.choice([0, 0x31524255, 0xFFFFFFFF, 0x474554])  # ..., "GET"
    elif choice == 1:
        ver = rng.choice([0, 2, 255])
    elif choice == 2:
        # types no spec version assigns: 0, the next free request type, and reply-range gaps
        unused = max(t for t in FrameType if t < 0x80) + 1
        ftype = rng.choice([0, unused, 0x7F, 0x90, 0xFE])
    elif choice == 3:
        flags = rng.choice([2, 0x8000, 0xFFFF])
    else:
        body_len = rng.choice([MAX_BODY + 1, 0xFFFFFFFF])
    return _HEADER.pack(magic, ver, ftype, flags, rng.randrange(1, 1 << 63), body_len, 0), \
        f"bad header {choice}"


def fuzz_session(path: str, rng: random.Random, stats: Stats, budget: int) -> None:
    """One connection: pipelined frames, each reply checked; ends on hang-up or budget."""
    conn = Conn(path)
    with stats.lock:
        stats.connections += 1
    owed: list[tuple[int, int, list[int] | None, str]] = []  # (rid, request type, echo, kind)
    rid = rng.randrange(1, 1 << 40)
    crc_mode = False  # an ATTACH asked for checksums: our plain frames now fail, as they must
    sent = 0
    hung_up = False
    try:
        while sent < budget and not hung_up:
            for _ in range(rng.randrange(1, 17)):  # a burst of pipelined frames
                roll = rng.random()
                rid += 1
                expect: list[int] | None = None
                ftype = FrameType.INFER
                flags, crc = 0, 0
                region_size = len(conn.region) if conn.region is not None else 0
                if roll < 0.05:
                    ftype, body, kind = rng.choice([FrameType.PING, FrameType.MODELS]), b"", \
                        "ping/models"
                elif roll < 0.12:
                    ftype, kind = FrameType.ATTACH, "attach"
                    body = encode_attach(rng.choice([0, 0, 0, 1, 2]), rng.choice(
                        [0, 4096, 1 << 20, 3 << 20, REGION_CAP_MB << 20,
                         (REGION_CAP_MB << 20) + 1, 1 << 63]))
                    if rng.random() < 0.2:
                        body = body[:rng.randrange(16)] + rng.randbytes(rng.randrange(3))
                    crc_mode = crc_mode or body[:1] == b"\x01"
                elif roll < 0.27:
                    body, expect = _valid_infer(rng, region_size)
                    kind = "valid infer"
                    if crc_mode:
                        expect = None
                elif roll < 0.77:
                    body, kind = _mutate_infer(rng, region_size)
                elif roll < 0.87:
                    ftype = rng.choice(list(FrameType))
                    body, kind = rng.randbytes(rng.randrange(0, 300)), "random body"
                elif roll < 0.90:
                    body, _ = _valid_infer(rng, 0)
                    flags, crc, kind = 1, rng.randrange(1 << 32), "bad checksum"
                elif roll < 0.93 and conn.region is not None:
                    # Scribble on the region under the server: it must cope with any bytes.
                    start = rng.randrange(0, len(conn.region) - 64)
                    conn.region[start:start + 64] = rng.randbytes(64)
                    continue
                elif roll < 0.96:
                    frame, kind = _bad_header(rng)
                    conn.sock.sendall(frame)
                    owed.append((0, -1, None, kind))
                    hung_up = True
                    with stats.lock:
                        stats.frames += 1
                        stats.kinds[kind] += 1
                    break
                else:
                    # Truncated frame (or a valid request) and then gone: the server must not
                    # wait for the rest, nor answer into the void.
                    body, _ = _valid_infer(rng, 0)
                    frame = encode_frame(FrameType.INFER, rid, body)
                    conn.sock.sendall(frame[:rng.randrange(1, len(frame) + 1)])
                    with stats.lock:
                        stats.frames += 1
                        stats.kinds["truncated + disconnect"] += 1
                    return
                frame = _HEADER.pack(MAGIC, 1, int(ftype), flags, rid, len(body), crc) + body
                conn.sock.sendall(frame)
                sent += 1
                with stats.lock:
                    stats.frames += 1
                    stats.kinds[kind] += 1
                owed.append((rid, int(ftype), expect, kind))
            _collect(conn, owed, stats)
    except (BrokenPipeError, ConnectionResetError):
        # Only after a hang-up may the server stop reading: anything else is a problem.
        if not hung_up:
            with stats.lock:
                stats.problems.append("server reset a connection without a bad header")
    finally:
        conn.close()


def _collect(conn: Conn, owed: list, stats: Stats) -> None:
    """Read one reply per owed frame, in order, and check it."""
    deadline = time.monotonic() + REPLY_WAIT
    while owed:
        rid, ftype, expect, kind = owed[0]
        got = conn.read_frame(deadline)
        problem = None
        if got is None:
            problem = f"connection closed before the reply to {kind} (rid {rid})"
            owed.clear()
        elif got[0] == FrameType.ERROR and got[1] == 0:
            # Lost framing: the broken header we sent (it may overtake the replies to earlier
            # requests still being computed; a client drops the connection at this frame).
            code = decode_error(got[2])[0]
            if not any(o[1] == -1 for o in owed) or code != ErrorCode.PROTOCOL_ERROR:
                problem = f"unexpected connection error {ErrorCode(code).name}"
            late = 0
            while conn.read_frame(deadline) is not None:
                late += 1
            with stats.lock:
                stats.replies["ERROR id 0"] += 1
                stats.replies["frames after ERROR id 0"] += late
            owed.clear()
        else:
            owed.pop(0)
            rtype, rrid, body = got
            if ftype == -1:
                problem = f"{kind}: expected ERROR id 0, got {rtype:#x} for rid {rrid}"
            elif rrid != rid:
                problem = f"{kind}: reply {rtype:#x} for rid {rrid}, expected {rid} (order lost)"
            elif rtype == FrameType.ERROR:
                code, message = decode_error(body)
                with stats.lock:
                    stats.replies[ErrorCode(code).name] += 1
                if code == ErrorCode.INTERNAL:
                    problem = f"{kind}: INTERNAL error: {message}"
                elif expect is not None:
                    problem = f"{kind}: a valid request failed: {message}"
            elif ftype not in _OK or rtype != _OK[FrameType(ftype)]:
                problem = f"{kind}: request {ftype:#x} answered with {rtype:#x}"
            else:
                with stats.lock:
                    stats.replies[FrameType(rtype).name] += 1
                if rtype == FrameType.ATTACH_OK:
                    decode_attach_ok(body)
                elif rtype == FrameType.INFER_OK:
                    reply = decode_infer_ok(body)
                    if expect is not None:
                        out = {d.name: d for d in reply.outputs}["x"]
                        raw = bytes(reply.inline[out.offset:out.offset + out.nbytes])
                        if list(struct.unpack(f"<{len(expect)}i", raw)) != expect:
                            problem = f"{kind}: wrong echo"
        if problem:
            with stats.lock:
                stats.problems.append(problem)


def _shape(fds: list[str]) -> tuple[int, list[str]]:
    return sum(f.startswith("socket:") for f in fds), [f for f in fds
                                                       if not f.startswith("socket:")]


@pytest.fixture
def fuzz_server(tmp_path: Path):
    srv = ServerProcess(str(tmp_path / "tb.sock"), [
        "--model", "echo=tensorbridge.models.testing:echo",
        "--model", "head=tensorbridge.models.testing:head",
        "--model", "sleep=tensorbridge.models.testing:sleep",
        "--region-cap-mb", str(REGION_CAP_MB), "--shm-cap-mb", "1024"]).start()
    yield srv
    srv.stop()


def _settled(srv: ServerProcess, probe: tb.Client, want: tuple | None) -> tuple:
    end = time.monotonic() + 30
    while True:
        status = probe.ping()
        fds = _shape(srv.fds())
        if (status["connections_open"] == 1 and (want is None or fds == want)) \
                or time.monotonic() > end:
            return status["connections_open"], fds, srv.memfds()
        time.sleep(0.05)


def test_fuzz_frames_while_php_client_runs(fuzz_server: ServerProcess, tmp_path: Path,
                                           leak_check: None) -> None:
    srv = fuzz_server
    stop = tmp_path / "stop"
    with tb.Client(srv.socket, timeout=10.0) as probe:
        baseline = _settled(srv, probe, None)
        good = subprocess.Popen(
            ["php", str(PHP_DIR / "stress.php"), json.dumps({
                "socket": srv.socket, "worker": 9, "count": 0, "stop_file": str(stop),
                "timeout": 10.0, "mix": {"echo": 4, "bytes": 2, "f64": 2, "head": 1},
                "sizes": [16, 4096, 1 << 20]})],
            stdout=subprocess.PIPE, text=True)
        stats = Stats()
        started = time.monotonic()

        def worker(n: int) -> None:
            rng = random.Random(SEED * 31 + n)
            try:
                while True:
                    with stats.lock:
                        if stats.frames >= FRAMES:
                            return
                    fuzz_session(srv.socket, rng, stats, rng.choice([5, 50, 400]))
            except Exception as exc:  # a hang or a malformed reply: stop and report
                with stats.lock:
                    stats.problems.append(f"fuzzer {n}: {type(exc).__name__}: {exc} at "
                                          f"{traceback.format_exc(limit=-2)}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        stop.touch()
        out, _ = good.communicate(timeout=60)
        summary = json.loads(out.strip().splitlines()[-1])
        assert srv.proc is not None and srv.proc.poll() is None, "".join(srv.log[-20:])
        after = _settled(srv, probe, baseline[1])
    print(f"\nfuzz (seed {SEED}): {stats.frames} frames on {stats.connections} connections in "
          f"{elapsed:.1f} s = {stats.frames / elapsed:.0f} frames/s; good PHP client "
          f"{summary['ok']} answers right, {summary['bad']} wrong; replies {dict(stats.replies)}; "
          f"kinds {dict(stats.kinds)}; problems {len(stats.problems)}; {baseline} {after}")
    if stats.problems and os.environ.get("TB_FUZZ_REPORT"):
        Path(os.environ["TB_FUZZ_REPORT"]).write_text("\n".join(stats.problems))
    assert stats.problems == [], (SEED, stats.problems[:10])
    assert summary["bad"] == 0 and not summary["errors"] and summary["ok"] > 0, summary
    assert after == baseline == (1, baseline[1], 0), (baseline, after)
    assert not [line for line in srv.log if "internal error" in line or "Traceback" in line]
    assert stats.frames >= FRAMES


# -- hypothesis: structured descriptors on one long-lived connection --------------------------

_descriptor = st.builds(
    lambda dtype, ndim, location, res, name, offset, nbytes, shape: (
        struct.pack("<BBBBHHQQII", dtype, ndim, location, res, len(name), 0, offset, nbytes,
                    0, 0) + b"".join(struct.pack("<Q", d) for d in shape[:ndim]) + name),
    dtype=st.integers(0, 14), ndim=st.integers(0, 10), location=st.integers(0, 3),
    res=st.sampled_from([0, 0, 0, 1]), name=st.binary(min_size=0, max_size=8),
    offset=st.one_of(st.integers(0, 1 << 21).map(lambda n: n - n % ALIGN),
                     st.sampled_from(_NASTY_U64)),
    nbytes=st.one_of(st.integers(0, 1 << 12), st.sampled_from(_NASTY_U64)),
    shape=st.lists(st.one_of(st.integers(0, 8), st.sampled_from(_NASTY_U64)), min_size=10,
                   max_size=10))


@st.composite
def _infer_bodies(draw: st.DrawFn) -> bytes:
    descs = draw(st.lists(_descriptor, min_size=0, max_size=3))
    model = draw(st.sampled_from([b"echo", b"head", b"", b"e" * 300]))
    head = struct.pack("<IHBBQQ", draw(st.sampled_from([0, 1, 1000000])), len(model) % 65536,
                       draw(st.sampled_from([len(descs), 0, 1, 200])), draw(st.sampled_from(
                           [0, 0, 1])), draw(st.sampled_from([0, 64, 1 << 20] + list(_NASTY_U64))),
                       draw(st.sampled_from([0, 4096, 1 << 20] + list(_NASTY_U64))))
    return head + model + b"".join(descs) + draw(st.binary(max_size=64))


@pytest.fixture(scope="module")
def hypo_server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess(str(tmp_path_factory.mktemp("hypo") / "tb.sock"), [
        "--model", "echo=tensorbridge.models.testing:echo",
        "--model", "head=tensorbridge.models.testing:head",
        "--region-cap-mb", str(REGION_CAP_MB)]).start()
    conn = Conn(srv.socket)
    conn.sock.sendall(encode_frame(FrameType.ATTACH, 1, encode_attach(0, 1 << 21)))
    assert conn.read_frame(time.monotonic() + REPLY_WAIT)[0] == FrameType.ATTACH_OK
    yield srv, conn
    conn.close()
    srv.stop()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_infer_bodies())
def test_hypothesis_infer_bodies_get_one_clean_answer(hypo_server, body: bytes) -> None:
    """Any INFER body (within MAX_BODY) gets exactly one reply on a connection that stays
    usable: INFER_OK or an ERROR that is not INTERNAL."""
    srv, conn = hypo_server
    rid = random.randrange(2, 1 << 60)
    conn.sock.sendall(encode_frame(FrameType.INFER, rid, body)
                      + encode_frame(FrameType.PING, rid + 1))
    deadline = time.monotonic() + REPLY_WAIT
    rtype, rrid, reply = conn.read_frame(deadline)
    assert rrid == rid and rtype in (FrameType.INFER_OK, FrameType.ERROR)
    if rtype == FrameType.ERROR:
        assert decode_error(reply)[0] != ErrorCode.INTERNAL, decode_error(reply)
    assert conn.read_frame(deadline)[:2] == (FrameType.PONG, rid + 1)  # still in step
    assert srv.proc.poll() is None


# -- the compiled parser: differential against Python, and under ASan + UBSan ----------------

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _corpus(rng: random.Random, count: int) -> list[tuple[int, bytes]]:
    """(kind, bytes) records: 0 = a 24-byte header (or a wrong length), 1 = an INFER body;
    valid, mutated and random ones, as the live fuzzer sends them."""
    records: list[tuple[int, bytes]] = []
    while len(records) < count:
        region = rng.choice([0, 1 << 20])
        pick = rng.randrange(10)
        if pick < 2:  # valid, some with a pinned version and a routing key (then flipped)
            req = decode_infer_py(_valid_infer(rng, region)[0])
            req.version = rng.choice([None, 1, 0xFFFFFFFF])
            req.routing_key = rng.choice([None, b"k", rng.randbytes(255)])
            body = bytearray(encode_infer(req))
            if rng.random() < 0.3:
                body[rng.randrange(24, len(body))] = rng.randrange(256)
            records.append((1, bytes(body)))
        elif pick < 6:
            records.append((1, _mutate_infer(rng, region)[0]))
        elif pick == 6:
            records.append((1, rng.randbytes(rng.randrange(0, 200))))
        elif pick == 7:
            records.append((0, _bad_header(rng)[0]))
        elif pick == 8:
            header = encode_frame(rng.choice(list(FrameType)), rng.randrange(1 << 64),
                                  rng.randbytes(rng.randrange(0, 64)), rng.random() < 0.5)
            records.append((0, header[:HEADER_SIZE]))
        else:
            junk = bytearray(encode_frame(FrameType.INFER, 1, b"")[:HEADER_SIZE])
            for _ in range(rng.randrange(1, 4)):
                junk[rng.randrange(HEADER_SIZE)] = rng.randrange(256)
            records.append((0, bytes(junk[:rng.choice([HEADER_SIZE] * 5 + [0, 23])])))
    return records


def _python_accepts(kind: int, data: bytes) -> bool:
    try:
        (decode_header_py if kind == 0 else decode_infer_py)(data)
    except ProtocolError:
        return False
    return True


def _compiled_core(tmp: Path):
    """``tensorbridge._tbcore`` as installed, else built here from python/csrc."""
    try:
        from tensorbridge import _tbcore
        return _tbcore
    except ImportError:
        pass
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp),
                    "--build-temp", str(tmp / "obj")], cwd=CSRC.parent, check=True,
                   capture_output=True)
    path = next(tmp.glob("tensorbridge/_tbcore*.so"))
    spec = importlib.util.spec_from_file_location("tensorbridge._tbcore", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compiled_parser_agrees_with_python(tmp_path: Path) -> None:
    """Every fuzzed header and INFER body: the C parser accepts exactly what Python accepts,
    and what it accepts decodes to the same fields."""
    core = _compiled_core(tmp_path)
    rng = random.Random(SEED)
    accepted = 0
    for kind, data in _corpus(rng, min(FRAMES, 20000)):
        got = (core.parse_header if kind == 0 else core.parse_infer)(data)
        assert (got is not None) == _python_accepts(kind, data), (kind, data.hex(), SEED)
        if got is not None and kind == 1:
            accepted += 1
            ref = decode_infer_py(data)
            timeout_us, model, out_offset, out_capacity, tensors, start, version, key = got
            assert (timeout_us, model, out_offset, out_capacity, version, key) == (
                ref.timeout_us, ref.model, ref.out_offset, ref.out_capacity, ref.version,
                ref.routing_key)
            assert [(t.name, t.dtype.code, t.shape, t.location, t.offset, t.nbytes, t.crc32c)
                    for t in ref.inputs] == tensors
            assert bytes(ref.inline) == data[start:]
    assert accepted > 0


def test_compiled_parser_under_asan_and_ubsan(tmp_path: Path) -> None:
    """The C parser, built with -fsanitize=address,undefined, reads every fuzzed record from
    a buffer of exactly its size: no finding, and the same verdict as Python for each. The
    compiled loop's connection code splits the same frames as byte streams and answers them."""
    harness = tmp_path / "fuzz_frames"
    subprocess.run(["gcc", "-std=c11", "-g", "-O1", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-pthread", str(CSRC / "tb_frame.c"), str(CSRC / "tb_conn.c"),
                    str(CSRC / "fuzz_frames.c"), "-o", str(harness)],
                   check=True)
    rng = random.Random(SEED + 1)
    corpus = tmp_path / "corpus.bin"
    with corpus.open("wb") as out:
        for kind, data in _corpus(rng, FRAMES):
            out.write(struct.pack("<BBI", kind, _python_accepts(kind, data), len(data)) + data)
    run = subprocess.run([str(harness), str(corpus)], capture_output=True, text=True,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                              "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert run.returncode == 0, run.stdout + run.stderr + f" (TB_FUZZ_SEED={SEED})"
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr
    print(f"\nsanitizer run (seed {SEED}): {run.stdout.strip()}, findings 0")
    assert f"records {FRAMES} " in run.stdout
    assert " stream_frames 0 " not in run.stdout

